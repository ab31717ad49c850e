"""What an identity holds, counted for its quotas (`csml.coordinator.quotas` decides).

Each function takes a Core `Connection` (or, for callers still on the ORM, a
`Session`: both run the same statements) and is meant to run inside the write
transaction that lands the rows it admits, after `lock_identity`, so the counts
cannot change under the check (see `csml.coordinator.quotas`).

`admits(...)` is the same checks (the identity exists, queued + running jobs, stored
bytes) as one SQL condition, for a statement that writes only when they pass: a
single job's submission puts it in the `WHERE` of its fair-rank upsert
(`csml.store.jobs_write.next_rank`), so admitting it costs no statement of its own.
It is race-free where the counts cannot change between the statement's snapshot and
its write: on SQLite (the write transaction holds the database), and on PostgreSQL
after `lock_identity` in an earlier statement of the transaction (READ COMMITTED
takes each statement's snapshot when it starts, so it sees every transaction that
held the identity's row before). "Earlier" holds when the two are sent together in one
round trip (`csml.store.jobs_write.locked_insert_job`, libpq's pipeline mode): the
server runs them one after the other, and takes the second's snapshot only then.

Stored bytes are a counter, `identities.stored_bytes`, kept by triggers (migration
0011_stored_bytes) in the statement that inserts, updates or deletes a counted row: a
job (its params), a job file, a model, whoever sends it (the hot path, the ORM, a
cascade, a retention or erasure delete). Reading them is one primary-key look-up,
whatever the identity keeps; `summed_stored_bytes` is the definition the counter
equals, summed from the rows (O(kept jobs): for checks and tests). On PostgreSQL every
change is an atomic increment of the identity's row, which it holds until its
transaction ends, so the counter read after `lock_identity` sees every change committed
before and none can commit under the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, Text, and_, bindparam, exists, func, or_, select
from sqlalchemy import cast as sql_cast
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from csml.store.jobs import FILES, JOBS, QUEUED, RUNNING, TERMINAL
from csml.store.prepared import Prepared
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
# The same lock on PostgreSQL, for a caller that sends it with the statement after it
# (`csml.store.jobs_write.locked_insert_job`: one round trip for both).
LOCK_IDENTITY_PG = Prepared(_LOCK_IDENTITY["postgresql"])
_ACTIVE_JOBS = (
    select(func.count())
    .select_from(JOBS)
    .where(
        JOBS.c.owner_id == bindparam("identity_id"),
        JOBS.c.state.in_(ACTIVE),
        JOBS.c.parent_seq.is_(None),
    )
)
# The definition (`summed_stored_bytes`): each blob once (a pipeline's steps and the
# pipeline itself share their files' blobs), models whose job is gone, params.
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
_SUMMED_STORED_BYTES = select(
    _BLOB_BYTES.scalar_subquery()
    + _ORPHAN_MODEL_BYTES.scalar_subquery()
    + _PARAMS_BYTES.scalar_subquery()
)
# What the triggers keep equal to it.
_STORED_BYTES = select(IDENTITIES.c.stored_bytes).where(IDENTITIES.c.id == bindparam("identity_id"))


@dataclass(frozen=True, slots=True)
class Admission:
    """What a new job must fit, for `admits`: `identity_id` exists, has fewer than
    `max_active_jobs` queued + running jobs (0: no limit), and its stored bytes are
    below `max_stored_bytes` with `upload_bytes` more at most that (0: no limit)."""

    identity_id: str
    max_active_jobs: int
    max_stored_bytes: int
    upload_bytes: int

    @property
    def key(self) -> tuple[bool, bool]:
        """Which limits the condition checks (`admits` builds one per key)."""
        return bool(self.max_active_jobs), bool(self.max_stored_bytes)

    def params(self) -> dict[str, Any]:
        """The bound values of `admits(*self.key)`."""
        return {
            "identity_id": self.identity_id,
            "b_max_active": self.max_active_jobs,
            "b_max_bytes": self.max_stored_bytes,
            # stored < limit and stored + upload <= limit, in one comparison (integers):
            # with no upload, stored + 1 <= limit is stored < limit; with one, the second
            # implies the first. So the sum is computed once.
            "b_upload": max(1, self.upload_bytes),
        }


@cache
def admits(active: bool, stored: bool) -> ColumnElement[bool]:
    """The identity (`identity_id`) exists and, when `active`, has fewer than
    `b_max_active` queued + running jobs and, when `stored`, its stored bytes plus
    `b_upload` are at most `b_max_bytes` (see `Admission.params`): `check_new_job`'s
    checks but the models' as one condition, built once per variant."""
    terms: list[ColumnElement[bool]] = [exists().where(IDENTITIES.c.id == bindparam("identity_id"))]
    if active:
        terms.append(_ACTIVE_JOBS.scalar_subquery() < bindparam("b_max_active"))
    if stored:
        terms.append(
            _STORED_BYTES.scalar_subquery() + bindparam("b_upload") <= bindparam("b_max_bytes")
        )
    return and_(*terms)


def lock_identity(conn: Conn, identity_id: str) -> bool:
    """Hold the identity's row (PostgreSQL: FOR NO KEY UPDATE, so inserts that reference
    it proceed); False when the identity is gone."""
    stmt = _LOCK_IDENTITY.get(_dialect(conn), _IDENTITY)
    return conn.scalar(stmt, {"identity_id": identity_id}) is not None


def identity_exists(conn: Conn, identity_id: str) -> bool:
    """Whether the identity exists (a plain read: nothing is locked)."""
    return conn.scalar(_IDENTITY, {"identity_id": identity_id}) is not None


def active_jobs(conn: Conn, identity_id: str) -> int:
    """Queued and running jobs of the identity; a pipeline counts once, not per step."""
    return int(conn.scalar(_ACTIVE_JOBS, {"identity_id": identity_id}) or 0)


def stored_bytes(conn: Conn, identity_id: str) -> int:
    """Bytes of the identity's kept job files (each blob once), its models whose job is
    gone, and the params its kept jobs hold (as JSON text; `{}` counts nothing): its
    counter, one primary-key look-up (0 for an identity that is gone)."""
    return int(conn.scalar(_STORED_BYTES, {"identity_id": identity_id}) or 0)


def stored_bytes_if_exists(conn: Conn, identity_id: str) -> int | None:
    """`stored_bytes`, or None when the identity is gone: whether it exists and what it
    stores, in one read (nothing is locked)."""
    value = conn.scalar(_STORED_BYTES, {"identity_id": identity_id})
    return None if value is None else int(value)


def summed_stored_bytes(conn: Conn, identity_id: str) -> int:
    """`stored_bytes` summed from the rows, O(kept jobs): what the counter must equal."""
    return int(conn.scalar(_SUMMED_STORED_BYTES, {"identity_id": identity_id}) or 0)


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
