"""Finding a caller's own row by id or unique prefix (jobs, models).

Another identity's row is never found (404, never 403); a prefix matching several
rows is a 400. `owned_job_state` answers the same question for a job with its id and
state only (no row, no file or envelope loads), for long-polls that re-check."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from csml import ids
from csml.coordinator.errors import ApiError, not_found
from csml.store.tables import Job
from csml.store.tables_artifacts import ModelArtifact

Owned = TypeVar("Owned", Job, ModelArtifact)


def _owned_where(stmt: Any, table: Any, owner_id: str, ident: str, what: str) -> Any:
    if not ids.is_id_prefix(ident):
        raise not_found(what, ident)
    stmt = stmt.where(table.owner_id == owner_id)
    if len(ident) == ids.ID_LENGTH:
        return stmt.where(table.id == ident)
    return stmt.where(table.id.startswith(ident, autoescape=True))


def owned_job_state(session: Session, owner_id: str, ident: str) -> tuple[str, str]:
    """(id, state) of the caller's job `ident` (id or unique prefix); one query."""
    stmt = _owned_where(select(Job.id, Job.state), Job, owner_id, ident, "job")
    found = session.execute(stmt.limit(2)).all()
    if not found:
        raise not_found("job", ident)
    if len(found) > 1:
        raise ApiError(400, "ambiguous_id", f"{ident!r} matches several jobs; give more of it")
    return found[0][0], found[0][1]


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
    stmt = _owned_where(select(table), table, owner_id, ident, what)
    if lock:
        stmt = stmt.with_for_update()
    found: list[Owned] = list(session.scalars(stmt.limit(2)).all())
    if not found:
        raise not_found(what, ident)
    if len(found) > 1:
        raise ApiError(400, "ambiguous_id", f"{ident!r} matches several {what}s; give more of it")
    return found[0]
