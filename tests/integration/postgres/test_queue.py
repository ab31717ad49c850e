"""The job queue on a real PostgreSQL server: lifecycle, fairness, bounds, leases, cancel."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event, select

from csml.coordinator.errors import from_refusal, status_of
from csml.coordinator.state import Core
from csml.refusals import Refusal
from csml.schemas import Heartbeat, JobCompletion, Progress, RunningJob
from csml.schemas.workers import BatchedCompletion
from csml.store.tables import AppRecord, Job
from tests.clock import SetClock, clock_set
from tests.integration.postgres.support import (
    MakeCore,
    echo,
    expire_leases,
    job_row,
    new_identity,
    new_worker,
    states,
    submit,
)

# Starts a private PostgreSQL server (initdb) for the session's first test.
pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


@pytest.fixture
def clock() -> Iterator[SetClock]:
    """The coordinator's time, set by the test (leases end without sleeping)."""
    with clock_set() as clock:
        yield clock


def done(lease_id: str, **result: object) -> JobCompletion:
    return JobCompletion(lease_id=lease_id, state="succeeded", result=dict(result))


def beat(*pairs: tuple[str, str], fraction: float = 0.5) -> Heartbeat:
    return Heartbeat(
        running=[
            RunningJob(job_id=j, lease_id=lease, progress=Progress(fraction=fraction, message="m"))
            for j, lease in pairs
        ]
    )


def test_submit_claim_heartbeat_complete(core: Core, clock: SetClock) -> None:
    owner = new_identity(core)
    worker = new_worker(core)
    job_id = submit(core, owner, word="hello")
    queued = job_row(core, job_id)
    assert (queued.state, queued.attempts, queued.fair_rank) == ("queued", 0, 1)
    assert queued.limits["timeout_seconds"] == core.settings.job_timeout_seconds

    [claimed] = core.queue.claim(worker, 4)
    assert claimed.id == job_id
    assert claimed.params == {"word": "hello"}
    assert claimed.attempt == 1
    running = job_row(core, job_id)
    assert running.state == "running"
    assert running.worker_id == worker.id
    assert running.lease_id == claimed.lease_id
    assert running.lease_expires_at is not None and running.started_at is not None
    assert core.queue.claim(worker, 4) == []  # nothing else queued

    clock.advance(1)
    answer = core.queue.heartbeat(worker, beat((job_id, claimed.lease_id), fraction=0.25))
    assert answer.abort == []
    beaten = job_row(core, job_id)
    assert beaten.lease_expires_at > running.lease_expires_at  # type: ignore[operator]
    assert beaten.progress_fraction == 0.25 and beaten.progress_message == "m"

    core.queue.complete(worker, job_id, done(claimed.lease_id, echoed="hello"))
    finished = job_row(core, job_id)
    assert finished.state == "succeeded"
    assert finished.result == {"echoed": "hello"}
    assert finished.progress_fraction == 1.0
    assert finished.lease_id is None and finished.finished_at is not None
    # The owner sees it; a stranger does not.
    assert core.queue.get(owner, job_id[:12]).state == "succeeded"
    with pytest.raises(Refusal) as exc:
        core.queue.get(new_identity(core), job_id)
    assert status_of(exc.value) == 404
    # A heartbeat for a finished job tells the worker to stop it.
    assert core.queue.heartbeat(worker, beat((job_id, claimed.lease_id))).abort == [job_id]


def test_failed_completion_is_kept(core: Core) -> None:
    owner, worker = new_identity(core), new_worker(core)
    job_id = submit(core, owner)
    [claimed] = core.queue.claim(worker, 1)
    core.queue.complete(
        worker, job_id, JobCompletion(lease_id=claimed.lease_id, state="failed", error="boom")
    )
    row = job_row(core, job_id)
    assert (row.state, row.error, row.result) == ("failed", "boom", None)


def test_fair_order_across_two_identities(core: Core) -> None:
    alice, bob, carol = new_identity(core), new_identity(core), new_identity(core)
    worker = new_worker(core)
    a = [submit(core, alice, n=i) for i in range(5)]
    b = [submit(core, bob, n=i) for i in range(2)]
    # Bob arrived after Alice's five, yet he is served every other job.
    first = [j.id for j in core.queue.claim(worker, 3)]
    assert first == [a[0], b[0], a[1]]
    # Carol arrives now: she ranks just past what was served, ahead of most of Alice's backlog.
    c = submit(core, carol)
    rest = [j.id for j in core.queue.claim(worker, 10)]
    assert rest == [b[1], a[2], c, a[3], a[4]]
    with core.sessions() as session:
        assert session.get(AppRecord, "echo").served_rank == 5  # type: ignore[union-attr]


def test_a_plain_claim_moves_the_served_rank_in_its_own_statement(core: Core) -> None:
    """On PostgreSQL the claim's UPDATE and the served rank's move are one statement (a
    data-modifying CTE): no `UPDATE apps` of its own, one round trip fewer per claim."""
    alice = new_identity(core)
    worker = new_worker(core)
    for i in range(3):
        submit(core, alice, n=i)
    sent: list[str] = []

    def count(_conn: object, _cur: object, statement: str, *_: object) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(core.engine, "before_cursor_execute", count)
    try:
        assert len(core.queue.claim(worker, 2)) == 2
    finally:
        event.remove(core.engine, "before_cursor_execute", count)
    assert not [s for s in sent if s.startswith("UPDATE apps")], sent
    assert [s for s in sent if s.startswith("WITH taken AS (UPDATE jobs")], sent
    with core.sessions() as session:
        assert session.get(AppRecord, "echo").served_rank == 2  # type: ignore[union-attr]


def test_a_claim_skips_the_served_rank_while_another_holds_the_app(core: Core) -> None:
    """The served rank moves only if no other transaction holds the app's row (SKIP
    LOCKED): a claim then takes its jobs without waiting, and the next claim moves it."""
    alice = new_identity(core)
    worker = new_worker(core)
    for i in range(3):
        submit(core, alice, n=i)
    with core.engine.connect() as other:
        other.execute(select(AppRecord.name).where(AppRecord.name == "echo").with_for_update())
        assert len(core.queue.claim(worker, 1)) == 1  # did not wait for `other`
        other.rollback()
    with core.sessions() as session:
        assert session.get(AppRecord, "echo").served_rank == 0  # type: ignore[union-attr]
    assert len(core.queue.claim(worker, 1)) == 1
    with core.sessions() as session:
        assert session.get(AppRecord, "echo").served_rank == 2  # type: ignore[union-attr]


def test_fairness_one_claim_at_a_time_across_coordinators(make_core: MakeCore) -> None:
    one, two = make_core(), make_core()
    alice, bob = new_identity(one), new_identity(one)
    worker = new_worker(one)
    a = [submit(one, alice, n=i) for i in range(4)]
    b = [submit(two, bob, n=i) for i in range(4)]
    order = []
    for i in range(8):
        [job] = (one if i % 2 else two).queue.claim(worker, 1)
        order.append(job.id)
    assert order == [x for pair in zip(a, b, strict=True) for x in pair]


def test_queue_full_is_429_with_retry_after(make_core: MakeCore) -> None:
    core = make_core(queue_capacity=3, retry_after_seconds=7)
    owner, worker = new_identity(core), new_worker(core)
    for i in range(3):
        submit(core, owner, n=i)
    with pytest.raises(Refusal) as exc:
        submit(core, owner, n=3)
    assert status_of(exc.value) == 429
    assert exc.value.code == "queue_full"
    assert exc.value.retry_after == 7
    response = from_refusal(exc.value).response()
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    with pytest.raises(Refusal) as early:
        core.queue.check_spec(echo())  # the early check (before files arrive) agrees
    assert status_of(early.value) == 429
    assert len(states(core)) == 3
    # Running jobs do not count: a claim makes room again.
    core.queue.claim(worker, 1)
    submit(core, owner, n=4)


def test_per_app_capacity(make_core: MakeCore) -> None:
    core = make_core(queue_capacity=100, queue_capacities={"echo": 1})
    owner = new_identity(core)
    submit(core, owner)
    with pytest.raises(Refusal) as exc:
        submit(core, owner)
    assert status_of(exc.value) == 429


def test_capacity_holds_under_concurrent_submissions(make_core: MakeCore) -> None:
    """Two coordinators, many submitters: never more queued than the bound."""
    cores = [make_core(queue_capacity=5) for _ in range(2)]
    owner = new_identity(cores[0])
    barrier = threading.Barrier(8)

    def attempt(i: int) -> int:
        barrier.wait()
        accepted = 0
        for n in range(3):
            try:
                submit(cores[i % 2], owner, n=n)
                accepted += 1
            except Refusal as exc:
                assert status_of(exc) == 429
        return accepted

    with ThreadPoolExecutor(8) as pool:
        accepted = sum(pool.map(attempt, range(8)))
    assert accepted == 5
    assert list(states(cores[0]).values()) == ["queued"] * 5


def test_lease_expiry_requeues_then_fails_after_max_attempts(
    make_core: MakeCore, clock: SetClock
) -> None:
    core = make_core(lease_seconds=30, max_attempts=2)
    owner, worker = new_identity(core), new_worker(core)
    job_id = submit(core, owner)

    [first] = core.queue.claim(worker, 1)
    clock.advance(29)
    assert core.queue.reap() == 0  # the lease still runs
    clock.advance(2)  # the worker goes silent: the lease ends
    assert core.queue.reap() == 1
    requeued = job_row(core, job_id)
    assert requeued.state == "queued" and requeued.attempts == 1
    assert requeued.lease_id is None and requeued.worker_id is None
    assert "requeued" in requeued.progress_message
    # The silent worker's heartbeat now aborts the job.
    assert core.queue.heartbeat(worker, beat((job_id, first.lease_id))).abort == [job_id]

    [second] = core.queue.claim(worker, 1)
    assert second.id == job_id and second.attempt == 2 and second.lease_id != first.lease_id
    expire_leases(core, job_id)
    assert core.queue.reap() == 1
    failed = job_row(core, job_id)
    assert failed.state == "failed" and failed.attempts == 2
    assert failed.finished_at is not None and "lost 2 times" in (failed.error or "")
    assert core.queue.claim(worker, 1) == []
    assert core.queue.reap() == 0


def test_heartbeat_keeps_the_lease(make_core: MakeCore, clock: SetClock) -> None:
    core = make_core(lease_seconds=30)
    owner, worker = new_identity(core), new_worker(core)
    job_id = submit(core, owner)
    [claimed] = core.queue.claim(worker, 1)
    for _ in range(4):
        clock.advance(20)  # 80 s in all: past the first lease, kept by the heartbeats
        assert core.queue.heartbeat(worker, beat((job_id, claimed.lease_id))).abort == []
        assert core.queue.reap() == 0
    assert job_row(core, job_id).state == "running"


def test_reaping_from_two_coordinators_takes_each_job_once(make_core: MakeCore) -> None:
    one, two = make_core(), make_core()
    owner, worker = new_identity(one), new_worker(one)
    ids_ = [submit(one, owner, n=i) for i in range(60)]
    one.queue.claim(worker, 60)
    expire_leases(one, *ids_)
    barrier = threading.Barrier(6)

    def reap(core: Core) -> int:
        barrier.wait()
        total = 0
        while n := core.queue.reap():
            total += n
        return total

    with ThreadPoolExecutor(6) as pool:
        reaped = sum(pool.map(reap, [one, two] * 3))
    assert reaped == 60
    with one.sessions() as session:
        attempts = session.scalars(select(Job.attempts)).all()
    assert sorted(attempts) == [1] * 60
    assert set(states(one).values()) == {"queued"}


def test_stale_lease_completion_is_refused(make_core: MakeCore) -> None:
    """A worker runs a job twice (its first lease was lost): only the current lease counts."""
    core = make_core()
    owner, worker = new_identity(core), new_worker(core)
    job_id = submit(core, owner)
    [first] = core.queue.claim(worker, 1)
    expire_leases(core, job_id)
    assert core.queue.reap() == 1
    [second] = core.queue.claim(worker, 1)

    with pytest.raises(Refusal) as stale:
        core.queue.complete(worker, job_id, done(first.lease_id, which="first"))
    assert status_of(stale.value) == 409 and stale.value.code == "lease_lost"
    core.queue.complete(worker, job_id, done(second.lease_id, which="second"))
    with pytest.raises(Refusal) as again:
        core.queue.complete(worker, job_id, done(first.lease_id, which="first"))
    assert status_of(again.value) == 409
    with pytest.raises(Refusal) as twice:
        core.queue.complete(worker, job_id, done(second.lease_id, which="second-again"))
    assert status_of(twice.value) == 409
    row = job_row(core, job_id)
    assert (row.state, row.result, row.attempts) == ("succeeded", {"which": "second"}, 2)


def test_completion_by_a_worker_that_lost_the_job_is_refused(make_core: MakeCore) -> None:
    core = make_core()
    owner, slow, fast = new_identity(core), new_worker(core), new_worker(core)
    job_id = submit(core, owner)
    [lost] = core.queue.claim(slow, 1)
    expire_leases(core, job_id)
    core.queue.reap()
    # Not yet claimed again: the old holder cannot complete it either.
    with pytest.raises(Refusal) as queued:
        core.queue.complete(slow, job_id, done(lost.lease_id, by="slow"))
    assert status_of(queued.value) in (404, 409)
    [taken] = core.queue.claim(fast, 1)
    with pytest.raises(Refusal) as refused:
        core.queue.complete(slow, job_id, done(lost.lease_id, by="slow"))
    assert status_of(refused.value) in (404, 409)
    core.queue.complete(fast, job_id, done(taken.lease_id, by="fast"))
    row = job_row(core, job_id)
    assert (row.state, row.result, row.worker_id) == ("succeeded", {"by": "fast"}, fast.id)


def test_lost_lease_is_409_even_when_another_worker_holds_the_job(make_core: MakeCore) -> None:
    core = make_core()
    owner, slow, fast = new_identity(core), new_worker(core), new_worker(core)
    job_id = submit(core, owner)
    [lost] = core.queue.claim(slow, 1)
    expire_leases(core, job_id)
    core.queue.reap()
    core.queue.claim(fast, 1)
    with pytest.raises(Refusal) as refused:
        core.queue.complete(slow, job_id, done(lost.lease_id))
    assert (status_of(refused.value), refused.value.code) == (409, "lease_lost")


def test_duplicate_completions_race_one_wins(make_core: MakeCore) -> None:
    """The same completion sent to two coordinators at once (a retry): one result is kept."""
    cores = [make_core(), make_core()]
    owner, worker = new_identity(cores[0]), new_worker(cores[0])
    ids_ = [submit(cores[0], owner, n=i) for i in range(20)]
    claimed = cores[0].queue.claim(worker, 20)
    outcomes: dict[str, list[object]] = {j: [] for j in ids_}

    def complete(core: Core, job_id: str, lease: str, tag: str, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            core.queue.complete(worker, job_id, done(lease, tag=tag))
            outcomes[job_id].append(tag)
        except Refusal as exc:
            outcomes[job_id].append(status_of(exc))

    for job in claimed:
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=complete, args=(c, job.id, job.lease_id, tag, barrier))
            for c, tag in ((cores[0], "a"), (cores[1], "b"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    for job_id, seen in outcomes.items():
        assert sorted(seen, key=str) == sorted(
            [409, job_row(cores[0], job_id).result["tag"]],  # type: ignore[index]
            key=str,
        ), seen


def test_completion_racing_the_reaper(make_core: MakeCore) -> None:
    """A lease ends while the worker completes: either the result is kept or the job requeued."""
    one, two = make_core(), make_core()
    owner, worker = new_identity(one), new_worker(one)
    ids_ = [submit(one, owner, n=i) for i in range(80)]
    leases = {j.id: j.lease_id for j in one.queue.claim(worker, 80)}
    expire_leases(one, *ids_)
    accepted: set[str] = set()
    refused: set[str] = set()

    def completer() -> None:
        for job_id in ids_:
            try:
                one.queue.complete(worker, job_id, done(leases[job_id]))
                accepted.add(job_id)
            except Refusal as exc:
                assert status_of(exc) in (404, 409)
                refused.add(job_id)

    def reaper() -> None:
        for _ in range(200):
            two.queue.reap()

    threads = [threading.Thread(target=completer), threading.Thread(target=reaper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    final = states(one)
    assert accepted | refused == set(ids_) and not accepted & refused
    assert {j for j, s in final.items() if s == "succeeded"} == accepted
    assert {j for j, s in final.items() if s == "queued"} == refused


def test_cancel(core: Core) -> None:
    owner, stranger, worker = new_identity(core), new_identity(core), new_worker(core)
    waiting = submit(core, owner, n=1)
    running = submit(core, owner, n=2)

    with pytest.raises(Refusal) as hidden:
        core.queue.cancel(stranger, waiting)
    assert status_of(hidden.value) == 404

    cancelled = core.queue.cancel(owner, waiting[:16])  # a unique prefix names it
    assert cancelled.state == "cancelled" and cancelled.error == "cancelled by its owner"
    # A cancelled job is never claimed.
    [claimed] = core.queue.claim(worker, 5)
    assert claimed.id == running

    core.queue.cancel(owner, running)
    row = job_row(core, running)
    assert (row.state, row.lease_id, row.lease_expires_at) == ("cancelled", None, None)
    # Its worker learns to stop, and cannot report a result any more.
    assert core.queue.heartbeat(worker, beat((running, claimed.lease_id))).abort == [running]
    with pytest.raises(Refusal) as late:
        core.queue.complete(worker, running, done(claimed.lease_id))
    assert status_of(late.value) == 409
    assert job_row(core, running).state == "cancelled"
    # Finished jobs cannot be cancelled again, nor reaped.
    with pytest.raises(Refusal) as again:
        core.queue.cancel(owner, waiting)
    assert (status_of(again.value), again.value.code) == (409, "already_finished")
    expire_leases(core, running)
    assert core.queue.reap() == 0
    assert set(states(core).values()) == {"cancelled"}


def test_heartbeat_and_claim_of_one_worker_do_not_deadlock(make_core: MakeCore) -> None:
    claiming, beating = make_core(), make_core()
    owner, worker = new_identity(claiming), new_worker(claiming)
    job_id = submit(claiming, owner)
    [lost] = claiming.queue.claim(worker, 1)
    expire_leases(claiming, job_id)
    assert claiming.queue.reap() == 1  # queued again; the worker still thinks it runs it

    # Interleave the two transactions at their `UPDATE workers` statements:
    # claim has locked the job row, heartbeat then takes the worker row first.
    claim_holds_job, beat_holds_worker = threading.Event(), threading.Event()

    def is_worker_update(statement: str) -> bool:
        return statement.lstrip().upper().startswith("UPDATE WORKERS")

    @event.listens_for(claiming.engine, "before_cursor_execute")
    def claim_pause(_c, _cur, statement, _p, _ctx, _m):  # type: ignore[no-untyped-def]
        if is_worker_update(statement):
            claim_holds_job.set()
            beat_holds_worker.wait(5)

    @event.listens_for(beating.engine, "before_cursor_execute")
    def beat_pause(_c, _cur, statement, _p, _ctx, _m):  # type: ignore[no-untyped-def]
        if is_worker_update(statement):
            claim_holds_job.wait(5)

    @event.listens_for(beating.engine, "after_cursor_execute")
    def beat_locked(_c, _cur, statement, _p, _ctx, _m):  # type: ignore[no-untyped-def]
        if is_worker_update(statement):
            beat_holds_worker.set()

    errors: list[BaseException] = []

    def run(fn: object, *args: object) -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(claiming.queue.claim, worker, 1)),
        threading.Thread(
            target=run, args=(beating.queue.heartbeat, worker, beat((job_id, lost.lease_id)))
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    assert job_row(claiming, job_id).state == "running"


def test_a_completion_riding_a_claim_races_the_same_completion_alone(
    make_core: MakeCore,
) -> None:
    """Protocol 3 on PostgreSQL: each job's completion rides a claim on one coordinator
    while the same completion goes alone to another (a retry): exactly one result is
    kept, and the riding claim takes its job either way, each job exactly once."""
    cores = [make_core(), make_core()]
    owner, worker = new_identity(cores[0]), new_worker(cores[0])
    ids_ = [submit(cores[0], owner, n=i) for i in range(10)]
    claimed = cores[0].queue.claim(worker, 5)
    outcomes: dict[str, list[object]] = {j.id: [] for j in claimed}
    taken: list[str] = []

    def ride(job_id: str, lease: str, barrier: threading.Barrier) -> None:
        batch = [BatchedCompletion(job_id=job_id, **done(lease, tag="ride").model_dump())]
        barrier.wait()
        results, answer = asyncio.run(cores[0].queue.complete_and_claim_async(worker, batch, 1))
        [result] = results
        outcomes[job_id].append("ride" if result.refusal is None else status_of(result.refusal))
        taken.extend(j.id for j in answer.jobs)

    def alone(job_id: str, lease: str, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            cores[1].queue.complete(worker, job_id, done(lease, tag="alone"))
            outcomes[job_id].append("alone")
        except Refusal as exc:
            outcomes[job_id].append(status_of(exc))

    for job in claimed:
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=fn, args=(job.id, job.lease_id, barrier))
            for fn in (ride, alone)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    for job_id, seen in outcomes.items():
        kept = job_row(cores[0], job_id).result["tag"]  # type: ignore[index]
        assert sorted(seen, key=str) == sorted([409, kept], key=str), seen
    # Each riding claim took the next queued job, once.
    assert sorted(taken) == sorted(set(ids_) - set(outcomes))
