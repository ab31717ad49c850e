"""Jobs in the store: how jobs end (completion, cancel, reaping), on a Core `Connection`.

Like `csml.store.jobs_write`, every function runs inside a `Writer` operation's
transaction and returns small frozen rows (`Locked`), never ORM objects.

Invariants:

- Completion locks the jobs it ends (and, on PostgreSQL, their pipelines' parents
  first: the pipelines' lock order) and reads their lease under that lock, so of two
  completions of one job exactly one is kept.
- A plain job's completion (`end_held`) is one `UPDATE … WHERE` its lease is still the
  completing worker's `… RETURNING` the ended job (its columns and, in a subquery, its
  files: what a load of it returns, so the coordinator can hand its owner's event
  streams the ended view without reading it again): the lease check and the end are
  one statement, atomic (the row is locked by the UPDATE itself), so exactly one of two
  completions of a job matches. It matches only a job that needs nothing more than its end (no
  pipeline parent, not confidential, no verification run pending, not a run taken
  by credit priority, not an operation keeping models); any other job, or a lease
  lost, is left unchanged for the locking path to decide and explain. On SQLite the
  plain ends of a batch of completions (`end_held_many`: distinct jobs, one writer, so
  no row-lock order to keep) are one such statement, their values in a VALUES list,
  each row matched against its own job and lease, as `end_held` would one by one.
- The locking path locks its jobs in `seq` order, as a heartbeat's lease extension
  does (`jobs_write.extend_leases`): on PostgreSQL the two, in different writer lanes
  or coordinators, would otherwise deadlock (each holding a row the other waits for,
  until the deadlock check a second later). `end_held` locks one job per statement,
  in the batch's order; a deadlock with an extension (a heartbeat racing its own
  worker's completion of the same jobs) is detected by PostgreSQL and the batch runs
  again (`CONFLICT_RETRIES`).
- The reaper's and `fail_unclaimable`'s selects skip locked rows (SKIP LOCKED): a job
  being completed or cancelled is left for the next round, and no reaper waits.
- `end` drops the lease; it leaves the result as it is unless given one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    bindparam,
    case,
    column,
    exists,
    func,
    select,
    update,
    values,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import BindParameter

from csml.store.jobs import (
    ENVELOPES,
    JOBS,
    PLAIN_JOB_COLUMNS,
    QUEUED,
    RECIPIENTS,
    RUNNING,
    WORKERS,
    JobRow,
    plain_row,
)
from csml.store.prepared import Prepared


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
    # credit, verify: when its run started (a run's wall seconds); the lease of a run
    # taken by credit priority; pending runs (`csml.coordinator.verification`).
    started_at: datetime | None = None
    credit_lease: str | None = None
    verify_runs: int = 0


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
        JOBS.c.started_at,
        JOBS.c.credit_lease,
        JOBS.c.verify_runs,
    )


_CONFIDENTIAL_AT = 12  # `_select_locked`'s columns are `Locked`'s fields, in order
assert list(Locked.__dataclass_fields__)[_CONFIDENTIAL_AT] == "confidential"


def _locked(
    conn: Connection, stmt: Select[Any] | Prepared, params: dict[str, Any] | None = None
) -> list[Locked]:
    rows = (
        stmt.rows(conn, params or {})
        if isinstance(stmt, Prepared)
        else conn.execute(stmt, params).all()
    )
    found = []
    for r in rows:
        values = list(r)
        values[_CONFIDENTIAL_AT] = bool(values[_CONFIDENTIAL_AT])
        found.append(Locked(*values))
    return found


_IDS: BindParameter[Any] = bindparam("ids", expanding=True)
_PARENTS_OF = (
    select(JOBS.c.parent_seq)
    .where(JOBS.c.id.in_(_IDS), JOBS.c.parent_seq.is_not(None))
    .order_by(JOBS.c.parent_seq)
)
_LOCK_SEQS = (
    select(JOBS.c.seq).where(JOBS.c.seq.in_(bindparam("seqs", expanding=True))).with_for_update()
)
# In seq order (the sort is below the row locking on PostgreSQL): every statement that
# locks several running jobs (this, `jobs_write.extend_leases`) takes them in one order,
# so a completion and a heartbeat of one worker's jobs never deadlock.
_LOCK_TO_COMPLETE = Prepared(
    _select_locked().where(JOBS.c.id.in_(_IDS)).order_by(JOBS.c.seq).with_for_update(of=JOBS)
)
_TO_COMPLETE = Prepared(_select_locked().where(JOBS.c.id.in_(_IDS)))


def to_complete(conn: Connection, job_ids: Sequence[str]) -> dict[str, Locked]:
    """What `lock_to_complete` reads, without the lock (one statement, no files): a read
    before the write, e.g. whose inline outputs may be written; the write decides again."""
    return {j.id: j for j in _locked(conn, _TO_COMPLETE, {"ids": list(job_ids)})}


def lock_to_complete(conn: Connection, job_ids: Sequence[str]) -> dict[str, Locked]:
    """Lock these jobs to end them (PostgreSQL: their pipelines' parents first)."""
    params = {"ids": list(job_ids)}
    if conn.dialect.name != "sqlite":
        parents = conn.scalars(_PARENTS_OF, params).all()
        if parents:
            conn.execute(_LOCK_SEQS, {"seqs": list(parents)})
    return {j.id: j for j in _locked(conn, _LOCK_TO_COMPLETE, params)}


@functools.cache
def _end_statement(columns: tuple[str, ...]) -> Prepared:
    """UPDATE of one job's `columns` (bound by their names): built once per set."""
    return Prepared(
        update(JOBS)
        .where(JOBS.c.seq == bindparam("job_seq"))
        .values({c: bindparam(f"b_{c}", type_=JOBS.c[c].type) for c in columns})
    )


_KEEP: Any = object()  # `end`: leave the job's result as it is


@dataclass(frozen=True, slots=True)
class HeldEnd:
    """A completion to try as a plain job's end (`end_held`)."""

    job_id: str
    lease_id: str
    state: str
    result: dict[str, Any] | None
    error: str | None


_SEALED_JOB = exists().where(ENVELOPES.c.job_seq == JOBS.c.seq)


def _held_plain(job_id: Any, lease: Any) -> tuple[ColumnElement[bool], ...]:
    """The conditions of `end_held` and `end_held_many`: job `job_id` is a plain job (no
    pipeline step, verification, credit of this lease, model outputs, sealed envelope)
    running under `lease`, held by worker `b_worker`."""
    return (
        JOBS.c.id == job_id,
        JOBS.c.state == RUNNING,
        JOBS.c.worker_id == bindparam("b_worker"),
        JOBS.c.lease_id == lease,
        JOBS.c.parent_seq.is_(None),
        JOBS.c.verify_runs == 0,
        JOBS.c.credit_lease.is_(None) | (JOBS.c.credit_lease != lease),
        JOBS.c.operation.not_in(bindparam("b_models", expanding=True)),
        ~_SEALED_JOB,
    )


@functools.cache
def _end_held_statement(succeeded: bool) -> Prepared:
    values: dict[str, Any] = {
        "state": bindparam("b_state"),
        "finished_at": bindparam("b_now"),
        "error": bindparam("b_error", type_=JOBS.c.error.type),
        "result": bindparam("b_result", type_=JOBS.c.result.type),
        "lease_id": None,
        "lease_expires_at": None,
    }
    if succeeded:
        values["progress_fraction"] = 1.0
    lease: BindParameter[Any] = bindparam("b_lease")
    return Prepared(
        update(JOBS)
        .where(*_held_plain(bindparam("b_job"), lease))
        .values(values)
        .returning(*PLAIN_JOB_COLUMNS)
    )


def end_held(
    conn: Connection, worker_id: str, done: HeldEnd, now: datetime, models: Sequence[str]
) -> JobRow | None:
    """End a plain job whose lease `worker_id` still holds under `done.lease_id`, in one
    statement (see the invariants); the job as it is now (its columns after the end and
    the files it had: a caller adding outputs adds them to the row too), or None when it
    is not such a job (or not any more): then nothing changed. `models`: the app's
    operations whose outputs become models (their jobs are left to the locking path)."""
    stmt = _end_held_statement(done.state == "succeeded")
    params = {
        "b_job": done.job_id,
        "b_lease": done.lease_id,
        "b_worker": worker_id,
        "b_state": done.state,
        "b_now": now,
        "b_error": done.error,
        "b_result": done.result,
        "b_models": list(models),
    }
    row = stmt.first(conn, params)
    return None if row is None else plain_row(row)


# `end_held_many`'s values per completion: (column of its VALUES, parameter prefix, type).
_HELD_VALUES = (
    ("v_job", "j", String()),
    ("v_lease", "l", String()),
    ("v_state", "s", String()),
    ("v_result", "r", JOBS.c.result.type),
    ("v_error", "e", JOBS.c.error.type),
)
HELD_MANY_MAX = 64  # completions per `end_held_many` statement (more: several statements)


@functools.lru_cache(maxsize=HELD_MANY_MAX)
def _end_held_many_statement(n: int) -> Prepared:
    """`end_held`'s UPDATE for `n` completions at once: their values in a VALUES list
    (`WITH v AS (VALUES …) UPDATE jobs … FROM v`), bound as `j0, l0, s0, r0, e0, j1, …`."""
    held = (
        values(*(column(name, type_) for name, _, type_ in _HELD_VALUES), name="v")
        .data(
            [
                tuple(bindparam(f"{prefix}{i}", type_=type_) for _, prefix, type_ in _HELD_VALUES)
                for i in range(n)
            ]
        )
        .cte("v")
    )
    return Prepared(
        update(JOBS)
        .add_cte(held)
        .where(*_held_plain(held.c.v_job, held.c.v_lease))
        .values(
            state=held.c.v_state,
            finished_at=bindparam("b_now"),
            error=held.c.v_error,
            result=held.c.v_result,
            lease_id=None,
            lease_expires_at=None,
            progress_fraction=case(
                (held.c.v_state == "succeeded", 1.0), else_=JOBS.c.progress_fraction
            ),
        )
        .returning(*PLAIN_JOB_COLUMNS)
    )


def end_held_many(
    conn: Connection,
    worker_id: str,
    held: Sequence[HeldEnd],
    now: datetime,
    models: Sequence[str],
) -> dict[str, JobRow]:
    """`end_held` for several completions (of distinct jobs) at once: the jobs ended, by
    id; one not among them is unchanged, as one `end_held` returns None for. On SQLite
    (one writer: no row locks to take in an order) one statement per `HELD_MANY_MAX`
    completions; on PostgreSQL one `end_held` per completion, in the batch's order (the
    lock order the module docstring asks for)."""
    if len(held) == 1 or conn.dialect.name != "sqlite":
        ended = (end_held(conn, worker_id, done, now, models) for done in held)
        return {row.id: row for row in ended if row is not None}
    assert len({done.job_id for done in held}) == len(held), "one completion per job"
    out: dict[str, JobRow] = {}
    for at in range(0, len(held), HELD_MANY_MAX):
        chunk = held[at : at + HELD_MANY_MAX]
        params: dict[str, Any] = {"b_worker": worker_id, "b_now": now, "b_models": list(models)}
        for i, done in enumerate(chunk):
            params[f"j{i}"] = done.job_id
            params[f"l{i}"] = done.lease_id
            params[f"s{i}"] = done.state
            params[f"r{i}"] = done.result
            params[f"e{i}"] = done.error
        for r in _end_held_many_statement(len(chunk)).rows(conn, params):
            row = plain_row(r)
            out[row.id] = row
    return out


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
    params = {f"b_{c}": v for c, v in values.items()}
    _end_statement(tuple(sorted(values))).run(conn, {**params, "job_seq": seq})


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


# -- placement: jobs waiting for a worker that meets their requirement ------------------


def waiting_requirements(conn: Connection) -> list[tuple[str, str]]:
    """(app, requires_key) of every queued job with a requirement, each pair once."""
    stmt = (
        select(JOBS.c.app, JOBS.c.requires_key)
        .where(JOBS.c.state == QUEUED, JOBS.c.requires_key.is_not(None))
        .distinct()
    )
    return [(str(a), str(k)) for a, k in conn.execute(stmt)]


def set_waiting(
    conn: Connection, app: str, key: str, message: str, prefix: str
) -> list[tuple[str, str]]:
    """On `app`'s queued jobs of requirement `key`: show `message` (it starts with
    `prefix`) where the message is empty or an older one of `prefix`; with `message`
    "", clear the messages of `prefix` (others, e.g. "requeued: ...", stay). The
    (id, owner id) of the jobs changed."""
    mine = JOBS.c.progress_message.startswith(prefix, autoescape=True)
    shown = (JOBS.c.progress_message == "") | mine if message else mine
    changed = conn.execute(
        update(JOBS)
        .where(
            JOBS.c.state == QUEUED,
            JOBS.c.app == app,
            JOBS.c.requires_key == key,
            JOBS.c.progress_message != message,
            shown,
        )
        .values(progress_message=message)
        .returning(JOBS.c.id, JOBS.c.owner_id)
    )
    return [(str(i), str(o)) for i, o in changed]


def queued_requiring_before(
    conn: Connection, app: str, key: str, cutoff: datetime, limit: int = 500
) -> list[Locked]:
    """`app`'s jobs of requirement `key` queued before `cutoff`, locked (skip locked)."""
    stmt = (
        _select_locked()
        .where(
            JOBS.c.state == QUEUED,
            JOBS.c.app == app,
            JOBS.c.requires_key == key,
            JOBS.c.created_at < cutoff,
        )
        .order_by(JOBS.c.seq)
        .limit(limit)
        .with_for_update(skip_locked=True, of=JOBS)
    )
    return _locked(conn, stmt)
