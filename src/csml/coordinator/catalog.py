"""The application catalog: manifests that workers announced, and parameter checks.

The coordinator validates parameters against each operation's JSON schema, so
it needs no app library installed; the worker validates again with pydantic.

Who may change the catalog (the rules the README states):

- A join token names the apps its workers may serve (tokens made before apps
  were bound serve any app); registering for another app is refused (`Forbidden`, 403).
- Each (app, version) is pinned by the first manifest announced for it: by the
  coordinator for its installed apps (the operator's copy, which wins at start
  and is current unless a newer version was published), else by the first worker.
  Another manifest under a pinned version is refused (`Conflict`, 409); the catalog is unchanged.
- A new version of an app already in the catalog is announced only by a worker
  whose join token was made with `--publish` (`may_publish`); it becomes current.
  Without it, the `Conflict` names the version and the flag. Workers of an older pinned
  version may still join (the current version stays).
- A contributed join token (an identity's, `contributor_id` set) registers a worker only
  for an app whose contributions are allowed (the operator's per-app setting, else the
  `CSML_CONTRIBUTIONS` default; `Forbidden` otherwise), below the app's cap of live
  contributed workers (`Conflict` naming the cap; counted under the app's row lock, so
  concurrent registrations cannot both pass), and only for a version already pinned: it
  never pins or publishes one (`Conflict`).
- Revoking a join token stops its workers and withdraws the versions only it
  vouched for: a version some live worker of another valid token also serves is
  kept; otherwise it is unpinned, and an app whose current version went falls
  back to the version its live workers serve (or the newest pinned one), or
  leaves the catalog when none is left.

Schemas are checked when announced: `check_schema` against draft 2020-12, `$ref`
only inside the document (`#...`; no `$id`), and every `pattern` (also the keys
of `patternProperties`) must compile under RE2, which matches in linear time, so
one validation costs time linear in the parameters' size. Validation never
retrieves anything: the reference registry refuses every URI, and patterns are
matched with RE2, never with backtracking `re`.

The rows live in `csml.store.apps` (every query and lock is there; this module decides
who may pin what); refusals are `csml.refusals` kinds, never HTTP statuses.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import unquote

import re2
import referencing
import referencing.exceptions
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from sqlalchemy.orm import Session, sessionmaker

from csml.refusals import Conflict, Forbidden, Invalid, NotFound
from csml.schemas.apps import AppManifest, OperationInfo
from csml.store import apps, contributions
from csml.store.tables import utcnow

log = logging.getLogger("csml.coordinator.catalog")

REFRESH_SECONDS = 5.0
MAX_PATTERN_CHARS = 1000
MAX_SCHEMA_DEPTH = 64

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


# -- bounded, offline JSON-schema validation ------------------------------------


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> Any:
    """`pattern` compiled by RE2 (linear-time matching); ValueError if RE2 refuses it."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"is over {MAX_PATTERN_CHARS} characters")
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(
            f"is not a pattern RE2 accepts ({detail}); use no backreferences or lookaround"
        ) from None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _regex(pattern).search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


_ADDITIONAL = Draft202012Validator.VALIDATORS["additionalProperties"]


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    patterns = schema.get("patternProperties")
    if not patterns or not validator.is_type(instance, "object"):
        yield from _ADDITIONAL(validator, additional, instance, schema)
        return
    known = schema.get("properties", {})
    extras = sorted(
        k for k in instance if k not in known and not any(_regex(p).search(k) for p in patterns)
    )
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        joined = ", ".join(repr(e) for e in extras)
        listed = ", ".join(repr(p) for p in sorted(patterns))
        yield ValidationError(f"{joined} do(es) not match any of the regexes: {listed}")


ParamsValidator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    },
)


def _no_retrieval(uri: str) -> referencing.Resource[Any]:
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


_OFFLINE: referencing.Registry[Any] = referencing.Registry(retrieve=_no_retrieval)  # type: ignore[call-arg]


def params_validator(schema: dict[str, Any]) -> Any:
    """A validator that resolves references only inside `schema` and matches with RE2."""
    return ParamsValidator(schema, registry=_OFFLINE)


def _nodes(schema: Any) -> Iterator[tuple[Any, int]]:
    stack: list[tuple[Any, int]] = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        children = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
        )
        stack.extend((child, depth + 1) for child in children)


def _pointer(schema: Any, fragment: str) -> bool:
    """Whether the JSON pointer `fragment` ("/a/b") names something in `schema`."""
    node = schema
    for raw in fragment.split("/")[1:]:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def schema_problem(schema: dict[str, Any]) -> str | None:
    """What is wrong with an operation's parameter schema, or None."""
    try:
        ParamsValidator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        at = f" at {where}" if where else ""
        return f"is not a valid JSON schema (draft 2020-12){at}: {exc.message}"
    refs: list[str] = []
    anchors: set[str] = set()
    for node, depth in _nodes(schema):
        if depth > MAX_SCHEMA_DEPTH:
            return f"is nested deeper than {MAX_SCHEMA_DEPTH} levels"
        if not isinstance(node, dict):
            continue
        for key in ("$ref", "$dynamicRef"):
            if isinstance(node.get(key), str):
                refs.append(node[key])
        if isinstance(node.get("$id"), str):
            return "uses $id: a parameter schema is one document (refer inside it with #/$defs/...)"
        for key in ("$anchor", "$dynamicAnchor"):
            if isinstance(node.get(key), str):
                anchors.add(node[key])
        patterns: list[Any] = []
        if isinstance(node.get("pattern"), str):
            patterns.append(node["pattern"])
        if isinstance(node.get("patternProperties"), dict):
            patterns.extend(node["patternProperties"])
        for pattern in patterns:
            try:
                _regex(pattern)
            except ValueError as exc:
                return f"pattern {pattern[:80]!r} {exc}"
    for ref in refs:
        fragment = ref[1:] if ref.startswith("#") else None
        if fragment is None:
            return (
                f"$ref {ref[:200]!r} points outside the schema; the coordinator fetches "
                "nothing: refer inside it (#/$defs/...)"
            )
        found = fragment in anchors if not fragment.startswith("/") else _pointer(schema, fragment)
        if fragment and not found:
            return f"$ref {ref[:200]!r} names nothing in the schema"
    return None


def check_manifest(manifest: AppManifest) -> None:
    """Refuse (Invalid) a manifest with an operation schema the coordinator will not use."""
    for i, op in enumerate(manifest.operations):
        problem = schema_problem(op.params_schema)
        if problem is not None:
            raise Invalid(
                "invalid_manifest",
                f"app.operations[{i}].params_schema ({op.name}): {problem}",
                field=f"app.operations.{i}.params_schema",
            )


# -- the catalog --------------------------------------------------------------


class Voucher(Protocol):
    """What the catalog needs of the join token a worker registers with."""

    @property
    def id(self) -> str: ...

    @property
    def may_publish(self) -> bool: ...

    @property
    def contributor_id(self) -> str | None: ...


@dataclass
class CatalogEntry:
    manifest: AppManifest
    operations: dict[str, OperationInfo]
    validators: dict[str, Any]


def normalise_operation(name: str) -> str:
    """`detect-faces` and `detect_faces` name the same operation."""
    return name.replace("-", "_")


class Catalog:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        contributions: bool = False,
        worker_live_seconds: float = 45.0,
    ) -> None:
        self._sessions = sessions
        self.contributions = contributions  # the default where the operator set nothing
        self._live = timedelta(seconds=worker_live_seconds)
        self._entries: dict[str, CatalogEntry] = {}
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def install(self, session: Session, manifest: AppManifest) -> None:
        """The coordinator's own (installed) app: the operator's copy pins its version,
        replacing another manifest pinned under it, and becomes current unless the current
        version was published since by a worker whose token may publish."""
        data = manifest.model_dump(mode="json")
        now = utcnow()
        name, version = manifest.name, manifest.version
        record = apps.lock_app(session, name, version, data, now)
        if apps.pin_installed(session, name, version, data, now):
            log.warning("installed app %s %s replaces the manifest pinned for it", name, version)
        current = apps.version(session, name, record.version)
        published = current is not None and current.join_token_id is not None
        if record.manifest != data and not published:
            record = apps.set_current(session, name, version, data, now)
        self._remember(record)

    def register(self, session: Session, manifest: AppManifest, token: Voucher) -> None:
        """A worker announces `manifest` with `token` (already checked to allow the app).

        Pins a first version; refuses (Conflict) another manifest under a pinned version
        and, unless the token may publish, a new version of a catalogued app."""
        check_manifest(manifest)
        data = manifest.model_dump(mode="json")
        now = utcnow()
        name, version = manifest.name, manifest.version
        contributed = token.contributor_id is not None
        if contributed:
            self._admit_contributed(session, name)
        # Lock order: the app's row, then its versions.
        record = apps.lock_app(session, name, version, data, now)
        if contributed:
            self._check_cap(session, name, now)
        pinned = apps.lock_version(session, name, version)
        if pinned is None and contributed:
            raise Conflict(
                "version_not_approved",
                f"app.version: {name} {version} is not in the catalog; a contributed worker "
                "serves only a version the operator's workers announced (see GET /v1/apps)",
                field="app.version",
            )
        if pinned is not None:
            if pinned.manifest != data:
                raise Conflict(
                    "manifest_conflict",
                    f"app: {name} {version} is pinned to another manifest; a changed app needs "
                    "a new version (announced by a worker whose join token may publish)",
                    field="app",
                )
            self._remember(record)
            return
        known = apps.count_versions(session, name)
        if known and not token.may_publish:
            raise Conflict(
                "version_not_approved",
                f"app.version: {name} {version} is not in the catalog (current: "
                f"{record.version}); a new version is announced only with a join token made "
                f"with --publish (csml join-token create --app {name} --publish)",
                field="app.version",
            )
        apps.add_version(session, name, version, data, token.id, now)
        if known:
            log.info("app %s: version %s published (was %s)", name, version, record.version)
        self._remember(apps.set_current(session, name, version, data, now))

    def contributions_allowed(self, session: Session, app: str) -> tuple[bool, int | None]:
        """Whether `app` takes contributed workers, and its cap (None: none)."""
        found = contributions.setting(session, app)
        if found is None:
            return self.contributions, None
        return found.allowed, found.max_workers

    def _admit_contributed(self, session: Session, app: str) -> None:
        allowed, _ = self.contributions_allowed(session, app)
        if not allowed:
            raise Forbidden(
                "contributions_off",
                f"app.name: the operator does not take contributed workers for {app!r}",
                field="app.name",
            )

    def _check_cap(self, session: Session, app: str, now: datetime) -> None:
        _, cap = self.contributions_allowed(session, app)
        if cap is None:
            return
        live = contributions.live_contributed_workers(session, app, now - self._live)
        if live >= cap:
            raise Conflict(
                "contributed_workers_full",
                f"app.name: {app!r} has its cap of {cap} contributed workers already "
                f"({live} live); try again when one leaves, or ask the operator to raise it",
                field="app.name",
            )

    def _remember(self, record: apps.AppRow) -> None:
        entry = self._entry(AppManifest.model_validate(record.manifest))
        with self._lock:
            self._entries[record.name] = entry

    @staticmethod
    def _entry(manifest: AppManifest) -> CatalogEntry:
        ops = {op.name: op for op in manifest.operations}
        return CatalogEntry(
            manifest=manifest,
            operations=ops,
            validators={n: params_validator(op.params_schema) for n, op in ops.items()},
        )

    def reload(self) -> None:
        """Read the catalog from the store now (after a change this process made)."""
        self._refresh(force=True)

    def _refresh(self, force: bool = False, session: Session | None = None) -> None:
        if not force and time.monotonic() - self._loaded_at < REFRESH_SECONDS:
            return
        if session is not None:
            manifests = apps.manifests(session)
        else:
            with self._sessions() as own:
                manifests = apps.manifests(own)
        entries = {name: self._entry(AppManifest.model_validate(m)) for name, m in manifests}
        with self._lock:
            self._entries = entries
            self._loaded_at = time.monotonic()

    def entries(self, session: Session | None = None) -> dict[str, CatalogEntry]:
        """The apps. Inside a transaction pass its `session`: a refresh must not take a
        second pooled connection while this one holds the (SQLite) write lock, or
        writers waiting for that lock can exhaust the pool and deadlock with it."""
        self._refresh(session=session)
        with self._lock:
            return dict(self._entries)

    def get(self, app: str, session: Session | None = None) -> CatalogEntry:
        self._refresh(session=session)
        entry = self._entries.get(app)  # replaced whole under the lock: no copy needed
        if entry is None:
            self._refresh(force=True, session=session)
            entry = self.entries(session).get(app)
        if entry is None:
            known = ", ".join(sorted(self.entries(session))) or "none yet"
            raise NotFound(
                "unknown_app",
                f"no application {app!r}; known applications: {known}",
                field="spec.app",
            )
        return entry

    def operation(
        self, app: str, operation: str, session: Session | None = None
    ) -> tuple[CatalogEntry, OperationInfo]:
        entry = self.get(app, session)
        op = entry.operations.get(normalise_operation(operation))
        if op is None:
            known = ", ".join(sorted(entry.operations))
            raise NotFound(
                "unknown_operation",
                f"application {app!r} has no operation {operation!r}; it has: {known}",
                field="spec.operation",
            )
        return entry, op

    def check_params(self, app: str, operation: str, params: dict[str, Any]) -> None:
        entry, op = self.operation(app, operation)
        self.check_op_params(app, entry, op, params)

    def check_op_params(
        self, app: str, entry: CatalogEntry, op: OperationInfo, params: dict[str, Any]
    ) -> None:
        """`check_params` for the (entry, operation) `operation` gave."""
        try:
            errors = sorted(
                entry.validators[op.name].iter_errors(params), key=lambda e: list(e.path)
            )
        except (referencing.exceptions.Unresolvable, SchemaError, ValueError) as exc:
            # A schema stored before manifests were checked: refused, never fetched.
            raise Invalid(
                "unusable_app_schema",
                f"spec.operation: the {app} app's parameter schema for {op.name!r} cannot be "
                f"used ({type(exc).__name__}); ask the operator to re-register the app",
                field="spec.operation",
            ) from None
        if not errors:
            return
        details = []
        for err in errors:
            path = ".".join(str(p) for p in err.absolute_path)
            if err.validator == "additionalProperties":
                extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
                path = extra[0] if extra else path
            details.append(
                {"field": f"params.{path}" if path else "params", "message": err.message}
            )
        first = details[0]
        raise Invalid(
            "invalid_params",
            f"{first['field']}: {first['message']}",
            field=str(first["field"]),
            details=details,
        )


def forget_token(session: Session, token_id: str) -> None:
    """After revoking `token_id` (its workers already stopped): withdraw the versions only
    it vouched for, and move each app whose current version went to one still served."""
    for app, version in apps.withdraw_token(session, token_id):
        log.warning("app %s %s withdrawn: its join token was revoked", app, version)
