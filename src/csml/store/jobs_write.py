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
  waits on another. On PostgreSQL a claim in fair order (not credited) moves it in the
  same statement (the claim's UPDATE in a data-modifying CTE, then the app's row:
  `_take_serving_statement`), a round trip fewer per claim; on SQLite (no UPDATE in a
  CTE) it is a second statement. On SQLite the write lock taken at BEGIN stands for the
  row locks.
- A fair rank is one past the larger of its owner's last rank in the app (an upsert of
  the owner's `fair_counters` row, no app lock) and the app's served rank. A single
  job's submission admits the job (identity, queued + running jobs, stored bytes) in
  that same upsert's condition (`next_rank(admission=...)`): submitting a job without
  a requirement, model or envelope is two statements (rank, job row) on SQLite. On
  PostgreSQL it is the identity's lock, then the rank's upsert as a data-modifying CTE
  with the job's row inserted from its RETURNING (`locked_insert_job`; no row when it
  admits nothing), the two sent together in one round trip (`prepared.rows_together`:
  the server still runs the second after the first holds the lock, with a snapshot
  taken then, so the admission reads counts no other holder of the lock can change).
- Credit priority (`take(credited=True)`, chosen by `csml.coordinator.credit`) is the
  same one statement on the head of the jobs of identities with a positive balance; a
  job it takes out of order keeps the lease in `credit_lease` (its completion debits the
  owner) and does not move the served rank. The plain claim is unchanged by it.
- Placement: a claim takes a job with a `requires_key` only if the key is among those
  the caller says the worker meets (`met`); with warm keys, it takes the jobs whose
  `warm_key` is among them first, but only among the first `window` claimable jobs in
  fair order (locking only the rows it takes). Still one statement either way.
- The claim's RETURNING says per job whether it is sealed and returns its input files
  (one JSON array per job, `INPUT_FILES_OF_JOB`): envelopes are read only for jobs that
  have them (a claim of plain jobs, with or without inputs, is the claim statement and
  the served-rank update, nothing more: one statement on PostgreSQL).
- A heartbeat's lease extension locks the worker's running jobs in `seq` order, the
  order a completion's locking path locks them in (`jobs_end.lock_to_complete`): on
  PostgreSQL the two, in different writer lanes or coordinators, never deadlock. A
  plain job's one-statement end (`jobs_end.end_held`) locks one row per statement; if
  one ever meets an extension in a cycle, PostgreSQL breaks it and the batch reruns.

Ends (completion, cancel, reaping) are in `csml.store.jobs_end`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    and_,
    bindparam,
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
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from csml.store.abuse import WINDOW_COUNT_PG
from csml.store.credit import credited_owner
from csml.store.jobs import (
    APPS,
    COUNTERS,
    ENVELOPES,
    FILES,
    INPUT_FILES_OF_JOB,
    JOBS,
    PLACEMENT_KEYS,
    QUEUED,
    RECIPIENTS,
    RUNNING,
    WORKERS,
    Claimant,
    FileRow,
    claimable,
    claimant_key,
    claimant_params,
    files_of,
)
from csml.store.jobs_quota import LOCK_IDENTITY_PG, Admission, admits
from csml.store.prepared import Prepared, rows_together
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
    requires_key: str | None = None  # placement: see `add_requirement_key`
    warm_key: str | None = None  # placement: `csml.placement.warm_key` of its model input
    trusted_only: bool = False  # verify: operator workers only
    min_reputation: int | None = None  # verify: the least reputation of a contributed worker


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


def _rank_upsert(dialect: str, admission: tuple[bool, bool] | None = None) -> Prepared:
    """INSERT ... SELECT from the app's row (so no row at all for an unknown app) ...
    ON CONFLICT DO UPDATE: the app's served rank is read by the upsert itself. With an
    `admission` key, the SELECT also has the new job's quotas as its condition
    (`csml.store.jobs_quota.admits`): no row either when they refuse it."""
    from sqlalchemy.dialects import postgresql, sqlite

    upsert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    first = select(
        APPS.c.name, bindparam("b_owner", type_=COUNTERS.c.owner_id.type), APPS.c.served_rank + 1
    ).where(APPS.c.name == bindparam("b_app"))
    if admission is not None:
        first = first.where(admits(*admission))
    stmt = upsert(COUNTERS).from_select(
        [COUNTERS.c.app, COUNTERS.c.owner_id, COUNTERS.c.last_rank], first
    )
    # The new row's last_rank is served + 1: one past the larger of last_rank and served.
    served_next = stmt.excluded.last_rank
    return Prepared(
        stmt.on_conflict_do_update(
            index_elements=[COUNTERS.c.app, COUNTERS.c.owner_id],
            set_={
                "last_rank": case(
                    (COUNTERS.c.last_rank >= served_next, COUNTERS.c.last_rank + 1),
                    else_=served_next,
                )
            },
        ).returning(COUNTERS.c.last_rank)
    )


_RANK_UPSERT = {dialect: _rank_upsert(dialect) for dialect in ("postgresql", "sqlite")}


@functools.cache
def _admitting_rank_upsert(dialect: str, active: bool, stored: bool) -> Prepared:
    return _rank_upsert(dialect, (active, stored))


def next_rank(
    conn: Connection, app: str, owner_id: str, admission: Admission | None = None
) -> int | None:
    """One past the larger of the owner's last rank in `app` and the rank `app` last
    served, in one upsert of the owner's counter row that reads the app's row itself
    (one owner's submissions queue on their own row only); None if there is no such app.

    With an `admission` (of `owner_id`), the same statement admits the new job: None
    also when the owner is gone or past a quota (`jobs_quota.admits`; race-free under
    the conditions said there), and then nothing is written. The caller tells which."""
    if admission is None:
        stmt = _RANK_UPSERT[conn.dialect.name]
        params: dict[str, Any] = {"b_app": app, "b_owner": owner_id}
    else:
        assert admission.identity_id == owner_id, "a job is admitted for its owner"
        stmt = _admitting_rank_upsert(conn.dialect.name, *admission.key)
        params = {"b_app": app, "b_owner": owner_id, **admission.params()}
    rank = stmt.scalar(conn, params)
    return None if rank is None else int(rank)


# A new job's columns as `insert_job` writes them (bound as "j_<column>"), but its rank.
_JOB_COLUMNS = (
    "id",
    "owner_id",
    "app",
    "operation",
    "params",
    "limits",
    "state",
    "created_at",
    "attempts",
    "max_attempts",
    "progress_fraction",
    "progress_message",
    "requires_key",
    "warm_key",
    "trusted_only",
    "min_reputation",
    "verify_runs",
)


@functools.cache
def _ranked_insert(active: bool, stored: bool) -> Prepared:
    """(PostgreSQL) The admitting rank upsert (`_rank_upsert`) as a data-modifying CTE and
    the job's row inserted from its RETURNING, in one statement: no row at all when the
    upsert wrote none (refused, or no such app). Returns the job's seq and rank."""
    from sqlalchemy.dialects import postgresql

    ranked = _rank_upsert("postgresql", (active, stored)).stmt
    rank = cast(Any, ranked).cte("ranked")
    values = [bindparam(f"j_{name}", type_=JOBS.c[name].type) for name in _JOB_COLUMNS]
    stmt = (
        postgresql.insert(JOBS)
        .from_select(
            [*_JOB_COLUMNS, "fair_rank"],
            select(*values, rank.c.last_rank),
            include_defaults=False,
        )
        .add_cte(rank)
        .returning(JOBS.c.seq, JOBS.c.fair_rank)
    )
    return Prepared(stmt)


def locked_insert_job(
    conn: Connection,
    job: NewJob,
    admission: Admission,
    window: Mapping[str, Any] | None = None,
) -> tuple[bool, tuple[int, int] | None, tuple[datetime, int] | None]:
    """(PostgreSQL) The owner's identity lock (`jobs_quota.lock_identity`), then
    `next_rank(admission=...)` and `insert_job(job)` (no files, no envelope: the caller
    adds its files after) as one statement, the two sent together
    (`prepared.rows_together`): one round trip where they were three. Whether the
    identity was there to lock, and the job's (seq, rank), or None when the upsert
    admitted nothing (then nothing was written: the caller finds out why, as after
    `next_rank`). `job.fair_rank` is not used. With a `window` (`abuse.window_params` of
    the owner's submission window), its count's upsert goes between the two (in the
    order of the statements one by one: identity, window, rank) and the window as
    counted comes third (`abuse.window_wait` says whether it stands: if not, the caller
    fails its write, which takes back the count and the job). Race-free as the
    statements one by one: the server runs each after the lock is held, and its
    snapshot (READ COMMITTED: taken when it starts) sees every transaction that held
    the identity's row before."""
    owner_id = job.owner_id
    assert admission.identity_id == owner_id, "a job is admitted for its owner"
    params: dict[str, Any] = {"b_app": job.app, "b_owner": owner_id, **admission.params()}
    params.update((f"j_{name}", value) for name, value in _job_values(job).items())
    calls: list[tuple[Prepared, Mapping[str, Any]]] = [
        (LOCK_IDENTITY_PG, {"identity_id": owner_id})
    ]
    if window is not None:
        calls.append((WINDOW_COUNT_PG, window))
    calls.append((_ranked_insert(*admission.key), params))
    answers = rows_together(conn, calls)
    locked, inserted = answers[0], answers[-1]
    counted = (answers[1][0][0], int(answers[1][0][1])) if window is not None else None
    landed = (int(inserted[0][0]), int(inserted[0][1])) if inserted else None
    return bool(locked), landed, counted


_INSERT_JOB = Prepared(insert(JOBS).returning(JOBS.c.seq))


def _job_values(job: NewJob) -> dict[str, Any]:
    """A new queued job's row, every column but its fair rank (`_JOB_COLUMNS`)."""
    return {
        "id": job.id,
        "owner_id": job.owner_id,
        "app": job.app,
        "operation": job.operation,
        "params": job.params,
        "limits": job.limits,
        "state": QUEUED,
        "created_at": job.created_at,
        "attempts": 0,
        "max_attempts": job.max_attempts,
        "progress_fraction": 0.0,
        "progress_message": "",
        "requires_key": job.requires_key,
        "warm_key": job.warm_key,
        "trusted_only": job.trusted_only,
        "min_reputation": job.min_reputation,
        "verify_runs": 0,
    }


_INSERT_FILES = insert(FILES)
_INSERT_FILE = Prepared(_INSERT_FILES)


def insert_job(
    conn: Connection, job: NewJob, files: Sequence[FileRow], sealing: Sealing | None
) -> int:
    """Insert a queued job with its files (and envelope); its seq."""
    seq = _INSERT_JOB.scalar(conn, {**_job_values(job), "fair_rank": job.fair_rank})
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


def _key_insert(dialect: str) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    upsert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        upsert(PLACEMENT_KEYS)
        .values(
            app=bindparam("b_app"),
            key=bindparam("b_key"),
            requires=bindparam("b_requires", type_=JSON()),
            used_at=bindparam("b_now"),
        )
        .on_conflict_do_update(
            index_elements=[PLACEMENT_KEYS.c.app, PLACEMENT_KEYS.c.key],
            set_={"used_at": bindparam("b_now")},
        )
    )


_KEY_INSERT = {dialect: _key_insert(dialect) for dialect in ("postgresql", "sqlite")}


def add_requirement_key(
    conn: Connection, app: str, key: str, requires: dict[str, Any], now: datetime
) -> None:
    """Make `key` (of `requires`) known to `app`'s claims, or stamp it used: only a
    submission with a requirement calls this, before inserting its job (the row stays
    locked until the submission commits, so the sweep never drops it under the job)."""
    params = {"b_app": app, "b_key": key, "b_requires": requires, "b_now": now}
    conn.execute(_KEY_INSERT[conn.dialect.name], params)


def add_files(conn: Connection, seq: int, files: Sequence[FileRow]) -> None:
    """Insert the job's file rows: one file (a photo's input, or its output) as a
    `Prepared` insert, more as one executemany. A blob kept in the database goes in
    with its bytes (`FileRow.content`), in the caller's transaction."""
    rows = [
        {
            "job_seq": seq,
            "kind": f.kind,
            "name": f.name,
            "size": f.size,
            "sha256": f.sha256,
            "media_type": f.media_type,
            "blob": f.blob,
            "model_id": f.model_id,
            "content": f.content,
        }
        for f in files
    ]
    if len(rows) == 1:
        _INSERT_FILE.run(conn, rows[0])
    elif rows:
        conn.execute(_INSERT_FILES, rows)


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
    # credit: taken by credit priority out of order (see `take(credited=True)`).
    by_credit: bool = False
    # Its progress as stored (a claim does not reset it): what the next heartbeat
    # compares with (`csml.coordinator.lease_memo`).
    progress_fraction: float = 0.0
    progress_message: str = ""


_STOP_WORKER = (
    update(WORKERS)
    .where(WORKERS.c.id == bindparam("worker_id"))
    .values(stopped_at=bindparam("b_now"))
)
# A liveness stamp never waits: if another transaction holds the worker's row (a stamp
# of the same worker from another writer lane or coordinator, or a reputation update), it
# is skipped; the other one writes the worker as live too, or the next stamp does. (Two
# lanes' batches stamping the same workers in different orders deadlocked on PostgreSQL.)
_STAMP_WORKER = Prepared(
    update(WORKERS)
    .where(
        WORKERS.c.id.in_(
            select(WORKERS.c.id)
            .where(WORKERS.c.id == bindparam("worker_id"))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(last_heartbeat=bindparam("b_now"))
)


def stop_worker(conn: Connection, worker_id: str, now: datetime) -> None:
    """Mark the worker as gone (it left the cluster)."""
    conn.execute(_STOP_WORKER, {"worker_id": worker_id, "b_now": now})


def stamp_worker(conn: Connection, worker_id: str, now: datetime) -> None:
    """Write the worker's liveness (skipped if its row is held elsewhere: see above)."""
    _STAMP_WORKER.run(conn, {"worker_id": worker_id, "b_now": now})


# The claim takes nothing for a stopped worker (left, or its join token revoked), even
# in a long-poll that authenticated before it was stopped: part of the claim statement.
_WORKER_LIVE = (
    select(WORKERS.c.id)
    .where(WORKERS.c.id == bindparam("b_worker"), WORKERS.c.stopped_at.is_(None))
    .exists()
)
_MET: BindParameter[Any] = bindparam("b_met", expanding=True)
# credit: a job taken by credit priority is out of order when a job of an identity
# without credit waits in an earlier round (a lower fair rank) of the app: that run
# remembers its lease.
_AHEAD = JOBS.alias("ahead")
_JUMPS = (
    select(_AHEAD.c.seq)
    .where(
        _AHEAD.c.app == bindparam("b_app"),
        _AHEAD.c.state == QUEUED,
        _AHEAD.c.fair_rank < JOBS.c.fair_rank,
        _AHEAD.c.owner_id.not_in(credited_owner()),
    )
    .correlate(JOBS)
    .exists()
)
PLAIN, WARM, CREDITED = "plain", "warm", "credited"
# Returned by the claim for each job taken: whether it is sealed (confidential) and its
# input files, so a claim of plain jobs reads nothing more (these were a `SELECT EXISTS
# job_confidential` and a `SELECT job_files` per claim).
# SQLite renders RETURNING's columns unqualified (`WHERE job_seq = seq`): `seq` is the
# claimed job's only because neither inner table has a column of that name.
assert "seq" not in ENVELOPES.c and "seq" not in FILES.c
_HAS_ENVELOPE = exists().where(ENVELOPES.c.job_seq == JOBS.c.seq).label("sealed")

# The claim's RETURNING, in this order (the last only for a credited claim), and the
# position of each column in its rows: `take` reads the rows `Prepared` returns (plain
# tuples, no object made per row) by these names.
_TAKEN: tuple[Any, ...] = (
    JOBS.c.seq,
    JOBS.c.id,
    JOBS.c.owner_id,
    JOBS.c.operation,
    JOBS.c.params,
    JOBS.c.limits,
    JOBS.c.attempts,
    JOBS.c.fair_rank,
    JOBS.c.progress_fraction,
    JOBS.c.progress_message,
    _HAS_ENVELOPE,
    INPUT_FILES_OF_JOB,
    JOBS.c.credit_lease,
)
(
    _T_SEQ,
    _T_ID,
    _T_OWNER_ID,
    _T_OPERATION,
    _T_PARAMS,
    _T_LIMITS,
    _T_ATTEMPTS,
    _T_FAIR_RANK,
    _T_PROGRESS_FRACTION,
    _T_PROGRESS_MESSAGE,
    _T_SEALED,
    _T_INPUTS,
    _T_CREDIT_LEASE,
) = range(len(_TAKEN))


@functools.cache
def _take_statement(head: str, contributed: bool, quarantined: bool, operations: bool) -> Prepared:
    """The claim statement, built once per variant. `head`: `PLAIN`, the claimable jobs
    in fair order; `WARM`, of the first `b_window` of those (not locked), the ones whose
    `warm_key` is in `b_warm` first, then fair order (only the rows taken are locked,
    each checked again to be queued); `CREDITED`, only jobs of identities with a positive
    balance, in fair order. The worker flags are a contributed worker's filters
    (`claimable`); an operator worker's plain claim (all False) is the one of before."""
    where = and_(
        claimable(
            bindparam("b_worker"),
            bindparam("b_app"),
            _MET,
            contributed=contributed,
            quarantined=quarantined,
            operations=operations,
        ),
        _WORKER_LIVE,
    )
    if head == WARM:
        window = (
            select(JOBS.c.seq)
            .where(where)
            .order_by(JOBS.c.fair_rank, JOBS.c.seq)
            .limit(bindparam("b_window"))
            .scalar_subquery()
        )
        order: tuple[Any, ...] = (
            case((JOBS.c.warm_key.in_(bindparam("b_warm", expanding=True)), 0), else_=1),
            JOBS.c.fair_rank,
            JOBS.c.seq,
        )
        where = and_(JOBS.c.seq.in_(window), JOBS.c.state == QUEUED)
    else:
        order = (JOBS.c.fair_rank, JOBS.c.seq)
        if head == CREDITED:
            where = and_(where, JOBS.c.owner_id.in_(credited_owner()))
    heads = (
        select(JOBS.c.seq)
        .where(where)
        .order_by(*order)
        .limit(bindparam("max_jobs"))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    values: dict[str, Any] = {
        "state": RUNNING,
        "worker_id": bindparam("b_worker"),
        "lease_id": bindparam("b_lease"),
        "lease_expires_at": bindparam("b_until"),
        "started_at": bindparam("b_now"),
        "attempts": JOBS.c.attempts + 1,
        "error": None,
    }
    returned = _TAKEN
    if head == CREDITED:
        values["credit_lease"] = case((_JUMPS, bindparam("b_lease")), else_=None)
    else:
        returned = _TAKEN[:_T_CREDIT_LEASE]
    return Prepared(update(JOBS).where(JOBS.c.seq.in_(heads)).values(**values).returning(*returned))


@functools.cache
def _take_serving_statement(
    head: str, contributed: bool, quarantined: bool, operations: bool
) -> Prepared:
    """(PostgreSQL, not `CREDITED`: every job taken is in order) the claim statement and
    the served rank's move (`_SERVE`) as one: the claim's UPDATE in a data-modifying
    CTE, the app's row updated from the largest fair rank it returned (none taken: NULL,
    no row matches), its rows selected. Same locks, same order (the app's row is
    updated after the jobs' rows are locked, as by the second statement before), one
    round trip fewer per claim."""
    take = _take_statement(head, contributed, quarantined, operations).stmt
    assert isinstance(take, Update)  # the claim's UPDATE ... RETURNING
    taken = take.cte("taken")
    served = _serve(select(func.max(taken.c.fair_rank)).scalar_subquery()).cte("served")
    return Prepared(select(*taken.c).add_cte(served))


_TAKE = _take_statement(PLAIN, False, False, False)


# The served rank moves up unless another transaction holds the app's row (then that
# one moves it, or the next claim does): a claim never waits on it.
def _serve(top: ColumnElement[Any]) -> Update:
    """The app's (`b_app`) served rank moved up to `top` unless another transaction holds
    its row (SKIP LOCKED) or it is there already."""
    return (
        update(APPS)
        .where(
            APPS.c.name.in_(
                select(APPS.c.name)
                .where(APPS.c.name == bindparam("b_app"), APPS.c.served_rank < top)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
        )
        .values(served_rank=top)
    )


_SERVE = Prepared(_serve(bindparam("b_top")))
_SEQS: BindParameter[Any] = bindparam("seqs", expanding=True)
_SEALED = (
    select(
        ENVELOPES.c.job_seq,
        ENVELOPES.c.job_nonce,
        ENVELOPES.c.result_public_key,
        ENVELOPES.c.encrypted_params,
        RECIPIENTS.c.wrapped_key,
    )
    .join(RECIPIENTS, RECIPIENTS.c.job_seq == ENVELOPES.c.job_seq)
    .where(ENVELOPES.c.job_seq.in_(_SEQS), RECIPIENTS.c.worker_id == bindparam("worker_id"))
)


def take(
    conn: Connection,
    worker_id: str,
    app: str,
    max_jobs: int,
    lease_id: str,
    now: datetime,
    lease_until: datetime,
    *,
    met: Sequence[str] = (),
    warm: Sequence[str] = (),
    window: int = 0,
    credited: bool = False,
    claimant: Claimant | None = None,
) -> list[Claimed]:
    """Claim up to `max_jobs` of the queue head for this worker (see the invariants), in
    claim order. A worker that has left or whose join token was revoked (`stopped_at`)
    takes nothing, even in a claim that was already waiting when it was stopped.

    Placement: a job with a requirement is taken only if its key is in `met` (the keys
    whose requirement this worker's labels meet); with `warm` keys and a `window`, jobs
    whose `warm_key` is among them go first among the first `window` claimable jobs.

    `credited` (credit priority, `csml.coordinator.credit`): only jobs of identities
    with a positive balance, lowest fair rank first (warm keys play no part then); one
    taken out of order (see `_JUMPS`) comes back with `by_credit` and its job keeps this
    lease in `credit_lease`; the served rank moves only for those taken in order.

    `claimant`: a contributed worker's filters (None: an operator worker)."""
    params = {
        "b_worker": worker_id,
        "b_app": app,
        "max_jobs": max_jobs,
        "b_lease": lease_id,
        "b_until": lease_until,
        "b_now": now,
        "b_met": list(met),
        **claimant_params(claimant),
    }
    if credited:
        head = CREDITED
    elif warm and window > 0:
        head = WARM
        params.update(b_warm=list(warm), b_window=max(window, max_jobs))
    else:
        head = PLAIN
    serving = head != CREDITED and conn.dialect.name == "postgresql"
    statement = _take_serving_statement if serving else _take_statement
    rows = statement(head, *claimant_key(claimant)).rows(conn, params)
    if not rows:
        return []
    jumped = {r[_T_SEQ] for r in rows if r[_T_CREDIT_LEASE] is not None} if credited else set()
    in_order = [r[_T_FAIR_RANK] for r in rows if r[_T_SEQ] not in jumped]
    if in_order and not serving:  # served by the claim statement itself on PostgreSQL
        _SERVE.run(conn, {"b_app": app, "b_top": max(in_order)})
    sealed: dict[int, Sealed] = {}
    with_envelope = [r[_T_SEQ] for r in rows if r[_T_SEALED]]
    if with_envelope:
        for seq, nonce, result_key, params, wrapped in conn.execute(
            _SEALED, {"seqs": with_envelope, "worker_id": worker_id}
        ):
            sealed[seq] = Sealed(nonce, wrapped, result_key, params)
    return [
        Claimed(
            seq=r[_T_SEQ],
            id=r[_T_ID],
            owner_id=r[_T_OWNER_ID],
            operation=r[_T_OPERATION],
            params=r[_T_PARAMS],
            limits=r[_T_LIMITS],
            attempts=r[_T_ATTEMPTS],
            fair_rank=r[_T_FAIR_RANK],
            inputs=files_of(r[_T_INPUTS]),
            sealed=sealed.get(r[_T_SEQ]),
            by_credit=r[_T_SEQ] in jumped,
            progress_fraction=r[_T_PROGRESS_FRACTION],
            progress_message=r[_T_PROGRESS_MESSAGE],
        )
        for r in sorted(rows, key=_claim_order)
    ]


def _claim_order(row: tuple[Any, ...]) -> tuple[int, int]:
    """A taken row's place in claim order: fair rank, then seq (its `ORDER BY`)."""
    return row[_T_FAIR_RANK], row[_T_SEQ]


@dataclass(frozen=True, slots=True)
class Held:
    """A running job whose lease a heartbeat extended: its progress as stored."""

    owner_id: str
    progress_fraction: float
    progress_message: str


_HELD_BY = (
    tuple_(JOBS.c.id, JOBS.c.lease_id).in_(bindparam("leases", expanding=True)),
    JOBS.c.state == RUNNING,
    JOBS.c.worker_id == bindparam("b_worker"),
)
# The rows are locked in seq order by the subquery (PostgreSQL; SQLite has no row
# locks), the order a completion locks them in (`jobs_end.lock_to_complete`): an
# UPDATE's own scan would lock them in whatever order its plan visits them.
_EXTEND = Prepared(
    update(JOBS)
    .where(
        JOBS.c.seq.in_(select(JOBS.c.seq).where(*_HELD_BY).order_by(JOBS.c.seq).with_for_update())
    )
    .values(lease_expires_at=bindparam("b_until"))
    .returning(JOBS.c.id, JOBS.c.owner_id, JOBS.c.progress_fraction, JOBS.c.progress_message)
)
_PROGRESS = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_job"), JOBS.c.lease_id == bindparam("b_lease"))
    .values(progress_fraction=bindparam("b_fraction"), progress_message=bindparam("b_message"))
)


def extend_leases(
    conn: Connection, worker_id: str, leases: Sequence[tuple[str, str]], until: datetime
) -> dict[str, Held]:
    """Extend the leases (job id, lease id) this worker still holds; those held, by id."""
    if not leases:
        return {}
    params = {"leases": list(leases), "b_worker": worker_id, "b_until": until}
    return {r[0]: Held(*r[1:]) for r in _EXTEND.rows(conn, params)}


def set_progress(
    conn: Connection, job_id: str, lease_id: str, fraction: float, message: str
) -> None:
    params = {"b_job": job_id, "b_lease": lease_id, "b_fraction": fraction, "b_message": message}
    conn.execute(_PROGRESS, params)
