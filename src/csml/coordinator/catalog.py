"""The application catalog: manifests that workers announced, and parameter checks.

The coordinator validates parameters against each operation's JSON schema, so
it needs no app library installed; the worker validates again with pydantic.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from csml.coordinator.errors import ApiError
from csml.schemas.apps import AppManifest, OperationInfo
from csml.store.db import insert_ignore
from csml.store.tables import AppRecord, utcnow

REFRESH_SECONDS = 5.0


@dataclass
class CatalogEntry:
    manifest: AppManifest
    operations: dict[str, OperationInfo]
    validators: dict[str, Draft202012Validator]


def normalise_operation(name: str) -> str:
    """`detect-faces` and `detect_faces` name the same operation."""
    return name.replace("-", "_")


class Catalog:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._entries: dict[str, CatalogEntry] = {}
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def upsert(self, session: Session, manifest: AppManifest) -> None:
        """Record an app's manifest; safe when several coordinators register it at once."""
        data = manifest.model_dump(mode="json")
        insert_ignore(
            session,
            AppRecord,
            name=manifest.name,
            version=manifest.version,
            manifest=data,
            served_rank=0,
            updated_at=utcnow(),
        )
        record = session.get(AppRecord, manifest.name, with_for_update=True)
        assert record is not None
        if record.manifest != data:
            record.manifest = data
            record.version = manifest.version
            record.updated_at = utcnow()
        with self._lock:
            self._entries[manifest.name] = self._entry(manifest)

    @staticmethod
    def _entry(manifest: AppManifest) -> CatalogEntry:
        ops = {op.name: op for op in manifest.operations}
        return CatalogEntry(
            manifest=manifest,
            operations=ops,
            validators={n: Draft202012Validator(op.params_schema) for n, op in ops.items()},
        )

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
        errors = sorted(entry.validators[op.name].iter_errors(params), key=lambda e: list(e.path))
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
