"""Finding a caller's own row by id or unique prefix, for rows still read with the ORM
(models: `csml.coordinator.artifacts`). Jobs are found by `csml.store.jobs.owned`.

Another identity's row is never found (`NotFound`, never `Forbidden`); a prefix
matching several rows is `Malformed` (400)."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from csml import ids
from csml.refusals import Malformed, NotFound
from csml.store.tables import Job
from csml.store.tables_artifacts import ModelArtifact

Owned = TypeVar("Owned", Job, ModelArtifact)


def find_owned(
    session: Session,
    table: type[Owned],
    owner_id: str,
    ident: str,
    what: str,
    *,
    lock: bool = False,
) -> Owned:
    """The caller's row whose id is `ident` or starts with it; another identity's row is
    not found (404, never 403), and a prefix matching several is a 400."""
    if not ids.is_id_prefix(ident):
        raise NotFound.of(what, ident)
    stmt: Any = select(table).where(table.owner_id == owner_id)
    if len(ident) == ids.ID_LENGTH:
        stmt = stmt.where(table.id == ident)
    else:
        stmt = stmt.where(table.id.startswith(ident, autoescape=True))
    if lock:
        stmt = stmt.with_for_update()
    found: list[Owned] = list(session.scalars(stmt.limit(2)).all())
    if not found:
        raise NotFound.of(what, ident)
    if len(found) > 1:
        raise Malformed("ambiguous_id", f"{ident!r} matches several {what}s; give more of it")
    return found[0]
