"""Verification in the store: runs of jobs compared across workers, workers' reputation,
quarantine and the per-app policy (the rules: `csml.coordinator.verification`).

Every write here runs inside a `Writer` operation (a completion's transaction, after
`csml.store.jobs_end.lock_to_complete` locked the job), never commits, and is one
statement per call. The reads for the operator's views and counts take a pooled
connection or a session.

Invariants:
- A pending run (`job_runs.outcome` NULL) is a run whose result the job's owner has not
  seen: only the accepted run's result is written on the job row (`jobs_end.end`).
- `hold` puts a job back in the queue for another run: `verify_runs` counts the pending
  runs (the claim's party check reads `job_runs` only when it is above 0), and
  `max_attempts` grows by one, so a verification run never uses up a job's attempts.
- Reputation changes are increments (`agreements + 1`) with the quarantine decided in the
  same UPDATE, applied in worker-id order at the end of a completion batch: race-free
  across coordinators, and no two batches lock worker rows in opposite orders.
- A worker quarantined stops counting at once: its pending runs are marked not counting
  in the same transaction (a run recorded before it was caught never decides a job).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, case, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from csml.store.jobs import JOBS, QUEUED, WORKERS
from csml.store.tables import ContributionSetting, JoinToken
from csml.store.tables_confidential import WorkerKey
from csml.store.tables_verification import JobRun

RUNS = cast(Table, JobRun.__table__)
TOKENS = cast(Table, JoinToken.__table__)
SETTINGS = cast(Table, ContributionSetting.__table__)
KEYS = cast(Table, WorkerKey.__table__)


@dataclass(frozen=True, slots=True)
class Standing:
    """A worker's record as stored now, and its app's policy (None: the default)."""

    worker_id: str
    contributor_id: str | None
    agreements: int
    disagreements: int
    quarantined: bool
    policy: str | None


_STANDING = (
    select(
        WORKERS.c.id,
        TOKENS.c.contributor_id,
        WORKERS.c.agreements,
        WORKERS.c.disagreements,
        WORKERS.c.quarantined_at,
        SETTINGS.c.verification,
    )
    .join(TOKENS, TOKENS.c.id == WORKERS.c.join_token_id)
    .outerjoin(SETTINGS, SETTINGS.c.app == WORKERS.c.app)
    .where(WORKERS.c.id == bindparam("worker_id"))
)


def standing(conn: Connection, worker_id: str) -> Standing | None:
    """The worker's record and its app's policy: one statement (None: no such worker)."""
    r = conn.execute(_STANDING, {"worker_id": worker_id}).first()
    if r is None:
        return None
    return Standing(
        worker_id=r.id,
        contributor_id=r.contributor_id,
        agreements=int(r.agreements),
        disagreements=int(r.disagreements),
        quarantined=r.quarantined_at is not None,
        policy=r.verification,
    )


@dataclass(frozen=True, slots=True)
class Run:
    """A run of a job by one worker: its party (None: the operator) and digest."""

    id: int
    worker_id: str
    contributor_id: str | None
    digest: str
    counts: bool
    wall_seconds: float


_PENDING = (
    select(
        RUNS.c.id,
        RUNS.c.worker_id,
        RUNS.c.contributor_id,
        RUNS.c.digest,
        RUNS.c.counts,
        RUNS.c.wall_seconds,
    )
    .where(RUNS.c.job_seq == bindparam("job_seq"), RUNS.c.outcome.is_(None))
    .order_by(RUNS.c.id)
)


def pending_runs(conn: Connection, job_seq: int) -> list[Run]:
    """The job's runs still waiting for its acceptance, oldest first."""
    return [
        Run(r.id, r.worker_id, r.contributor_id, r.digest, bool(r.counts), float(r.wall_seconds))
        for r in conn.execute(_PENDING, {"job_seq": job_seq})
    ]


_ADD_RUN = insert(RUNS).returning(RUNS.c.id)


def add_run(
    conn: Connection,
    job_seq: int,
    run: Run,
    now: datetime,
    *,
    outcome: str | None = None,
    credit: str | None = None,
) -> int:
    """Record a run (pending unless `outcome`); its id."""
    return int(
        conn.execute(
            _ADD_RUN,
            {
                "job_seq": job_seq,
                "worker_id": run.worker_id,
                "contributor_id": run.contributor_id,
                "digest": run.digest,
                "counts": run.counts,
                "wall_seconds": run.wall_seconds,
                "at": now,
                "outcome": outcome,
                "credit": credit,
            },
        ).scalar_one()
    )


_SETTLE = (
    update(RUNS)
    .where(RUNS.c.id == bindparam("run_id"))
    .values(outcome=bindparam("b_outcome"), credit=bindparam("b_credit"))
)


def settle(conn: Connection, outcomes: Sequence[tuple[int, str, str | None]]) -> None:
    """Give pending runs their outcome: (run id, "agreed"|"disagreed", credit)."""
    if outcomes:
        conn.execute(
            _SETTLE, [{"run_id": i, "b_outcome": o, "b_credit": c} for i, o, c in outcomes]
        )


_RECORDS = select(WORKERS.c.id, WORKERS.c.agreements, WORKERS.c.quarantined_at).where(
    WORKERS.c.id.in_(bindparam("ids", expanding=True))
)


def records_of(conn: Connection, worker_ids: Sequence[str]) -> dict[str, tuple[int, bool]]:
    """(agreements, quarantined) of these workers, by id (gone ones are left out)."""
    rows = conn.execute(_RECORDS, {"ids": list(worker_ids)})
    return {r.id: (int(r.agreements), r.quarantined_at is not None) for r in rows}


@dataclass(frozen=True, slots=True)
class Held:
    """A run whose credit was held while its worker was on probation, now released."""

    run_id: int
    job_seq: int
    worker_id: str
    contributor_id: str
    wall_seconds: float


_RELEASE = (
    update(RUNS)
    .where(RUNS.c.worker_id == bindparam("b_worker"), RUNS.c.credit == "held")
    .values(credit="earned")
    .returning(
        RUNS.c.id, RUNS.c.job_seq, RUNS.c.worker_id, RUNS.c.contributor_id, RUNS.c.wall_seconds
    )
)


def release_held(conn: Connection, worker_id: str) -> list[Held]:
    """The worker left probation: its held credit is earned now."""
    return [
        Held(int(r.id), int(r.job_seq), r.worker_id, r.contributor_id, float(r.wall_seconds))
        for r in conn.execute(_RELEASE, {"b_worker": worker_id})
        if r.contributor_id is not None
    ]


def forfeit(conn: Connection, worker_ids: Sequence[str], run_ids: Sequence[int]) -> None:
    """Workers quarantined now: their held credit, and what `run_ids` (this batch) would
    have earned, is forfeit."""
    conn.execute(
        update(RUNS)
        .where(
            RUNS.c.worker_id.in_(list(worker_ids)),
            or_(RUNS.c.credit == "held", RUNS.c.id.in_(list(run_ids) or [-1])),
        )
        .values(credit="forfeit")
    )


_HOLD = (
    update(JOBS)
    .where(JOBS.c.seq == bindparam("job_seq"))
    .values(
        state=QUEUED,
        worker_id=None,
        lease_id=None,
        lease_expires_at=None,
        progress_fraction=0.0,
        progress_message=bindparam("b_message"),
        verify_runs=JOBS.c.verify_runs + 1,
        max_attempts=JOBS.c.max_attempts + 1,
        trusted_only=JOBS.c.trusted_only | bindparam("b_trusted"),
    )
)


def hold(conn: Connection, job_seq: int, message: str, *, trusted_only: bool) -> None:
    """Put a job whose run was recorded back in the queue for another run (`trusted_only`:
    from now on only an operator worker may take it)."""
    conn.execute(_HOLD, {"job_seq": job_seq, "b_message": message, "b_trusted": trusted_only})


def _reputation_update(penalty: int) -> Any:
    agreements = WORKERS.c.agreements + bindparam("b_agree")
    disagreements = WORKERS.c.disagreements + bindparam("b_disagree")
    caught = and_(
        bindparam("b_disagree") > 0,
        agreements - disagreements * penalty < 0,
        WORKERS.c.quarantined_at.is_(None),
    )
    return (
        update(WORKERS)
        .where(WORKERS.c.id == bindparam("worker_id"))
        .values(
            agreements=agreements,
            disagreements=disagreements,
            quarantined_at=case((caught, bindparam("b_now")), else_=WORKERS.c.quarantined_at),
        )
        .returning(WORKERS.c.id, WORKERS.c.agreements, WORKERS.c.quarantined_at)
    )


_VOID = (
    update(RUNS)
    .where(RUNS.c.worker_id.in_(bindparam("workers", expanding=True)), RUNS.c.outcome.is_(None))
    .values(counts=False)
)


@dataclass(frozen=True, slots=True)
class Reputation:
    """A worker's record after a batch's changes."""

    agreements: int
    quarantined: bool
    quarantined_now: bool


def apply_reputation(
    conn: Connection, deltas: Mapping[str, tuple[int, int]], now: datetime, penalty: int
) -> dict[str, Reputation]:
    """Add (agreements, disagreements) to each worker, in worker-id order; a worker whose
    reputation (agreements - penalty x disagreements) falls below 0 by a disagreement is
    quarantined now, and its pending runs stop counting. Each worker's record after."""
    stmt = _reputation_update(penalty)
    after: dict[str, Reputation] = {}
    for worker_id in sorted(deltas):
        agree, disagree = deltas[worker_id]
        row = conn.execute(
            stmt,
            {"worker_id": worker_id, "b_agree": agree, "b_disagree": disagree, "b_now": now},
        ).first()
        if row is None:
            continue  # gone (its identity erased)
        quarantined = row.quarantined_at is not None
        now_caught = quarantined and disagree > 0 and row.quarantined_at == now
        after[worker_id] = Reputation(int(row.agreements), quarantined, now_caught)
    caught = [w for w, r in after.items() if r.quarantined_now]
    if caught:
        conn.execute(_VOID, {"workers": caught})
    return after


# -- the operator's policy, lists and counts ---------------------------------------------


def policies(conn: Connection) -> dict[str, str]:
    """Every app's policy the operator set (apps left out: the default)."""
    rows = conn.execute(
        select(SETTINGS.c.app, SETTINGS.c.verification).where(SETTINGS.c.verification.is_not(None))
    )
    return {str(app): str(policy) for app, policy in rows}


def put_policy(
    session: Session, app: str, policy: str | None, allowed_default: bool, now: datetime
) -> None:
    """Set `app`'s policy (None: back to the default); a new settings row takes the
    contributions default for `allowed`."""
    row = session.get(ContributionSetting, app)
    if row is None:
        session.add(
            ContributionSetting(
                app=app,
                allowed=allowed_default,
                max_workers=None,
                updated_at=now,
                verification=policy,
            )
        )
    else:
        row.verification, row.updated_at = policy, now


@dataclass(frozen=True)
class WorkerRecord:
    """A contributed worker's record, for the operator."""

    id: str
    app: str
    contributor_id: str
    agreements: int
    disagreements: int
    quarantined_at: datetime | None
    stopped_at: datetime | None


def contributed_records(conn: Connection, *, quarantined_only: bool) -> list[WorkerRecord]:
    """Contributed workers with their record (quarantined ones only, or every one that
    has not left), quarantined first, then newest registration first."""
    where = [TOKENS.c.contributor_id.is_not(None)]
    if quarantined_only:
        where.append(WORKERS.c.quarantined_at.is_not(None))
    else:
        where.append(WORKERS.c.stopped_at.is_(None))
    rows = conn.execute(
        select(
            WORKERS.c.id,
            WORKERS.c.app,
            TOKENS.c.contributor_id,
            WORKERS.c.agreements,
            WORKERS.c.disagreements,
            WORKERS.c.quarantined_at,
            WORKERS.c.stopped_at,
        )
        .join(TOKENS, TOKENS.c.id == WORKERS.c.join_token_id)
        .where(*where)
        .order_by(WORKERS.c.quarantined_at.is_(None), WORKERS.c.registered_at.desc())
        .limit(1000)
    )
    return [WorkerRecord(*r) for r in rows]


def contributed_worker_ids(conn: Connection, prefix: str, limit: int = 2) -> list[str]:
    """Contributed workers whose id starts with `prefix`."""
    return list(
        conn.scalars(
            select(WORKERS.c.id)
            .join(TOKENS, TOKENS.c.id == WORKERS.c.join_token_id)
            .where(
                WORKERS.c.id.startswith(prefix, autoescape=True),
                TOKENS.c.contributor_id.is_not(None),
            )
            .order_by(WORKERS.c.id)
            .limit(limit)
        )
    )


def lift_quarantine(conn: Connection, worker_id: str) -> bool:
    """Lift a worker's quarantine: its record starts afresh (on probation again). Whether
    it was quarantined."""
    found = conn.execute(
        update(WORKERS)
        .where(WORKERS.c.id == worker_id, WORKERS.c.quarantined_at.is_not(None))
        .values(quarantined_at=None, agreements=0, disagreements=0)
        .returning(WORKERS.c.id)
    ).first()
    return found is not None


@dataclass(frozen=True)
class TrustCounts:
    """An app's live workers by what the verification rules make of them."""

    attested: int = 0
    probation: int = 0
    quarantined: int = 0


def trust_counts(conn: Connection, heard_after: datetime, probation: int) -> dict[str, TrustCounts]:
    """Per app, its live workers that announced an attestation, and its live contributed
    workers on probation (fewer than `probation` agreements) or quarantined."""
    contributed = TOKENS.c.contributor_id.is_not(None)
    quarantined = WORKERS.c.quarantined_at.is_not(None)
    on_probation = and_(contributed, ~quarantined, WORKERS.c.agreements < probation)
    attested = (
        select(KEYS.c.worker_id)
        .where(KEYS.c.worker_id == WORKERS.c.id, KEYS.c.kind != "none")
        .exists()
    )
    rows = conn.execute(
        select(
            WORKERS.c.app,
            func.sum(case((attested, 1), else_=0)),
            func.sum(case((on_probation, 1), else_=0)),
            func.sum(case((and_(contributed, quarantined), 1), else_=0)),
        )
        .join(TOKENS, TOKENS.c.id == WORKERS.c.join_token_id)
        .where(WORKERS.c.stopped_at.is_(None), WORKERS.c.last_heartbeat >= heard_after)
        .group_by(WORKERS.c.app)
    )
    return {str(app): TrustCounts(int(a or 0), int(p or 0), int(q or 0)) for app, a, p, q in rows}


def runs_of_worker(conn: Connection, worker_id: str) -> list[dict[str, Any]]:
    """Every run a worker made, oldest first (for the operator and the tests)."""
    rows = conn.execute(
        select(
            RUNS.c.job_seq, RUNS.c.digest, RUNS.c.counts, RUNS.c.outcome, RUNS.c.credit, RUNS.c.at
        )
        .where(RUNS.c.worker_id == worker_id)
        .order_by(RUNS.c.id)
    )
    return [dict(r._mapping) for r in rows]
