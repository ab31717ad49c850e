"""The application catalog: manifests that workers announced, and parameter checks.

The coordinator validates parameters against each operation's JSON schema, so
it needs no app library installed; the worker validates again with pydantic.

Who may change the catalog (the rules the README states):

- A join token names the apps its workers may serve (tokens made before apps
  were bound serve any app); registering for another app is refused (403).
- Each (app, version) is pinned by the first manifest announced for it: by the
  coordinator for its installed apps (the operator's copy, which wins at start
  and is current unless a newer version was published), else by the first worker.
  Another manifest under a pinned version is refused (409); the catalog is unchanged.
- A new version of an app already in the catalog is announced only by a worker
  whose join token was made with `--publish` (`may_publish`); it becomes current.
  Without it, 409 names the version and the flag. Workers of an older pinned
  version may still join (the current version stays).
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
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import re2
import referencing
import referencing.exceptions
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from csml.coordinator.errors import ApiError
from csml.schemas.apps import AppManifest, OperationInfo
from csml.store.db import insert_ignore
from csml.store.tables import AppRecord, AppVersion, JoinToken, Worker, utcnow

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
    """Refuse (422) a manifest with an operation schema the coordinator will not use."""
    for i, op in enumerate(manifest.operations):
        problem = schema_problem(op.params_schema)
        if problem is not None:
            raise ApiError(
                422,
                "invalid_manifest",
                f"app.operations[{i}].params_schema ({op.name}): {problem}",
                field=f"app.operations.{i}.params_schema",
            )


# -- the catalog --------------------------------------------------------------


@dataclass
class CatalogEntry:
    manifest: AppManifest
    operations: dict[str, OperationInfo]
    validators: dict[str, Any]


def normalise_operation(name: str) -> str:
    """`detect-faces` and `detect_faces` name the same operation."""
    return name.replace("-", "_")


class Catalog:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
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
        record = _locked_record(session, name, version, data, now)
        insert_ignore(
            session, AppVersion, app=name, version=version, manifest=data, registered_at=now
        )
        pinned = session.get(
            AppVersion, (name, version), with_for_update=True, populate_existing=True
        )
        assert pinned is not None
        if pinned.manifest != data or pinned.join_token_id is not None:
            if pinned.manifest != data:
                log.warning(
                    "installed app %s %s replaces the manifest pinned for it", name, version
                )
            pinned.manifest, pinned.join_token_id, pinned.registered_at = data, None, now
        current = session.get(AppVersion, (name, record.version))
        published = current is not None and current.join_token_id is not None
        if record.manifest != data and not published:
            record.manifest, record.version, record.updated_at = data, version, now
        self._remember(record)

    def register(self, session: Session, manifest: AppManifest, token: JoinToken) -> None:
        """A worker announces `manifest` with `token` (already checked to allow the app).

        Pins a first version; refuses (409) another manifest under a pinned version and,
        unless the token may publish, a new version of a catalogued app."""
        check_manifest(manifest)
        data = manifest.model_dump(mode="json")
        now = utcnow()
        name, version = manifest.name, manifest.version
        # Lock order: the app's row, then its versions.
        record = _locked_record(session, name, version, data, now)
        pinned = session.get(
            AppVersion, (name, version), with_for_update=True, populate_existing=True
        )
        if pinned is not None:
            if pinned.manifest != data:
                raise ApiError(
                    409,
                    "manifest_conflict",
                    f"app: {name} {version} is pinned to another manifest; a changed app needs "
                    "a new version (announced by a worker whose join token may publish)",
                    field="app",
                )
            self._remember(record)
            return
        known = session.scalar(
            select(func.count()).select_from(AppVersion).where(AppVersion.app == name)
        )
        if known and not token.may_publish:
            raise ApiError(
                409,
                "version_not_approved",
                f"app.version: {name} {version} is not in the catalog (current: "
                f"{record.version}); a new version is announced only with a join token made "
                f"with --publish (csml join-token create --app {name} --publish)",
                field="app.version",
            )
        session.add(
            AppVersion(
                app=name, version=version, manifest=data, join_token_id=token.id, registered_at=now
            )
        )
        if known:
            log.info("app %s: version %s published (was %s)", name, version, record.version)
        record.manifest, record.version, record.updated_at = data, version, now
        self._remember(record)

    def _remember(self, record: AppRecord) -> None:
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
            records = session.scalars(select(AppRecord)).all()
        else:
            with self._sessions() as own:
                records = own.scalars(select(AppRecord)).all()
        entries = {r.name: self._entry(AppManifest.model_validate(r.manifest)) for r in records}
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
        entry = self.entries(session).get(app)
        if entry is None:
            self._refresh(force=True, session=session)
            entry = self.entries(session).get(app)
        if entry is None:
            known = ", ".join(sorted(self.entries(session))) or "none yet"
            raise ApiError(
                404,
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
            raise ApiError(
                404,
                "unknown_operation",
                f"application {app!r} has no operation {operation!r}; it has: {known}",
                field="spec.operation",
            )
        return entry, op

    def check_params(self, app: str, operation: str, params: dict[str, Any]) -> None:
        entry, op = self.operation(app, operation)
        try:
            errors = sorted(
                entry.validators[op.name].iter_errors(params), key=lambda e: list(e.path)
            )
        except (referencing.exceptions.Unresolvable, SchemaError, ValueError) as exc:
            # A schema stored before manifests were checked: refused, never fetched.
            raise ApiError(
                422,
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
        raise ApiError(
            422,
            "invalid_params",
            f"{first['field']}: {first['message']}",
            field=str(first["field"]),
            details=details,
        )


def forget_token(session: Session, token_id: str) -> None:
    """After revoking `token_id` (its workers already stopped): withdraw the versions only
    it vouched for, and move each app whose current version went to one still served."""
    apps = sorted(
        set(session.scalars(select(AppVersion.app).where(AppVersion.join_token_id == token_id)))
    )
    valid = JoinToken.revoked_at.is_(None)
    for app in apps:
        record = session.get(AppRecord, app, with_for_update=True)  # lock order: app, versions
        versions = session.scalars(
            select(AppVersion)
            .where(AppVersion.app == app, AppVersion.join_token_id == token_id)
            .with_for_update()
        ).all()
        for v in versions:
            voucher = session.scalars(
                select(Worker.join_token_id)
                .join(JoinToken, JoinToken.id == Worker.join_token_id)
                .where(
                    Worker.app == app,
                    Worker.app_version == v.version,
                    Worker.stopped_at.is_(None),
                    Worker.join_token_id != token_id,
                    valid,
                )
                .limit(1)
            ).first()
            if voucher is not None:
                v.join_token_id = voucher
            else:
                log.warning("app %s %s withdrawn: its join token was revoked", app, v.version)
                session.delete(v)
        session.flush()
        if record is None or session.get(AppVersion, (app, record.version)) is not None:
            continue
        served = session.scalars(
            select(AppVersion)
            .join(
                Worker, (Worker.app == AppVersion.app) & (Worker.app_version == AppVersion.version)
            )
            .join(JoinToken, JoinToken.id == Worker.join_token_id)
            .where(AppVersion.app == app, Worker.stopped_at.is_(None), valid)
            .order_by(Worker.registered_at.desc())
            .limit(1)
        ).first()
        fallback = (
            served
            or session.scalars(
                select(AppVersion)
                .where(AppVersion.app == app)
                .order_by(AppVersion.registered_at.desc())
                .limit(1)
            ).first()
        )
        if fallback is None:
            session.delete(record)
        else:
            record.manifest, record.version, record.updated_at = (
                fallback.manifest,
                fallback.version,
                utcnow(),
            )


def _locked_record(
    session: Session, name: str, version: str, data: dict[str, Any], now: datetime
) -> AppRecord:
    """The app's catalog row, made from this manifest if it is new, locked for the
    transaction (the first lock taken: the app's row, then its versions)."""
    insert_ignore(
        session,
        AppRecord,
        name=name,
        version=version,
        manifest=data,
        served_rank=0,
        updated_at=now,
    )
    record = session.get(AppRecord, name, with_for_update=True, populate_existing=True)
    assert record is not None
    return record
