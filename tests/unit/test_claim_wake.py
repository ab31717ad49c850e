"""Wake-ups of long-polling claims: a submitted job wakes one waiting claimer (the
longest waiting), which takes it without probing the queue first; the others keep
waiting, and one of them gets the next job. A woken claimer that cannot take the job
(here: a placement requirement it does not meet) hands the wake to the next idle one.

The re-check that long-polls make while no wake-up comes is pushed out of the way
(`LOCAL_RECHECK_SECONDS`), so every job here reaches its claimer by a wake-up alone and
the probes counted are those of the wake-up rules, not of the clock."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, MutableMapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import pytest

from csml.apps.echo import app as echo_app
from csml.client import RateLimited
from csml.coordinator import notify
from csml.schemas import ClaimResponse
from tests.asgi import http_scope
from tests.cluster import wait_for
from tests.unit.inproc import HttpWorker, InProcessCoordinator, sent_statements
from tests.unit.test_placement import labelled

PROBE = "SELECT (SELECT jobs.seq FROM jobs"


@pytest.fixture(autouse=True)
def no_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "LOCAL_RECHECK_SECONDS", 120.0)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as threads:
        yield threads


def long_poll(
    coordinator: InProcessCoordinator, pool: ThreadPoolExecutor, worker: HttpWorker
) -> Future[Any]:
    """A claim that waits up to 60 s, returned once it waits for a wake-up (subscribed:
    its first look at the queue runs on the event loop before the next request's)."""
    waiters = coordinator.core.notifier._waiters
    key = notify.app_key(worker.app.name)
    before = len(waiters.get(key, ()))
    polling = pool.submit(worker.post, "/claim", {"max_jobs": 4, "wait": 60})
    wait_for(lambda: len(waiters.get(key, ())) > before, timeout=30, interval=0.01)
    return polling


def answer(polling: Future[Any]) -> ClaimResponse:
    r = polling.result(timeout=30)
    assert r.status_code == 200, r.text
    return ClaimResponse.model_validate(r.json())


def test_a_submitted_job_reaches_the_waiting_claimer_which_takes_it_without_a_probe(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, pool: ThreadPoolExecutor
) -> None:
    """Pinned count: the woken claim's only statements are its write (the take, the
    served rank: in the submission's transaction, or after a BEGIN of its own when it
    came too late for it, see the next test). It did not probe before waiting either:
    the worker's previous claim found the queue empty and nothing was queued since."""
    user = coordinator.new_user()
    assert echo_worker.claim() == []  # stamps the worker's liveness (a write of its own)
    with sent_statements(coordinator) as sent:
        polling = long_poll(coordinator, pool, echo_worker)
        assert sent == []
        job = user.submit("echo", "echo", params={"n": 1})
        taken = answer(polling)
    assert [j.id for j in taken.jobs] == [job.id]
    assert sum(s.startswith(PROBE) for s in sent) == 0, sent
    after = sent[sent.index(next(s for s in sent if s.startswith("INSERT INTO jobs"))) :]
    claim = [s.split(" ")[0] for s in after[1:]]
    assert claim in (["UPDATE", "UPDATE"], ["BEGIN", "UPDATE", "UPDATE"]), after


def test_two_claimers_and_one_job_one_gets_it_the_other_waits_for_the_next(
    coordinator: InProcessCoordinator, pool: ThreadPoolExecutor
) -> None:
    """One wake per job: the claimer that waited longest takes it, the other is not
    woken (no probe of its own) and takes the next job."""
    first, second = coordinator.worker(echo_app), coordinator.worker(echo_app)
    for w in (first, second):
        assert w.claim() == []  # their liveness stamps
    user = coordinator.new_user()
    with sent_statements(coordinator) as sent:
        polls = {
            long_poll(coordinator, pool, first): first,
            long_poll(coordinator, pool, second): second,
        }
        one = user.submit("echo", "echo", params={"n": 1})
        done, waiting = wait(polls, timeout=30, return_when=FIRST_COMPLETED)
        assert len(done) == 1 and len(waiting) == 1
        [got] = done
        assert polls[got] is first  # the longest waiting
        assert [j.id for j in answer(got).jobs] == [one.id]
        assert sum(s.startswith(PROBE) for s in sent) == 0  # nor the other
        [other] = waiting
        assert not other.done()
        two = user.submit("echo", "echo", params={"n": 2})
        assert [j.id for j in answer(other).jobs] == [two.id]
        assert sum(s.startswith(PROBE) for s in sent) == 0, sent


def test_a_woken_claimer_that_cannot_take_the_job_hands_the_wake_on(
    coordinator: InProcessCoordinator, pool: ThreadPoolExecutor
) -> None:
    """The job needs a label the longest-waiting claimer lacks: it takes nothing, probes
    (learning the new requirement), and wakes the next idle claimer, which takes it; the
    first keeps waiting. (Without the hand-over the job would wait for a re-check.)"""
    cpu = labelled(coordinator, echo_app, gpu=False)
    gpu = labelled(coordinator, echo_app, gpu=True)
    for w in (cpu, gpu):
        assert w.claim() == []
    user = coordinator.new_user()
    on_cpu = long_poll(coordinator, pool, cpu)
    on_gpu = long_poll(coordinator, pool, gpu)
    job = user.submit("echo", "echo", params={"n": 1}, requires={"gpu": True})
    assert [j.id for j in answer(on_gpu).jobs] == [job.id]
    assert not on_cpu.done()
    plain = user.submit("echo", "echo", params={"n": 2})
    assert [j.id for j in answer(on_cpu).jobs] == [plain.id]


def test_a_claimer_that_hung_up_leaves_the_wake_order(
    coordinator: InProcessCoordinator, pool: ThreadPoolExecutor
) -> None:
    """A long-polling claim whose worker hangs up ends its wait at once and is no longer
    woken: the next job goes to a claimer still there (it would have been taken for the
    one that left, and waited for its lease to end)."""
    left, staying = coordinator.worker(echo_app), coordinator.worker(echo_app)
    for w in (left, staying):
        assert w.claim() == []
    user = coordinator.new_user()
    body = json.dumps({"max_jobs": 1, "wait": 60}).encode()
    hang_up = coordinator.portal.call(_new_event)
    sent_back: list[dict[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        if not sent_back and not hang_up.is_set() and body_unread:
            body_unread.clear()
            return {"type": "http.request", "body": body, "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent_back.append(dict(message))

    body_unread = [True]
    path = f"/v1/workers/{left.id}/claim"
    headers = {
        "host": "127.0.0.1",
        "content-type": "application/json",
        "authorization": f"Bearer {left.registered.worker_token}",
    }
    scope = http_scope("POST", path, headers, body=body, client=("127.0.0.1", 40000))

    async def serve() -> None:
        await coordinator.app(scope, receive, send)

    waiters = coordinator.core.notifier._waiters
    key = notify.app_key("echo")
    gone = coordinator.portal.start_task_soon(serve)
    wait_for(lambda: len(waiters.get(key, ())) == 1, timeout=30, interval=0.01)
    on_staying = long_poll(coordinator, pool, staying)
    assert len(waiters[key]) == 2
    coordinator.portal.call(hang_up.set)
    gone.result(timeout=30)
    assert len(waiters[key]) == 1
    job = user.submit("echo", "echo", params={"n": 1})
    assert [j.id for j in answer(on_staying).jobs] == [job.id]
    start = next(m for m in sent_back if m["type"] == "http.response.start")
    assert start["status"] == 200
    assert b"".join(m.get("body", b"") for m in sent_back if m["type"] == "http.response.body")


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


def test_a_long_poll_probes_first_only_when_a_job_may_wait_for_it(
    coordinator: InProcessCoordinator,
) -> None:
    """Pinned count: a long-poll begins with a probe unless this worker's last look at
    the queue found nothing for it and no job was announced since. A job with a
    placement requirement announced since (its key may be new to the coordinator) makes
    the next long-poll probe again. Each short long-poll here also re-checks once, at
    its end."""
    cpu = labelled(coordinator, echo_app, gpu=False)
    assert cpu.claim() == []  # stamps its liveness; finds nothing

    def probes() -> int:
        with sent_statements(coordinator) as sent:
            # Long enough that the first look ends before the deadline on a loaded
            # machine (a look that outlasts the wait returns without the re-check).
            r = cpu.post("/claim", {"max_jobs": 1, "wait": 0.5})
        assert r.status_code == 200 and r.json()["jobs"] == [], r.text
        return sum(s.startswith(PROBE) for s in sent)

    assert probes() == 1  # only the re-check
    user = coordinator.new_user()
    user.submit("echo", "echo", params={"n": 1}, requires={"gpu": True})
    # A job was announced since: it looks first (and again with the job's new key).
    assert probes() == 3
    assert probes() == 1


def _hold_writer(
    coordinator: InProcessCoordinator, pool: ThreadPoolExecutor
) -> tuple[threading.Event, Future[Any]]:
    """Keep the writer's thread inside an op (its batch open) until the event is set:
    what is queued meanwhile waits, in order, for the next look at the queue."""
    inside, release = threading.Event(), threading.Event()

    def op(_conn: Any) -> None:
        inside.set()
        release.wait(60)

    held = pool.submit(coordinator.core.writer.run, op)
    assert inside.wait(30)
    return release, held


def test_a_claimer_waiting_is_woken_while_the_submission_is_queued_and_shares_its_commit(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, pool: ThreadPoolExecutor
) -> None:
    """SQLite (one writer lane): the job is announced as soon as its write is queued, so
    the waiting claim's write queues behind it, before the submission commits, and
    takes the job in the same transaction (no BEGIN between the job's INSERT and the
    claim's take). Before, the claimer was woken after the submission's COMMIT, and its
    claim was a transaction of its own."""
    user = coordinator.new_user()
    assert echo_worker.claim() == []
    writer = coordinator.core.writer
    # A batch is cut after 5 ms of the writer's CPU: a cold first submission on a busy
    # machine may take that long, and the claim would commit next (still after it).
    writer.max_batch_seconds = 60.0
    with sent_statements(coordinator) as sent:
        polling = long_poll(coordinator, pool, echo_worker)
        release, held = _hold_writer(coordinator, pool)
        submitting = pool.submit(user.submit, "echo", "echo", params={"n": 1})
        wait_for(lambda: writer.pending >= 2, timeout=30, interval=0.01)  # submit, claim
        assert not polling.done() and not submitting.done()  # nothing committed yet
        release.set()
        held.result(timeout=30)
        job = submitting.result(timeout=30)
        taken = answer(polling)
    assert [j.id for j in taken.jobs] == [job.id]
    start = next(i for i, s in enumerate(sent) if s.startswith("INSERT INTO jobs"))
    take = next(i for i, s in enumerate(sent) if i > start and s.startswith("UPDATE jobs"))
    assert not [s for s in sent[start:take] if s.startswith(("BEGIN", "COMMIT"))], [
        s[:60] for s in sent
    ]
    assert sum(s.startswith(PROBE) for s in sent) == 0, sent


def test_a_submission_refused_in_its_transaction_wakes_no_other_claimer(
    make_coordinator: Any, pool: ThreadPoolExecutor
) -> None:
    """The claimer woken early for a job whose write is then refused (the owner's active
    jobs limit, counted in the transaction) finds nothing and passes no wake on: the
    other waiting claimer is not woken (it would probe for nothing), and neither answers."""
    coordinator = make_coordinator(max_active_jobs=1)
    first, second = coordinator.worker(echo_app), coordinator.worker(echo_app)
    for w in (first, second):
        assert w.claim() == []
    user = coordinator.new_user()
    user.submit("echo", "echo", params={"n": 0})  # queued: the owner's one active job
    assert len(first.claim()) == 1
    notifier = coordinator.core.notifier
    polls = [long_poll(coordinator, pool, w) for w in (first, second)]
    woken = notifier.claim_wakes["local"]
    with pytest.raises(RateLimited, match="concurrent job limit"):
        user.submit("echo", "echo", params={"n": 1})
    # The woken claim ends its look (it took nothing) after the refusal is answered.
    wait_for(lambda: notifier.claim_wakes_empty["local"] == 1, timeout=30, interval=0.01)
    assert notifier.claim_wakes["local"] - woken == 1  # the early one; nothing passed on
    assert not any(p.done() for p in polls)
    others = [coordinator.new_user() for _ in polls]  # each claim takes another's job
    jobs = {u.submit("echo", "echo", params={"n": 2}).id for u in others}
    assert {j.id for p in polls for j in answer(p).jobs} == jobs
