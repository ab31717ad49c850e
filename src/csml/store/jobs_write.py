"""Jobs in the store: the lifecycle's writes, as plain functions on a Core `Connection`.

Each function here runs inside the write transaction of a `Writer` operation
(`csml.store.writer`): it never commits, and whatever it returns describes rows
that are durable once that operation's `run` returns. Rows come back as small frozen
dataclasses, never ORM objects. `orm_session(conn)` lends an ORM session on the same
connection and transaction to the few steps still written with the ORM (pipeline
steps, model artifacts): they cost nothing on the path of a plain job.

Invariants:

- Claim is one `UPDATE … WHERE seq IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING`
  on the head of `ix_jobs_claim` (lowest fair rank first); the served rank moves up
  only if no other transaction holds the app's row (SKIP LOCKED), so a claim never
  waits on another. On SQLite the write lock taken at BEGIN stands for the row locks.
- A fair rank is one past the larger of its owner's last rank in the app (an upsert of
  the owner's `fair_counters` row, no app lock) and the app's served rank.
- Completion locks the jobs it ends (and, on PostgreSQL, their pipelines' parents
  first: the pipelines' lock order) and reads their lease under that lock, so of two
  completions of one job exactly one is kept.
- The reaper's and `fail_unclaimable`'s selects skip locked rows: a job being
  completed or cancelled is left for the next round.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    case,
    exists,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from csml.store.jobs import (
    APPS,
    COUNTERS,
    ENVELOPES,
    FILES,
    JOBS,
    QUEUED,
    RECIPIENTS,
    RUNNING,
    WORKERS,
    FileRow,
    claimable,
)
from csml.store.tables import Job


@contextmanager
def orm_session(conn: Connection) -> Iterator[Session]:
    """An ORM session inside `conn`'s transaction (it neither commits nor rolls it back):
    for the pipeline and model steps that still work on ORM rows. Flushed on exit."""
    session = Session(bind=conn, expire_on_commit=False, autoflush=True)
    try:
        yield session
        session.flush()
    finally:
        session.close()


def orm_job(session: Session, seq: int) -> Job:
    """The job's ORM row in `session`, read afresh (it sees this transaction's writes)."""
    job = session.get(Job, seq, populate_existing=True)
    assert job is not None, seq
    return job


# -- submission ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewJob:
    """What a new job's row holds (the state is queued; the rank comes from `next_rank`)."""

    id: str
    owner_id: str
    app: str
    operation: str
    params: dict[str, Any]
    limits: dict[str, Any]
    fair_rank: int
    created_at: datetime
    max_attempts: int


@dataclass(frozen=True, slots=True)
class Sealing:
    """A confidential job's envelope and its data key sealed to each recipient worker."""

    version: int
    job_nonce: str
    result_public_key: str
    encrypted_params: str
    wrapped_keys: tuple[tuple[str, str], ...]  # (worker id, wrapped key)


def lock_app(conn: Connection, app: str) -> None:
    """Hold `app`'s row until the transaction ends (PostgreSQL; SQLite holds the db)."""
    conn.execute(select(APPS.c.name).where(APPS.c.name == app).with_for_update())


def next_rank(conn: Connection, app: str, owner_id: str, served: int) -> int:
    """One past the larger of the owner's last rank in `app` and `served` (an upsert of
    the owner's counter row: one owner's submissions queue on their own row only)."""
    values = {"app": app, "owner_id": owner_id, "last_rank": served + 1}
    bumped = {
        "last_rank": case((COUNTERS.c.last_rank > served, COUNTERS.c.last_rank), else_=served) + 1
    }
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        pg = pg_insert(COUNTERS).values(**values)
        stmt = pg.on_conflict_do_update(
            index_elements=[COUNTERS.c.app, COUNTERS.c.owner_id], set_=bumped
        ).returning(COUNTERS.c.last_rank)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        lite = sqlite_insert(COUNTERS).values(**values)
        stmt = lite.on_conflict_do_update(
            index_elements=[COUNTERS.c.app, COUNTERS.c.owner_id], set_=bumped
        ).returning(COUNTERS.c.last_rank)
    return int(conn.execute(stmt).scalar_one())


def insert_job(
    conn: Connection, job: NewJob, files: Sequence[FileRow], sealing: Sealing | None
) -> int:
    """Insert a queued job with its files (and envelope); its seq."""
    seq = conn.execute(
        insert(JOBS)
        .values(
            id=job.id,
            owner_id=job.owner_id,
            app=job.app,
            operation=job.operation,
            params=job.params,
            limits=job.limits,
            state=QUEUED,
            fair_rank=job.fair_rank,
            created_at=job.created_at,
            attempts=0,
            max_attempts=job.max_attempts,
            progress_fraction=0.0,
            progress_message="",
        )
        .returning(JOBS.c.seq)
    ).scalar_one()
    add_files(conn, seq, files)
    if sealing is not None:
        conn.execute(
            insert(ENVELOPES).values(
                job_seq=seq,
                version=sealing.version,
                job_nonce=sealing.job_nonce,
                result_public_key=sealing.result_public_key,
                encrypted_params=sealing.encrypted_params,
                encrypted_result=None,
            )
        )
        conn.execute(
            insert(RECIPIENTS),
            [{"job_seq": seq, "worker_id": w, "wrapped_key": k} for w, k in sealing.wrapped_keys],
        )
    return int(seq)


def add_files(conn: Connection, seq: int, files: Sequence[FileRow]) -> None:
    if files:
        conn.execute(
            insert(FILES),
            [
                {
                    "job_seq": seq,
                    "kind": f.kind,
                    "name": f.name,
                    "size": f.size,
                    "sha256": f.sha256,
                    "media_type": f.media_type,
                    "blob": f.blob,
                    "model_id": f.model_id,
                }
                for f in files
            ],
        )


# -- claims and heartbeats ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sealed:
    """What a recipient worker gets of a confidential job it claimed."""

    job_nonce: str
    wrapped_key: str
    result_public_key: str
    encrypted_params: str


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job just claimed, with its input files and (confidential) envelope."""

    seq: int
    id: str
    owner_id: str
    operation: str
    params: dict[str, Any]
    limits: dict[str, Any]
    attempts: int
    fair_rank: int
    inputs: tuple[FileRow, ...]
    sealed: Sealed | None


def stop_worker(conn: Connection, worker_id: str, now: datetime) -> None:
    """Mark the worker as gone (it left the cluster)."""
    conn.execute(update(WORKERS).where(WORKERS.c.id == worker_id).values(stopped_at=now))


def stamp_worker(conn: Connection, worker_id: str, now: datetime) -> None:
    """Write the worker's liveness."""
    conn.execute(update(WORKERS).where(WORKERS.c.id == worker_id).values(last_heartbeat=now))


def take(
    conn: Connection,
    worker_id: str,
    app: str,
    max_jobs: int,
    lease_id: str,
    now: datetime,
    lease_until: datetime,
) -> list[Claimed]:
    """Claim up to `max_jobs` of the queue head for this worker (see the invariants), in
    claim order."""
    head = (
        select(JOBS.c.seq)
        .where(claimable(worker_id, app))
        .order_by(JOBS.c.fair_rank, JOBS.c.seq)
        .limit(max_jobs)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    rows = conn.execute(
        update(JOBS)
        .where(JOBS.c.seq.in_(head))
        .values(
            state=RUNNING,
            worker_id=worker_id,
            lease_id=lease_id,
            lease_expires_at=lease_until,
            started_at=now,
            attempts=JOBS.c.attempts + 1,
            error=None,
        )
        .returning(
            JOBS.c.seq,
            JOBS.c.id,
            JOBS.c.owner_id,
            JOBS.c.operation,
            JOBS.c.params,
            JOBS.c.limits,
            JOBS.c.attempts,
            JOBS.c.fair_rank,
        )
    ).all()
    if not rows:
        return []
    seqs = [r.seq for r in rows]
    top = max(r.fair_rank for r in rows)
    behind = (
        select(APPS.c.name)
        .where(APPS.c.name == app, APPS.c.served_rank < top)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    conn.execute(update(APPS).where(APPS.c.name.in_(behind)).values(served_rank=top))
    inputs: dict[int, list[FileRow]] = {}
    for f in conn.execute(select(FILES).where(FILES.c.job_seq.in_(seqs), FILES.c.kind == "input")):
        inputs.setdefault(f.job_seq, []).append(
            FileRow(f.kind, f.name, f.size, f.sha256, f.media_type, f.blob, f.model_id)
        )
    sealed: dict[int, Sealed] = {}
    if conn.execute(select(exists().where(ENVELOPES.c.job_seq.in_(seqs)))).scalar():
        for seq, nonce, result_key, params, wrapped in conn.execute(
            select(
                ENVELOPES.c.job_seq,
                ENVELOPES.c.job_nonce,
                ENVELOPES.c.result_public_key,
                ENVELOPES.c.encrypted_params,
                RECIPIENTS.c.wrapped_key,
            )
            .join(RECIPIENTS, RECIPIENTS.c.job_seq == ENVELOPES.c.job_seq)
            .where(ENVELOPES.c.job_seq.in_(seqs), RECIPIENTS.c.worker_id == worker_id)
        ):
            sealed[seq] = Sealed(nonce, wrapped, result_key, params)
    return [
        Claimed(
            seq=r.seq,
            id=r.id,
            owner_id=r.owner_id,
            operation=r.operation,
            params=r.params,
            limits=r.limits,
            attempts=r.attempts,
            fair_rank=r.fair_rank,
            inputs=tuple(inputs.get(r.seq, ())),
            sealed=sealed.get(r.seq),
        )
        for r in sorted(rows, key=lambda r: (r.fair_rank, r.seq))
    ]


@dataclass(frozen=True, slots=True)
class Held:
    """A running job whose lease a heartbeat extended: its progress as stored."""

    owner_id: str
    progress_fraction: float
    progress_message: str


def extend_leases(
    conn: Connection, worker_id: str, leases: Sequence[tuple[str, str]], until: datetime
) -> dict[str, Held]:
    """Extend the leases (job id, lease id) this worker still holds; those held, by id."""
    if not leases:
        return {}
    rows = conn.execute(
        update(JOBS)
        .where(
            tuple_(JOBS.c.id, JOBS.c.lease_id).in_(list(leases)),
            JOBS.c.state == RUNNING,
            JOBS.c.worker_id == worker_id,
        )
        .values(lease_expires_at=until)
        .returning(JOBS.c.id, JOBS.c.owner_id, JOBS.c.progress_fraction, JOBS.c.progress_message)
    ).all()
    return {r.id: Held(r.owner_id, r.progress_fraction, r.progress_message) for r in rows}


def set_progress(
    conn: Connection, job_id: str, lease_id: str, fraction: float, message: str
) -> None:
    conn.execute(
        update(JOBS)
        .where(JOBS.c.id == job_id, JOBS.c.lease_id == lease_id)
        .values(progress_fraction=fraction, progress_message=message)
    )


# -- ends: completion, cancel, reaping ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Locked:
    """A job locked to be ended, with what deciding its end needs."""

    seq: int
    id: str
    owner_id: str
    app: str
    operation: str
    state: str
    worker_id: str | None
    lease_id: str | None
    attempts: int
    max_attempts: int
    parent_seq: int | None
    step_index: int | None
    confidential: bool


def _select_locked() -> Select[Any]:
    sealed = exists().where(ENVELOPES.c.job_seq == JOBS.c.seq)
    return select(
        JOBS.c.seq,
        JOBS.c.id,
        JOBS.c.owner_id,
        JOBS.c.app,
        JOBS.c.operation,
        JOBS.c.state,
        JOBS.c.worker_id,
        JOBS.c.lease_id,
        JOBS.c.attempts,
        JOBS.c.max_attempts,
        JOBS.c.parent_seq,
        JOBS.c.step_index,
        sealed.label("confidential"),
    )


def _locked(conn: Connection, stmt: Select[Any]) -> list[Locked]:
    return [
        Locked(**{**r._mapping, "confidential": bool(r.confidential)})
        for r in conn.execute(stmt).all()
    ]


def lock_to_complete(conn: Connection, job_ids: Sequence[str]) -> dict[str, Locked]:
    """Lock these jobs to end them (PostgreSQL: their pipelines' parents first)."""
    if conn.dialect.name != "sqlite":
        parents = conn.scalars(
            select(JOBS.c.parent_seq)
            .where(JOBS.c.id.in_(list(job_ids)), JOBS.c.parent_seq.is_not(None))
            .order_by(JOBS.c.parent_seq)
        ).all()
        if parents:
            conn.execute(select(JOBS.c.seq).where(JOBS.c.seq.in_(parents)).with_for_update())
    stmt = _select_locked().where(JOBS.c.id.in_(list(job_ids))).with_for_update(of=JOBS)
    return {j.id: j for j in _locked(conn, stmt)}


_KEEP: Any = object()  # `end`: leave the job's result as it is


def end(
    conn: Connection,
    seq: int,
    *,
    state: str,
    now: datetime,
    error: str | None,
    result: dict[str, Any] | None = _KEEP,
    fraction: float | None = None,
    message: str | None = None,
) -> None:
    """End a job (succeeded, failed or cancelled): its lease is dropped."""
    values: dict[str, Any] = {
        "state": state,
        "finished_at": now,
        "error": error,
        "lease_id": None,
        "lease_expires_at": None,
    }
    if result is not _KEEP:
        values["result"] = result
    if fraction is not None:
        values["progress_fraction"] = fraction
    if message is not None:
        values["progress_message"] = message
    conn.execute(update(JOBS).where(JOBS.c.seq == seq).values(**values))


def set_encrypted_result(conn: Connection, seq: int, value: dict[str, Any] | None) -> None:
    conn.execute(update(ENVELOPES).where(ENVELOPES.c.job_seq == seq).values(encrypted_result=value))


def requeue(conn: Connection, seqs: Sequence[int], message: str) -> None:
    """Put running jobs back in the queue (their lease is gone)."""
    if seqs:
        conn.execute(
            update(JOBS)
            .where(JOBS.c.seq.in_(list(seqs)))
            .values(
                state=QUEUED,
                worker_id=None,
                lease_id=None,
                lease_expires_at=None,
                progress_fraction=0.0,
                progress_message=message,
            )
        )


def fail(conn: Connection, seq: int, now: datetime, error: str, *, unclaimed: bool) -> None:
    """Fail a job that lost its worker too often (`unclaimed`: one that waited in vain)."""
    values: dict[str, Any] = {"state": "failed", "finished_at": now, "error": error}
    if unclaimed:
        values["progress_message"] = ""
    else:
        values.update(worker_id=None, lease_id=None, lease_expires_at=None)
    conn.execute(update(JOBS).where(JOBS.c.seq == seq).values(**values))


def expired_leases(conn: Connection, now: datetime, limit: int = 500) -> list[Locked]:
    """Running jobs whose lease ended, locked (skipping those another transaction holds)."""
    stmt = (
        _select_locked()
        .where(JOBS.c.state == RUNNING, JOBS.c.lease_expires_at < now)
        .order_by(JOBS.c.seq)
        .limit(limit)
        .with_for_update(skip_locked=True, of=JOBS)
    )
    return _locked(conn, stmt)


def orphaned(conn: Connection, live: ColumnElement[bool], limit: int = 500) -> list[Locked]:
    """Queued confidential jobs none of whose recipients is `live`, locked (skip locked)."""
    has_recipients = select(RECIPIENTS.c.job_seq).where(RECIPIENTS.c.job_seq == JOBS.c.seq)
    live_recipient = (
        select(RECIPIENTS.c.job_seq)
        .join(WORKERS, WORKERS.c.id == RECIPIENTS.c.worker_id)
        .where(RECIPIENTS.c.job_seq == JOBS.c.seq, live)
    )
    stmt = (
        _select_locked()
        .where(JOBS.c.state == QUEUED, has_recipients.exists(), ~live_recipient.exists())
        .order_by(JOBS.c.seq)
        .limit(limit)
        .with_for_update(skip_locked=True, of=JOBS)
    )
    return _locked(conn, stmt)


def apps_waiting_since(conn: Connection, cutoff: datetime) -> list[str]:
    """Apps with a job queued before `cutoff`."""
    stmt = select(JOBS.c.app).where(JOBS.c.state == QUEUED, JOBS.c.created_at < cutoff).distinct()
    return [str(a) for a in conn.scalars(stmt)]


def last_worker_seen(conn: Connection, app: str) -> datetime | None:
    """When a worker of `app` was last live (its last heartbeat, or when it stopped)."""
    stmt = select(func.max(func.coalesce(WORKERS.c.stopped_at, WORKERS.c.last_heartbeat))).where(
        WORKERS.c.app == app
    )
    found: datetime | None = conn.scalar(stmt)
    return found


def queued_before(conn: Connection, app: str, cutoff: datetime, limit: int = 500) -> list[Locked]:
    """`app`'s jobs queued before `cutoff`, locked (skipping those another transaction holds)."""
    stmt = (
        _select_locked()
        .where(JOBS.c.state == QUEUED, JOBS.c.app == app, JOBS.c.created_at < cutoff)
        .order_by(JOBS.c.seq)
        .limit(limit)
        .with_for_update(skip_locked=True, of=JOBS)
    )
    return _locked(conn, stmt)


def worker_live(now_minus_live: datetime) -> ColumnElement[bool]:
    """Workers not stopped whose last heartbeat is at or after `now_minus_live`."""
    return WORKERS.c.stopped_at.is_(None) & (WORKERS.c.last_heartbeat >= now_minus_live)
