"""Credit: the rule (amounts, who earns, who pays), the k-of-n priority bound, the ledger
through the API, SDK and CLI, and erasure. The clock is set, so wall seconds are exact."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from csml.apps.echo import app as echo_app
from csml.client import Client
from csml.coordinator.credit import Priority, plan, realize
from csml.schemas import ClaimedJob
from csml.store import credit as ledger
from csml.store.jobs_write import Claimed
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import BASE_URL, OPERATOR_TOKEN, HttpWorker, InProcessCoordinator
from tests.unit.test_contributions import contributed_worker
from tests.unit.test_sdk_cli import cli, run

__all__ = ["cli"]  # the CLI fixture, shared with test_sdk_cli

OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


# -- the rule ---------------------------------------------------------------------------


def test_an_amount_is_wall_seconds_times_weight_in_milli_credits() -> None:
    assert ledger.amount(2.5, 1.0, 600) == 2500
    assert ledger.amount(2.5, 2.0, 600) == 5000
    assert ledger.amount(0.0123456, 1.0, 600) == 12  # to the nearest milli-credit
    assert ledger.amount(0.0125, 1.0, 600) == 13  # halves up
    assert ledger.amount(0.0001, 1.0, 600) == 1  # at least one per run
    assert ledger.amount(-3.0, 1.0, 600) == 1  # a clock step back counts as 0 s
    assert ledger.amount(5000.0, 1.0, 600) == 600_000  # never more than the job timeout
    assert ledger.amount(10.0, 0.0, 600) == 0  # weight 0: no credit for the app


# -- the bound --------------------------------------------------------------------------


def windows_hold(handed: list[bool], k: int, n: int) -> bool:
    return all(sum(handed[i : i + n]) <= k for i in range(max(1, len(handed) - n + 1)))


def test_a_plan_gives_credit_at_most_k_of_every_n_positions() -> None:
    assert plan([], 1, 2, 4) == [True, False, True, False]
    assert plan([True], 1, 2, 3) == [False, True, False]
    assert plan([], 2, 5, 6) == [True, True, False, False, False, True]
    assert plan([], 1, 2, 4, plain=0) == [True]  # no plain job to put between two
    assert plan([], 1, 2, 4, plain=1) == [True, False, True]
    assert plan([], 0, 2, 3) == [False, False, False]
    # Unused credit positions are dropped, credited jobs taken in order count as plain.
    assert realize([True, False, True, False, True], credited=2, jumped=1) == [
        True,
        False,
        False,
        False,
    ]


@dataclass
class FakeQueue:
    """A queue for `Priority.claim`: `credited` and `plain` jobs waiting; a credited job
    is out of order with probability `jump`."""

    credited: int
    plain: int
    jump: float
    rng: random.Random
    handed: list[bool]

    def take(self, limit: int, credited: bool) -> list[Claimed]:
        out: list[Claimed] = []
        for _ in range(limit):
            if credited and self.credited:
                self.credited -= 1
                out.append(claimed(by_credit=self.rng.random() < self.jump))
            elif not credited and (self.plain or self.credited):
                if self.plain:
                    self.plain -= 1
                else:
                    self.credited -= 1
                out.append(claimed(by_credit=False))
        return out


def claimed(by_credit: bool) -> Claimed:
    return Claimed(0, "j", "o", "echo", {}, {}, 1, 1, (), None, by_credit=by_credit)


@pytest.mark.parametrize(("k", "n"), [(1, 2), (1, 3), (2, 5), (3, 4)])
def test_the_bound_holds_for_any_claim_sizes_and_outcomes(k: int, n: int) -> None:
    rng = random.Random(k * 100 + n)
    for _ in range(50):
        priority = Priority(k, n)
        queue = FakeQueue(rng.randrange(0, 300), rng.randrange(0, 300), rng.random(), rng, [])
        handed: list[bool] = []
        while queue.credited or queue.plain:
            got = priority.claim("echo", rng.randrange(1, 6), queue.take)
            assert got, "a claim with jobs waiting took none"
            handed += [t.by_credit for t in got]
        # What the coordinator recorded is what it handed out, and the bound holds on it.
        assert sorted(priority.window("echo")[1]) == sorted(handed[-(n - 1) :])
        assert windows_hold(handed, k, n), (k, n, handed)
        assert sum(handed) <= k * (len(handed) + n - 1) // n


def test_the_settings_refuse_a_bound_that_lets_credit_starve_others(
    make_coordinator: MakeCoordinator,
) -> None:
    with pytest.raises(ValueError, match="must be below"):
        make_coordinator(credit_priority_k=2, credit_priority_n=2)


# -- earning and spending through the coordinator ---------------------------------------


def unverified(coordinator: InProcessCoordinator) -> InProcessCoordinator:
    """Credit's rule on its own: echo's results taken as they come (policy `none`, and no
    probation: `verify_probation=0` in the coordinator's settings), as an operator who
    trusts contributors sets it. Verified runs earning: tests/unit/test_verification.py."""
    r = coordinator.http.put(
        "/v1/operator/contributions/echo", json={"verification": "none"}, headers=OPERATOR
    )
    assert r.status_code == 200, r.text
    return coordinator


@pytest.fixture
def open_coordinator(make_coordinator: MakeCoordinator) -> InProcessCoordinator:
    return unverified(make_coordinator(contributions=True, verify_probation=0))


@pytest.fixture
def coordinator(make_coordinator: MakeCoordinator) -> InProcessCoordinator:
    return make_coordinator(verify_probation=0)


def submit(user: Client, count: int, **params: Any) -> list[str]:
    return [user.submit("echo", "echo", params={"n": i, **params}).id for i in range(count)]


def run_one(coordinator: InProcessCoordinator, worker: HttpWorker, seconds: float) -> ClaimedJob:
    [job] = worker.claim()
    coordinator.clock.advance(seconds)
    assert worker.complete(job, result={"ok": True}).status_code == 204
    return job


def earn(
    coordinator: InProcessCoordinator, contributor: Client, seconds: float
) -> tuple[HttpWorker, str]:
    """`contributor`'s worker runs another identity's job for `seconds`."""
    worker = contributed_worker(coordinator, contributor.contribute("echo").token)
    other = coordinator.new_user()
    [job_id] = submit(other, 1)
    assert run_one(coordinator, worker, seconds).id == job_id
    return worker, job_id


def test_a_contributor_earns_for_anothers_accepted_job_and_nothing_else(
    open_coordinator: InProcessCoordinator,
) -> None:
    alice, bob = open_coordinator.new_user(), open_coordinator.new_user()
    worker = contributed_worker(open_coordinator, alice.contribute("echo").token)
    [bobs] = submit(bob, 1)
    run_one(open_coordinator, worker, 2.5)
    mine = alice.credit()
    assert (mine.balance_milli, mine.earned_milli, mine.spent_milli) == (2500, 2500, 0)
    [entry] = mine.entries
    assert (entry.kind, entry.amount_milli, entry.job_id, entry.app, entry.worker_id) == (
        "earned",
        2500,
        bobs,
        "echo",
        worker.id,
    )
    assert mine.credited and (mine.priority.k, mine.priority.n) == (1, 2)
    # Bob's own ledger is empty: he paid nothing (his job was not served by priority).
    assert bob.credit().entries == [] and bob.credit().balance_milli == 0

    # Her own job on her worker, a failed job, and an operator worker earn nothing.
    submit(alice, 1)
    run_one(open_coordinator, worker, 3.0)
    submit(bob, 1)
    [job] = worker.claim()
    open_coordinator.clock.advance(4.0)
    assert worker.complete(job, "failed", error="broken").status_code == 204
    operator = open_coordinator.worker(echo_app)
    submit(bob, 1)
    run_one(open_coordinator, operator, 5.0)
    assert alice.credit().earned_milli == 2500 and len(alice.credit().entries) == 1

    # The operator's weight for the app scales what a second of it is worth.
    r = open_coordinator.http.put(
        "/v1/operator/contributions/echo", json={"credit_weight": 2.0}, headers=OPERATOR
    )
    assert r.status_code == 200 and r.json()["credit_weight"] == 2.0
    submit(bob, 1)
    run_one(open_coordinator, worker, 1.5)
    assert alice.credit().entries[0].amount_milli == 3000
    r = open_coordinator.http.put(
        "/v1/operator/contributions/echo", json={"credit_weight": 0}, headers=OPERATOR
    )
    submit(bob, 1)
    run_one(open_coordinator, worker, 1.5)
    assert alice.credit().earned_milli == 5500


def test_credit_serves_the_credited_identity_ahead_within_the_bound(
    open_coordinator: InProcessCoordinator,
) -> None:
    alice, carol = open_coordinator.new_user(), open_coordinator.new_user()
    earn(open_coordinator, alice, 2.5)
    c = submit(carol, 6)
    a = submit(alice, 6)
    operator = open_coordinator.worker(echo_app, slots=1)
    served = [run_one(open_coordinator, operator, 0.1).id for _ in range(12)]
    # Round-robin alone: c0 a0 c1 a1 ... Credit: Alice's first is in her round (not out of
    # order, free); then every other job is hers, each one round early (paid).
    assert served == [a[0], a[1], c[0], a[2], c[1], a[3], c[2], a[4], c[3], a[5], c[4], c[5]]
    mine = alice.credit(limit=200)
    spent = [e for e in mine.entries if e.kind == "spent"]
    assert sorted(e.job_id or "" for e in spent) == sorted(a[1:])
    assert all(e.amount_milli == 100 and e.worker_id == operator.id for e in spent)
    assert mine.balance_milli == 2500 - 5 * 100 and mine.spent_milli == 500
    assert carol.credit().entries == []  # Carol paid nothing and earned nothing


def test_a_debit_may_take_the_balance_below_zero_then_priority_stops(
    open_coordinator: InProcessCoordinator,
) -> None:
    alice, carol = open_coordinator.new_user(), open_coordinator.new_user()
    earn(open_coordinator, alice, 0.15)  # 150 milli-credits
    c = submit(carol, 5)
    a = submit(alice, 5)
    operator = open_coordinator.worker(echo_app, slots=1)
    served = [run_one(open_coordinator, operator, 0.1).id for _ in range(10)]
    # a1 and a2 jump (150 → 50 → -50), then plain round-robin for what is left.
    assert served[:5] == [a[0], a[1], c[0], a[2], c[1]]
    assert served[5:] == [c[2], c[3], a[3], c[4], a[4]]  # by fair rank, then submission
    mine = alice.credit()
    assert mine.balance_milli == -50 and not mine.credited


def test_a_failed_priority_run_is_paid_a_lost_one_is_not(
    make_coordinator: MakeCoordinator,
) -> None:
    coordinator = unverified(
        make_coordinator(contributions=True, lease_seconds=10, verify_probation=0)
    )
    alice, carol = coordinator.new_user(), coordinator.new_user()
    earn(coordinator, alice, 5.0)
    submit(carol, 3)
    a = submit(alice, 3)
    operator = coordinator.worker(echo_app, slots=1)
    run_one(coordinator, operator, 0.1)  # a0, in her round: free
    [jumped] = operator.claim()
    assert jumped.id == a[1]
    coordinator.clock.advance(0.4)
    assert operator.complete(jumped, "failed", error="it broke").status_code == 204
    run_one(coordinator, operator, 0.1)  # Carol's turn
    [lost] = operator.claim()
    assert lost.id == a[2]
    coordinator.clock.advance(11)  # its worker goes silent: the lease ends
    assert coordinator.reap() == 1
    late = operator.complete(lost, result={})
    assert late.status_code == 409  # the lost run's report is refused, and costs nothing
    spent = [(e.job_id, e.amount_milli) for e in alice.credit().entries if e.kind == "spent"]
    assert spent == [(a[1], 400)]


def test_a_claim_takes_several_credited_jobs_within_the_bound(
    open_coordinator: InProcessCoordinator,
) -> None:
    alice, carol = open_coordinator.new_user(), open_coordinator.new_user()
    earn(open_coordinator, alice, 5.0)
    c = submit(carol, 4)
    a = submit(alice, 4)
    operator = open_coordinator.worker(echo_app, slots=4)
    jobs = operator.claim(4)
    # Positions credit, plain, credit, plain. The plain head is c0 and a0 (round 2); of
    # Alice's next two, a1 is in round 3 as Carol's next (in order, free), a2 jumps c1.
    assert {j.id for j in jobs} == {c[0], a[0], a[1], a[2]}
    # In the plan's order: a2 (credit, out of order), c0, a1 (credit, in order), a0.
    assert [j.id for j in jobs] == [a[2], c[0], a[1], a[0]]
    open_coordinator.clock.advance(1.0)
    for job in jobs:
        assert operator.complete(job, result={}).status_code == 204
    [spent] = [e for e in alice.credit().entries if e.kind == "spent"]
    assert spent.job_id == a[2] and spent.amount_milli == 1000


def owners(coordinator: InProcessCoordinator) -> tuple[list[str], list[str]]:
    """Identity ids of the ledger's rows and of the balances."""
    with coordinator.core.sessions() as session:
        rows = session.scalars(select(ledger.LEDGER.c.identity_id)).all()
        balances = session.scalars(select(ledger.BALANCES.c.identity_id)).all()
    return sorted(rows), sorted(balances)


def test_erasing_the_identity_erases_its_ledger(open_coordinator: InProcessCoordinator) -> None:
    alice, bob = open_coordinator.new_user(), open_coordinator.new_user()
    earn(open_coordinator, alice, 1.0)
    earn(open_coordinator, bob, 1.0)
    rows, balances = owners(open_coordinator)
    assert len(set(rows)) == 2 and len(balances) == 2
    alice.delete_identity()
    rows, balances = owners(open_coordinator)
    assert len(rows) == 1 and balances == rows
    assert bob.credit().earned_milli == 1000


def test_the_operator_sees_totals_never_whose(open_coordinator: InProcessCoordinator) -> None:
    alice = open_coordinator.new_user()
    earn(open_coordinator, alice, 1.25)
    r = open_coordinator.http.get("/v1/operator/credit", headers=OPERATOR)
    assert r.status_code == 200, r.text
    totals = r.json()
    assert totals["earned_milli"] == 1250 and totals["spent_milli"] == 0
    assert totals["credited_identities"] == 1 and totals["outstanding_milli"] == 1250
    assert totals["apps"] == [{"app": "echo", "earned_milli": 1250, "spent_milli": 0, "entries": 1}]
    [alices] = owners(open_coordinator)[1]
    assert alices not in r.text
    user = open_coordinator.http.get(
        "/v1/operator/credit", headers={"Authorization": f"Bearer {alice.token}"}
    )
    assert user.status_code == 401


def test_history_pages_newest_first(open_coordinator: InProcessCoordinator) -> None:
    alice = open_coordinator.new_user()
    worker, _ = earn(open_coordinator, alice, 1.0)
    bob = open_coordinator.new_user()
    for seconds in (2.0, 3.0, 4.0):
        submit(bob, 1)
        run_one(open_coordinator, worker, seconds)
    first = alice.credit(limit=3)
    assert [e.amount_milli for e in first.entries] == [4000, 3000, 2000]
    assert first.next_before == first.entries[-1].id
    rest = alice.credit(limit=3, before=first.next_before)
    assert [e.amount_milli for e in rest.entries] == [1000] and rest.next_before is None
    r = open_coordinator.http.get(
        "/v1/credit", params={"limit": 0}, headers={"Authorization": f"Bearer {alice.token}"}
    )
    assert r.status_code == 422


def test_csml_credit_prints_the_balance_and_ledger(
    cli: CliRunner, coordinator: InProcessCoordinator
) -> None:
    run(cli, "id", "new", "--url", BASE_URL)
    assert "balance  0.000 credits (round-robin only" in run(cli, "credit")
    r = coordinator.http.put(
        "/v1/operator/contributions/echo",
        json={"allowed": True, "verification": "none"},
        headers=OPERATOR,
    )
    assert r.status_code == 200, r.text
    from csml.client.config import UserConfig

    saved = UserConfig.load()
    me = Client(BASE_URL, saved.token or "", transport=coordinator.transport)
    earn(coordinator, me, 1.5)
    out = run(cli, "credit")
    assert "balance  1.500 credits (served by priority" in out and "+1.500" in out
    data = json.loads(run(cli, "credit", "--json"))
    assert data["balance_milli"] == 1500 and data["entries"][0]["kind"] == "earned"


def test_the_migration_goes_up_and_down_on_sqlite_keeping_rows(tmp_path: Path) -> None:
    """0008 adds columns in place (no table copy: see 0007) and its tables; down and up
    again leave the other rows as they were."""
    from sqlalchemy import text

    from csml.store.db import migrate
    from tests.unit.migrations import STAMP, store_at

    with store_at(tmp_path, "0007_contributions") as store:
        with store.engine.connect() as conn:
            conn.execute(
                text(
                    "INSERT INTO identities (id, token_hash, created_at) "
                    f"VALUES ('i', 'ih', {STAMP})"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO contribution_settings (app, allowed, max_workers, updated_at) "
                    f"VALUES ('echo', 1, 2, {STAMP})"
                )
            )
            conn.commit()
        migrate(store.engine)
        with store.engine.connect() as conn:
            weights = conn.execute(text("SELECT credit_weight FROM contribution_settings"))
            assert weights.all() == [(1.0,)]
            conn.execute(
                text(
                    "INSERT INTO credit_ledger (identity_id, at, kind, amount, app) "
                    f"VALUES ('i', {STAMP}, 'earned', 5, 'echo')"
                )
            )
            conn.commit()
            conn.execute(text("DELETE FROM identities WHERE id = 'i'"))  # cascades
            conn.commit()
            assert conn.execute(text("SELECT count(*) FROM credit_ledger")).scalar() == 0
            store.to(conn, "0007_contributions", down=True)
            settings = conn.execute(text("SELECT max_workers FROM contribution_settings"))
            assert settings.all() == [(2,)]
        migrate(store.engine)
