"""Credit in the store: the ledger of each identity, its balance, and the rule's amounts.

The rule (docs/user-guide/credit.md states it for users):

- A run's **amount** is `max(1, round(wall_seconds * weight * 1000))` milli-credits
  (rounded to the nearest, halves up), where
  `wall_seconds` is the time from the claim to the completion report as the coordinator
  saw it (never more than the coordinator's `job_timeout_seconds`, never below 0) and
  `weight` is the app's credit weight (`contribution_settings.credit_weight`, 1.0 when the
  operator set none). A weight of 0 turns credit off for the app: nothing is earned or
  spent there.
- **Earned** (`earn`): once per accepted run of a contributed worker, by the identity
  that contributed it, when that identity does not own the job. Nothing for a failed run.
- **Spent** (`spend`): once per run taken by credit priority (ahead of plain round-robin,
  `jobs.credit_lease`), when its worker reports its end (succeeded or failed), by the
  job's owner. A debit is never clipped: a balance may go below zero (several priority
  runs may be in flight when it reaches zero); an identity whose balance is zero or
  below gets no priority until its earnings lift it above zero.

Invariants:

- `credit_ledger` is append-only: `earn` and `spend` insert one row each and move the
  identity's `credit_balances` row by the same amount in the same transaction (the
  caller's: every function here runs inside a `Writer` operation or a session's
  transaction and never commits). So a balance is always the sum of its ledger.
- An identity sees only its own rows (`history`, `balance_of`); the operator sees only
  totals (`totals`), never whose.
- Erasing an identity deletes its ledger and balance (`erase`; the foreign keys cascade
  too). Other identities' rows naming its jobs keep only the job id, which their own
  worker was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from csml.store.tables import ContributionSetting, Job
from csml.store.tables_credit import CreditBalance, CreditEntry

LEDGER = cast(Table, CreditEntry.__table__)
BALANCES = cast(Table, CreditBalance.__table__)
SETTINGS = cast(Table, ContributionSetting.__table__)
JOBS = cast(Table, Job.__table__)

EARNED, SPENT = "earned", "spent"
MILLI = 1000
DEFAULT_WEIGHT = 1.0


def amount(wall_seconds: float, weight: float, max_seconds: float) -> int:
    """Milli-credits of one run (see the rule): 0 only when the weight is 0."""
    if weight <= 0:
        return 0
    wall = min(max(wall_seconds, 0.0), max_seconds)
    return max(1, int(wall * weight * MILLI + 0.5))  # to the nearest, halves up


def wall_seconds(started_at: datetime | None, now: datetime) -> float:
    """A run's wall time as the coordinator saw it (0 when it never started)."""
    return 0.0 if started_at is None else (now - started_at).total_seconds()


_WEIGHT = select(SETTINGS.c.credit_weight).where(SETTINGS.c.app == bindparam("app"))


def weight(conn: Connection | Session, app: str) -> float:
    """The app's credit weight (1.0 when the operator set none)."""
    found = conn.execute(_WEIGHT, {"app": app}).scalar()
    return DEFAULT_WEIGHT if found is None else float(found)


def _balance_upsert(dialect: str) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    upsert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = upsert(BALANCES).values(
        identity_id=bindparam("b_identity"),
        balance_milli=bindparam("b_delta"),
        earned_milli=bindparam("b_earned"),
        spent_milli=bindparam("b_spent"),
        updated_at=bindparam("b_now"),
    )
    return stmt.on_conflict_do_update(
        index_elements=[BALANCES.c.identity_id],
        set_={
            "balance_milli": BALANCES.c.balance_milli + stmt.excluded.balance_milli,
            "earned_milli": BALANCES.c.earned_milli + stmt.excluded.earned_milli,
            "spent_milli": BALANCES.c.spent_milli + stmt.excluded.spent_milli,
            "updated_at": stmt.excluded.updated_at,
        },
    ).returning(BALANCES.c.balance_milli)


_BALANCE_UPSERT = {dialect: _balance_upsert(dialect) for dialect in ("postgresql", "sqlite")}
_APPEND = insert(LEDGER)


@dataclass(frozen=True, slots=True)
class Posted:
    """A ledger row just written: its amount and the identity's balance after it."""

    amount: int
    balance: int


def _post(
    conn: Connection,
    kind: str,
    identity_id: str,
    milli: int,
    *,
    job_id: str | None,
    app: str,
    worker_id: str | None,
    now: datetime,
) -> Posted:
    conn.execute(
        _APPEND,
        {
            "identity_id": identity_id,
            "at": now,
            "kind": kind,
            "amount": milli,
            "job_id": job_id,
            "app": app,
            "worker_id": worker_id,
        },
    )
    earned = milli if kind == EARNED else 0
    params = {
        "b_identity": identity_id,
        "b_delta": earned - (milli - earned),
        "b_earned": earned,
        "b_spent": milli - earned,
        "b_now": now,
    }
    balance = conn.execute(_BALANCE_UPSERT[conn.dialect.name], params).scalar_one()
    return Posted(milli, int(balance))


@dataclass(frozen=True, slots=True)
class Run:
    """A run that earns or spends: its job, the job's app, the worker that ran it and
    its wall seconds as the coordinator saw it."""

    job_id: str
    app: str
    worker_id: str
    wall_seconds: float


def _charge(
    conn: Connection, kind: str, identity_id: str, run: Run, max_seconds: float, now: datetime
) -> Posted | None:
    milli = amount(run.wall_seconds, weight(conn, run.app), max_seconds)
    if milli <= 0:
        return None
    return _post(
        conn,
        kind,
        identity_id,
        milli,
        job_id=run.job_id,
        app=run.app,
        worker_id=run.worker_id,
        now=now,
    )


def earn(
    conn: Connection,
    run: Run,
    *,
    contributor_id: str | None,
    owner_id: str,
    now: datetime,
    max_seconds: float,
) -> Posted | None:
    """Credit the contributor of the worker that made an accepted run (the rule above);
    None, and nothing written, for an operator's worker (`contributor_id` None), a
    contributor's own job, or an app whose weight is 0. The one place earnings are
    written: `earn_runs` calls it where runs are accepted."""
    if contributor_id is None or contributor_id == owner_id:
        return None
    return _charge(conn, EARNED, contributor_id, run, max_seconds, now)


def spend(
    conn: Connection, run: Run, *, owner_id: str, now: datetime, max_seconds: float
) -> Posted | None:
    """Debit the owner of a run that was taken by credit priority (the rule above; the
    balance may go below zero); None for an app whose weight is 0."""
    return _charge(conn, SPENT, owner_id, run, max_seconds, now)


@dataclass(frozen=True, slots=True)
class Accepted:
    """An accepted run of a contributed worker, by the seq of its job."""

    job_seq: int
    worker_id: str
    contributor_id: str
    wall_seconds: float


_JOBS_OF = select(JOBS.c.seq, JOBS.c.id, JOBS.c.owner_id, JOBS.c.app).where(
    JOBS.c.seq.in_(bindparam("seqs", expanding=True))
)


def earn_runs(
    conn: Connection, runs: Sequence[Accepted], now: datetime, max_seconds: float
) -> list[Posted]:
    """`earn` for each accepted run (its job read once per batch; a job erased since
    earns nothing), in the order of their contributors. What was posted."""
    if not runs:
        return []
    jobs = {r.seq: r for r in conn.execute(_JOBS_OF, {"seqs": sorted({a.job_seq for a in runs})})}
    posted: list[Posted] = []
    # In one order of identities in every transaction: fewer deadlocks between writer
    # lanes (PostgreSQL) on the balance rows.
    for a in sorted(runs, key=lambda a: (a.contributor_id, a.job_seq)):
        job = jobs.get(a.job_seq)
        if job is None:
            continue
        done = earn(
            conn,
            Run(job.id, job.app, a.worker_id, a.wall_seconds),
            contributor_id=a.contributor_id,
            owner_id=job.owner_id,
            now=now,
            max_seconds=max_seconds,
        )
        if done is not None:
            posted.append(done)
    return posted


# -- reads ----------------------------------------------------------------------------

_ANY_CREDITED = select(BALANCES.c.identity_id).where(BALANCES.c.balance_milli > 0).limit(1)


def any_credited(conn: Connection) -> bool:
    """Whether some identity has a positive balance (one index probe)."""
    return conn.execute(_ANY_CREDITED).first() is not None


def credited_owner() -> Any:
    """`identity_id IN (...)` of the identities with a positive balance, for a claim."""
    return select(BALANCES.c.identity_id).where(BALANCES.c.balance_milli > 0)


@dataclass(frozen=True, slots=True)
class Balance:
    """An identity's balance and the sums it comes from, in milli-credits."""

    balance: int
    earned: int
    spent: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger row, as its identity sees it."""

    id: int
    at: datetime
    kind: str
    amount: int
    job_id: str | None
    app: str
    worker_id: str | None


_BALANCE_OF = select(
    BALANCES.c.balance_milli, BALANCES.c.earned_milli, BALANCES.c.spent_milli
).where(BALANCES.c.identity_id == bindparam("identity_id"))


def balance_of(conn: Connection | Session, identity_id: str) -> Balance:
    row = conn.execute(_BALANCE_OF, {"identity_id": identity_id}).first()
    return Balance(0, 0, 0) if row is None else Balance(int(row[0]), int(row[1]), int(row[2]))


def history(
    conn: Connection | Session, identity_id: str, *, limit: int, before: int | None
) -> list[Entry]:
    """The identity's ledger rows, newest first, at most `limit`, with ids below `before`."""
    stmt = select(LEDGER).where(LEDGER.c.identity_id == identity_id)
    if before is not None:
        stmt = stmt.where(LEDGER.c.id < before)
    rows = conn.execute(stmt.order_by(LEDGER.c.id.desc()).limit(limit)).all()
    return [
        Entry(int(r.id), r.at, r.kind, int(r.amount), r.job_id, r.app, r.worker_id) for r in rows
    ]


@dataclass(frozen=True, slots=True)
class AppTotals:
    app: str
    earned: int
    spent: int
    entries: int


@dataclass(frozen=True, slots=True)
class Totals:
    """The ledger's totals (milli-credits), never per identity."""

    earned: int
    spent: int
    entries: int
    identities: int  # with a balance row
    credited: int  # with a positive balance
    outstanding: int  # sum of positive balances
    by_app: tuple[AppTotals, ...]


def totals(conn: Connection | Session) -> Totals:
    by_app: dict[str, dict[str, int]] = {}
    for app, kind, total, count in conn.execute(
        select(LEDGER.c.app, LEDGER.c.kind, func.sum(LEDGER.c.amount), func.count()).group_by(
            LEDGER.c.app, LEDGER.c.kind
        )
    ):
        row = by_app.setdefault(app, {EARNED: 0, SPENT: 0, "entries": 0})
        row[kind] = int(total or 0)
        row["entries"] += int(count)
    positive = BALANCES.c.balance_milli > 0
    ids, credited, outstanding = conn.execute(
        select(
            func.count(),
            func.count().filter(positive),
            func.coalesce(func.sum(BALANCES.c.balance_milli).filter(positive), 0),
        )
    ).one()
    apps = tuple(
        AppTotals(app, v[EARNED], v[SPENT], v["entries"]) for app, v in sorted(by_app.items())
    )
    return Totals(
        earned=sum(a.earned for a in apps),
        spent=sum(a.spent for a in apps),
        entries=sum(a.entries for a in apps),
        identities=int(ids),
        credited=int(credited),
        outstanding=int(outstanding),
        by_app=apps,
    )


def erase(session: Session, identity_id: str) -> None:
    """Delete the identity's ledger and balance (in the erasure's transaction)."""
    session.execute(delete(LEDGER).where(LEDGER.c.identity_id == identity_id))
    session.execute(delete(BALANCES).where(BALANCES.c.identity_id == identity_id))
