"""What an identity holds, counted for its quotas (`csml.coordinator.quotas` decides).

Each function takes a Core `Connection` (or, for callers still on the ORM, a
`Session`: both run the same statements) and is meant to run inside the write
transaction that lands the rows it admits, after `lock_identity`, so the counts
cannot change under the check (see `csml.coordinator.quotas`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, Text, bindparam, exists, func, or_, select
from sqlalchemy import cast as sql_cast
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from csml.store.jobs import FILES, JOBS, QUEUED, RUNNING, TERMINAL
from csml.store.tables import Identity
from csml.store.tables_artifacts import ModelArtifact

Conn = Connection | Session
IDENTITIES = cast(Table, Identity.__table__)
MODELS = cast(Table, ModelArtifact.__table__)
ACTIVE = (QUEUED, RUNNING)


def _dialect(conn: Conn) -> str:
    if isinstance(conn, Session):
        return conn.get_bind().dialect.name
    return conn.dialect.name


_IDENTITY = select(IDENTITIES.c.id).where(IDENTITIES.c.id == bindparam("identity_id"))
_LOCK_IDENTITY = {
    "postgresql": _IDENTITY.with_for_update(key_share=True),  # FOR NO KEY UPDATE
    "sqlite": _IDENTITY,  # the write transaction holds the database
}
_ACTIVE_JOBS = (
    select(func.count())
    .select_from(JOBS)
    .where(
        JOBS.c.owner_id == bindparam("identity_id"),
        JOBS.c.state.in_(ACTIVE),
        JOBS.c.parent_seq.is_(None),
    )
)
# Each blob once: a pipeline's steps and the pipeline itself share their files' blobs.
_BLOBS = (
    select(FILES.c.blob, FILES.c.size)
    .join(JOBS, JOBS.c.seq == FILES.c.job_seq)
    .where(JOBS.c.owner_id == bindparam("identity_id"))
    .distinct()
    .subquery()
)
_BLOB_BYTES = select(func.coalesce(func.sum(_BLOBS.c.size), 0))
_ORPHAN_MODEL_BYTES = select(func.coalesce(func.sum(MODELS.c.size), 0)).where(
    MODELS.c.owner_id == bindparam("identity_id"),
    or_(
        MODELS.c.job_id.is_(None),
        MODELS.c.job_id.not_in(
            select(JOBS.c.id).where(JOBS.c.owner_id == bindparam("identity_id"))
        ),
    ),
)
_PARAMS_TEXT = func.length(sql_cast(JOBS.c.params, Text))
_PARAMS_BYTES = select(func.coalesce(func.sum(_PARAMS_TEXT), 0)).where(
    JOBS.c.owner_id == bindparam("identity_id"), _PARAMS_TEXT > 2
)
# The three in one statement (one round trip, one statement per submission, not three).
_STORED_BYTES = select(
    _BLOB_BYTES.scalar_subquery()
    + _ORPHAN_MODEL_BYTES.scalar_subquery()
    + _PARAMS_BYTES.scalar_subquery()
)


def lock_identity(conn: Conn, identity_id: str) -> bool:
    """Hold the identity's row (PostgreSQL: FOR NO KEY UPDATE, so inserts that reference
    it proceed); False when the identity is gone."""
    stmt = _LOCK_IDENTITY.get(_dialect(conn), _IDENTITY)
    return conn.scalar(stmt, {"identity_id": identity_id}) is not None


def active_jobs(conn: Conn, identity_id: str) -> int:
    """Queued and running jobs of the identity; a pipeline counts once, not per step."""
    return int(conn.scalar(_ACTIVE_JOBS, {"identity_id": identity_id}) or 0)


def stored_bytes(conn: Conn, identity_id: str) -> int:
    """Bytes of the identity's kept job files (each blob once), its models whose job is
    gone, and the params its kept jobs hold (as JSON text; `{}` counts nothing): one
    statement."""
    return int(conn.scalar(_STORED_BYTES, {"identity_id": identity_id}) or 0)


def oldest_finished_with_files(conn: Conn, identity_id: str) -> datetime | None:
    """When the identity's oldest ended job that still has files ended."""
    stmt = select(func.min(JOBS.c.finished_at)).where(
        JOBS.c.owner_id == identity_id,
        JOBS.c.state.in_(TERMINAL),
        exists().where(FILES.c.job_seq == JOBS.c.seq),
    )
    found: datetime | None = conn.scalar(stmt)
    return found


def model_count(conn: Conn, identity_id: str) -> int:
    """How many model artifacts the identity keeps."""
    stmt = select(func.count()).select_from(MODELS).where(MODELS.c.owner_id == identity_id)
    return int(conn.scalar(stmt) or 0)


def active_operations(conn: Conn, identity_id: str) -> list[tuple[str, str, int]]:
    """(app, operation, how many) of the identity's queued and running single jobs."""
    stmt = (
        select(JOBS.c.app, JOBS.c.operation, func.count())
        .where(
            JOBS.c.owner_id == identity_id,
            JOBS.c.state.in_(ACTIVE),
            JOBS.c.parent_seq.is_(None),
            JOBS.c.step_index.is_(None),
        )
        .group_by(JOBS.c.app, JOBS.c.operation)
    )
    return [(str(a), str(o), int(n)) for a, o, n in conn.execute(stmt)]


def active_pipelines(conn: Conn, identity_id: str) -> list[tuple[dict[str, Any], int]]:
    """(params, current step index) of the identity's queued and running pipelines."""
    stmt = select(JOBS.c.params, JOBS.c.step_index).where(
        JOBS.c.owner_id == identity_id,
        JOBS.c.state.in_(ACTIVE),
        JOBS.c.parent_seq.is_(None),
        JOBS.c.step_index.is_not(None),
    )
    return [(params or {}, int(index or 0)) for params, index in conn.execute(stmt)]
