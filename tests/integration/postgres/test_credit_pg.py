"""Credit priority on PostgreSQL: the credited claim (one UPDATE … RETURNING on the
credited head, out-of-order flag in the same statement), its statement counts, a claim
without any credited identity still five statements, and concurrent claims from the
writer's lanes keeping the bound."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from csml.coordinator.state import Core
from csml.schemas import JobCompletion
from csml.store import credit as ledger
from csml.store.db import counters
from csml.store.tables import utcnow
from tests.clock import SetClock, clock_set
from tests.integration.postgres.support import new_identity, new_worker, submit

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


@pytest.fixture
def clock() -> Iterator[SetClock]:
    with clock_set() as clock:
        yield clock


def give(core: Core, identity: str, seconds: float) -> None:
    """`identity` earns for `seconds` of a run of someone else's job (the real `earn`)."""
    now = utcnow()
    core.writer.run(
        lambda conn: ledger.earn(
            conn,
            ledger.Run("0" * 64, "echo", "w", seconds),
            contributor_id=identity,
            owner_id="someone else",
            now=now,
            max_seconds=600,
        )
    )
    core.queue.credit.touch()


def test_the_credited_claim_serves_ahead_and_debits_on_postgresql(
    core: Core, clock: SetClock
) -> None:
    alice, carol = new_identity(core), new_identity(core)
    give(core, alice, 3.0)
    c = [submit(core, carol, n=i) for i in range(3)]
    a = [submit(core, alice, n=i) for i in range(3)]
    worker = new_worker(core, slots=1)
    served = []
    for _ in range(6):
        [job] = core.queue.claim(worker, 1)
        clock.advance(0.5)
        core.queue.complete(worker, job.id, JobCompletion(lease_id=job.lease_id, state="succeeded"))
        served.append(job.id)
    assert served == [a[0], a[1], c[0], a[2], c[1], c[2]]
    with core.engine.connect() as conn:
        assert ledger.balance_of(conn, alice) == ledger.Balance(2000, 3000, 1000)
        spent = [e.job_id or "" for e in ledger.history(conn, alice, limit=10, before=None)][:2]
    assert sorted(spent) == sorted(a[1:])


def test_claim_statements_with_and_without_credit(core: Core) -> None:
    alice, carol = new_identity(core), new_identity(core)
    worker = new_worker(core)
    # A balance row at zero is no credit: the claim is the plain one.
    give(core, alice, 1.0)
    core.writer.run(
        lambda conn: ledger.spend(
            conn,
            ledger.Run("1" * 64, "echo", "w", 1.0),
            owner_id=alice,
            now=utcnow(),
            max_seconds=600,
        )
    )
    for i in range(4):
        submit(core, carol, n=i)
    core.queue.claim(worker, 1)  # writes the worker's liveness; reads the gate
    tally = counters(core.engine)
    before = tally.statements
    assert len(core.queue.claim(worker, 3)) == 3
    plain = tally.statements - before
    assert plain <= 5, plain

    give(core, alice, 5.0)  # now credited (the gate is read again at the next claim)
    c = [submit(core, carol, n=i) for i in range(2)]
    a = [submit(core, alice, n=i) for i in range(2)]
    assert [j.id for j in core.queue.claim(worker, 1)] == [a[0]]  # in her round: plain
    before = tally.statements
    [job] = core.queue.claim(worker, 1)
    credited = tally.statements - before
    assert job.id == a[1]  # ahead of Carol's c[1], a round earlier
    # Probe, credited take (its out-of-order flag in the same statement), inputs,
    # envelopes: no served rank (it jumped), no plain take.
    assert credited <= 4, credited
    assert [j.id for j in core.queue.claim(worker, 2)] == c
    print(f"\nPostgreSQL claim statements: plain {plain}, through credit {credited}")


def test_concurrent_claims_keep_the_bound(core: Core) -> None:
    alice, carol, dave = new_identity(core), new_identity(core), new_identity(core)
    give(core, alice, 60.0)
    for owner in (carol, dave, alice):
        for i in range(40):
            submit(core, owner, n=i)
    workers = [new_worker(core, slots=1) for _ in range(4)]
    taken: list[list[str]] = [[] for _ in workers]

    def drain(index: int) -> None:
        while True:
            got = core.queue.claim(workers[index], 1)
            if not got:
                return
            taken[index] += [j.id for j in got]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(drain, range(4)))
    every = [i for t in taken for i in t]
    assert len(every) == len(set(every)) == 120
    with core.engine.connect() as conn:
        from sqlalchemy import select

        from csml.store.jobs import JOBS

        rows = conn.execute(
            select(JOBS.c.credit_lease.is_not(None)).order_by(JOBS.c.started_at, JOBS.c.seq)
        ).scalars()
        jumped = [bool(r) for r in rows]
    # Claims are recorded in the window under its lock, in the order they took their
    # jobs; their start stamps may interleave by a little, so allow that slack here.
    assert sum(jumped) <= (len(jumped) + 1) // 2
    assert sum(jumped) >= 20  # credit was used
