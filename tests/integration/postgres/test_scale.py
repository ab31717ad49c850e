"""Scale on PostgreSQL: four coordinator processes on one database.

* 10,000 echo jobs drained by 24 workers spread over 4 coordinators, while more
  jobs arrive over HTTP: each job is executed exactly once.
* An idle worker long-polling coordinator B wakes within milliseconds of a job
  submitted through coordinator A (LISTEN/NOTIFY), not at B's next re-check.

The workers are lightweight HTTP loops (threads) speaking the real worker
protocol (join, claim, complete) and computing echo's result themselves: real
worker processes would spend the test's time forking sandboxes, not contending
for jobs. `bench/scale.py` reuses this harness.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.pool import NullPool

from csml.apps.registry import installed_apps
from csml.coordinator.config import Settings
from csml.coordinator.notify import RELAYED_RECHECK_SECONDS, feed_bucket
from csml.coordinator.state import Core
from csml.coordinator.tokens import create_join_token
from csml.schemas import JobCompletion, WorkerRegistration
from csml.store.jobs import Envelope, FileRow, JobRow
from csml.store.relay import CHANNEL
from csml.store.tables import Job
from tests.cluster import wait_for, wait_healthy
from tests.integration.postgres.support import (
    MakeCore,
    bulk_queue,
    new_identity,
    new_worker,
    submit,
)
from tests.integration.postgres.test_concurrency import Coordinator, run_all, stop_all

# PostgreSQL at scale: many jobs, several coordinator processes.
pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(600)]


def fleet_env(db_url: str, data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CSML_DATABASE_URL": db_url,
        "CSML_DATA_DIR": str(data_dir),
        "CSML_QUEUE_CAPACITY": "1000000",
        "CSML_POW_DIFFICULTY": "0",
        "CSML_SUBMISSION_RATE_LIMIT": "0",
        "CSML_MAX_ACTIVE_JOBS": "0",
        "CSML_LEASE_SECONDS": "3600",  # no lease ends during a run
    }


@contextmanager
def fleet(db_url: str, root: Path, count: int) -> Iterator[list[Coordinator]]:
    """`count` coordinator processes on one (already migrated) database."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = fleet_env(db_url, root / "shared-data")
    with ExitStack() as stack:
        procs: list[Coordinator] = []
        stack.callback(stop_all, procs)
        for i in range(count):
            procs.append(Coordinator(f"coordinator-{i}", env, logs))
        for c in procs:
            try:
                wait_healthy(c.url, timeout=90)
            except AssertionError:
                raise AssertionError(f"{c.url} did not start:\n{c.log()}") from None
        yield procs
        for c in procs:
            assert c.proc.poll() is None, f"{c.url} died:\n{c.log()}"


def join_workers(url: str, join_token: str, count: int) -> list[tuple[str, str]]:
    manifest = installed_apps()["echo"].manifest()
    body = WorkerRegistration(app=manifest, slots=8, sandbox="tests").model_dump(mode="json")
    joined = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(count):
            r = http.post(
                "/v1/workers", json=body, headers={"Authorization": f"Bearer {join_token}"}
            )
            assert r.status_code == 201, r.text
            joined.append((r.json()["worker_id"], r.json()["worker_token"]))
    return joined


def new_identities(url: str, count: int) -> list[str]:
    with httpx.Client(base_url=url, timeout=30) as http:
        tokens = []
        for _ in range(count):
            r = http.post("/v1/identities")
            assert r.status_code == 201, r.text
            tokens.append(r.json()["token"])
        return tokens


@dataclass
class Run:
    """Shared state of one run: what was submitted, executed, completed."""

    total: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    submitted: set[str] = field(default_factory=set)
    executions: Counter[str] = field(default_factory=Counter)
    completed: int = 0
    errors: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)
        self.done.set()


def worker_loop(
    run: Run, url: str, worker: tuple[str, str], max_jobs: int = 8, wait: float = 1.0
) -> Callable[[], None]:
    """Claim (long-poll), 'execute' echo (count it), complete; until every job is done."""
    worker_id, token = worker
    auth = {"Authorization": f"Bearer {token}"}

    def loop() -> None:
        try:
            with httpx.Client(base_url=url, timeout=60, headers=auth) as http:
                while not run.done.is_set():
                    r = http.post(
                        f"/v1/workers/{worker_id}/claim", json={"max_jobs": max_jobs, "wait": wait}
                    )
                    if r.status_code != 200:
                        return run.error(f"claim {r.status_code}: {r.text[:300]}")
                    for job in r.json()["jobs"]:
                        with run.lock:
                            run.executions[job["id"]] += 1
                        done = http.post(
                            f"/v1/workers/{worker_id}/jobs/{job['id']}/complete",
                            json={
                                "lease_id": job["lease_id"],
                                "state": "succeeded",
                                "result": {"params": job["params"]},
                            },
                        )
                        if done.status_code != 204:
                            return run.error(f"complete {done.status_code}: {done.text[:300]}")
                        with run.lock:
                            run.completed += 1
                            if run.completed >= run.total:
                                run.done.set()
        except Exception as exc:
            run.error(f"worker: {exc!r}")

    return loop


def submit_loop(run: Run, url: str, tokens: list[str], count: int, k: int) -> Callable[[], None]:
    def loop() -> None:
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                for i in range(count):
                    r = http.post(
                        "/v1/jobs",
                        json={"app": "echo", "operation": "echo", "params": {"k": k, "i": i}},
                        headers={"Authorization": f"Bearer {tokens[(k + i) % len(tokens)]}"},
                    )
                    if r.status_code != 202:
                        return run.error(f"submit {r.status_code}: {r.text[:300]}")
                    with run.lock:
                        run.submitted.add(r.json()["id"])
        except Exception as exc:
            run.error(f"submit: {exc!r}")

    return loop


def drive(
    core: Core,
    procs: list[Coordinator],
    join_token: str,
    *,
    queued: int,
    over_http: int,
    workers: int,
    submitters: int = 8,
    timeout: float = 240,
) -> tuple[Run, float]:
    """Queue `queued` jobs, then drain them with `workers` HTTP workers spread over the
    coordinators while `submitters` threads (also spread) send `over_http` more.
    Returns the run and its wall time."""
    run = Run(total=queued + over_http)
    if queued:
        owners = [new_identity(core) for _ in range(8)]
        run.submitted.update(bulk_queue(core, owners, queued))
    n = len(procs)
    joined = [
        join_workers(c.url, join_token, len(range(i, workers, n))) for i, c in enumerate(procs)
    ]
    tokens = new_identities(procs[0].url, 8)
    targets = [worker_loop(run, c.url, w) for c, ws in zip(procs, joined, strict=True) for w in ws]
    if over_http:
        per_submitter, extra = divmod(over_http, submitters)
        assert extra == 0, "over_http must be a multiple of submitters"
        targets += [
            submit_loop(run, procs[k % n].url, tokens, per_submitter, k) for k in range(submitters)
        ]
    started = time.monotonic()
    run_all(targets, timeout=timeout)
    return run, time.monotonic() - started


def check_exactly_once(core: Core, run: Run) -> None:
    assert run.errors == [], run.errors[:5]
    assert len(run.submitted) == run.total
    twice = {j: n for j, n in run.executions.items() if n != 1}
    assert twice == {}, f"{len(twice)} jobs executed more than once"
    assert set(run.executions) == run.submitted, "some jobs were never executed"
    with core.sessions() as session:
        rows = session.execute(select(Job.id, Job.state, Job.attempts, Job.params, Job.result))
        db = {r.id: r for r in rows}
    assert set(db) == run.submitted
    bad = [r for r in db.values() if (r.state, r.attempts) != ("succeeded", 1)]
    assert bad == [], bad[:3]
    assert all(r.result == {"params": r.params} for r in db.values())


def setup_store(make_core: MakeCore, db_url: str, root: Path) -> tuple[Core, str]:
    """Migrate and register the apps once, before coordinators race to do it."""
    core = make_core(queue_capacity=1_000_000)
    token = create_join_token(
        Settings(database_url=db_url, data_dir=root / "shared-data"), "t", apps=["echo"]
    )
    return core, token


def test_four_coordinators_ten_thousand_jobs_each_executed_once(
    make_core: MakeCore, db_url: str, tmp_path: Path
) -> None:
    core, join_token = setup_store(make_core, db_url, tmp_path)
    with fleet(db_url, tmp_path, 4) as procs:
        run, elapsed = drive(core, procs, join_token, queued=9_000, over_http=1_000, workers=24)
    check_exactly_once(core, run)
    print(f"\n10,000 jobs, 4 coordinators, 24 workers: {elapsed:.1f} s ({10_000 / elapsed:.0f}/s)")


def claim_wake_latency(
    submit_via: str, claim_via: str, worker: tuple[str, str], token: str, *, lead: float
) -> float:
    """Seconds from a submission's 202 through one coordinator to a worker's long-poll on
    another answering with it (negative if the answer came first); the submission is sent
    `lead` s after the long-poll began. Timed from the 202, not from the request: under
    load the submit's own round trip can take a second, which says nothing of the wake-up."""
    worker_id, worker_token = worker
    answer: dict[str, float | int] = {}

    def claim() -> None:
        with httpx.Client(base_url=claim_via, timeout=30) as http:
            r = http.post(
                f"/v1/workers/{worker_id}/claim",
                json={"max_jobs": 1, "wait": 10},
                headers={"Authorization": f"Bearer {worker_token}"},
            )
        answer["at"] = time.monotonic()
        answer["jobs"] = len(r.json()["jobs"])

    waiter = threading.Thread(target=claim)
    waiter.start()
    time.sleep(lead)
    r = httpx.post(
        f"{submit_via}/v1/jobs",
        json={"app": "echo", "operation": "echo", "params": {}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    acked = time.monotonic()
    assert r.status_code == 202, r.text
    waiter.join(30)
    assert answer.get("jobs") == 1, answer
    return answer["at"] - acked


def listeners(core: Core) -> int:
    """Connections of this database LISTENing for wake-ups (one per coordinator): the
    relay's, whose last statement is its LISTEN or, once it sent something on the same
    connection, its `pg_notify`."""
    sql = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND (query = :listen OR query LIKE :send)"
    )
    with core.engine.connect() as conn:
        found = conn.scalar(sql, {"listen": f"LISTEN {CHANNEL}", "send": "SELECT pg_notify(%"})
        return int(found or 0)


def test_idle_worker_on_another_coordinator_wakes_promptly(
    make_core: MakeCore, db_url: str, tmp_path: Path
) -> None:
    """A worker long-polls coordinator B (claim wait 10 s); a job is submitted through A
    1 s later. With NOTIFY relayed, B re-checks the store only every 5 s, so an answer
    well under that proves the wake-up came through PostgreSQL."""
    core, join_token = setup_store(make_core, db_url, tmp_path)
    with fleet(db_url, tmp_path, 2) as (a, b):
        wait_for(lambda: listeners(core) == 2, timeout=30)  # both now re-check every 5 s
        worker = join_workers(b.url, join_token, 1)[0]
        token = new_identities(a.url, 1)[0]
        claim_wake_latency(a.url, b.url, worker, token, lead=0.5)  # warm both up
        latencies = [claim_wake_latency(a.url, b.url, worker, token, lead=1.0) for _ in range(6)]
    median = statistics.median(latencies)
    print(
        f"\nwake-up across coordinators (submit acknowledged by A -> claim answered on B): "
        f"median {median * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
        f"(claim wait 10 s, B re-checks every {RELAYED_RECHECK_SECONDS:.0f} s)"
    )
    assert max(latencies) < 1.5, latencies


@asynccontextmanager
async def listening(*cores: Core) -> AsyncIterator[None]:
    """Each core's notifier bound to the running loop (as a coordinator's), its relay
    listening before the block runs; every notifier closed after it."""
    loop = asyncio.get_running_loop()
    for core in cores:
        core.notifier.bind(loop)
    try:
        for core in cores:
            assert core.notifier.relay is not None
            await asyncio.to_thread(core.notifier.relay.listening.wait, 30)
        yield
    finally:
        for core in cores:
            core.notifier.close()


def test_relay_wakes_one_idle_claimer_per_job_and_every_job_waiter(make_core: MakeCore) -> None:
    """Two notifiers on two engines (as two coordinators): an `app:` key published twice
    wakes exactly two of three claimers over there; a `job:` key wakes all its waiters."""
    a, b = make_core(), make_core()

    async def scenario() -> tuple[int, int]:
        async with listening(a, b):
            with ExitStack() as stack:
                claimers = [stack.enter_context(b.notifier.subscribe("app:echo")) for _ in range(3)]
                clients = [stack.enter_context(b.notifier.subscribe("job:x")) for _ in range(2)]
                for key in ("app:echo", "app:echo", "job:x"):
                    a.notifier.notify(key)
                await asyncio.wait_for(clients[0].wait(), 10)
                # Keys are relayed in the order published: once a later key has arrived,
                # so has any extra wake-up the first ones would have caused.
                last = stack.enter_context(b.notifier.subscribe("job:last"))
                a.notifier.notify("job:last")
                await asyncio.wait_for(last.wait(), 10)
                return sum(e.is_set() for e in claimers), sum(e.is_set() for e in clients)

    assert asyncio.run(scenario()) == (2, 2)


def test_relayed_keys_wake_the_other_loop_only_for_what_it_follows(make_core: MakeCore) -> None:
    """Keys that B neither waits for nor follows (a job no one long-polls there, an app
    no one claims there) reach B's marks and watchers but never wake its event loop (an
    owner's whose stream is elsewhere does not even reach B: see the next test); the
    keys it follows do (at most once per packet), and all received are counted."""
    a, b = make_core(), make_core()

    async def scenario() -> None:
        watched: list[str | None] = []
        b.notifier.watch("job:", watched.append)
        async with listening(a, b):
            relay = b.notifier.relay
            assert relay is not None
            with ExitStack() as stack:
                first = stack.enter_context(b.notifier.subscribe("job:first"))
                a.notifier.notify("job:first")
                await asyncio.wait_for(first.wait(), 10)
                handed, received = b.notifier.relayed_deliveries, relay.received
                for key in ("owner:z/j1", "job:nobody", "app:other"):
                    a.notifier.notify(key)
                for _ in range(1000):  # until B's relay has handed them over
                    if relay.received - received >= 2:
                        break
                    await asyncio.sleep(0.01)
                assert relay.received - received == 2
                assert b.notifier.relayed_deliveries == handed  # nothing followed: dropped
                claimer = stack.enter_context(b.notifier.subscribe("app:echo"))
                last = stack.enter_context(b.notifier.subscribe("job:last"))
                a.notifier.notify("app:echo")
                a.notifier.notify("job:last")
                await asyncio.wait_for(last.wait(), 10)
                assert claimer.is_set()
                assert 1 <= b.notifier.relayed_deliveries - handed <= 2  # once per packet
                assert b.notifier.mark("app:other")[0] == 1  # counted, though no one waits
                assert "job:nobody" in watched  # the lease memo's kind of watcher: called

    asyncio.run(scenario())


def test_owner_keys_reach_only_the_coordinators_following_that_owner(
    make_core: MakeCore,
) -> None:
    """An owner feed's keys go on its bucket's channel: B, following `owner:z` (once its
    relay listens there: `heard`, with a resync for what it may have missed), gets z's
    changes and never receives y's (another bucket) at all; B's key that is not an
    owner's still reaches A, which follows no owner."""
    a, b = make_core(), make_core()

    async def scenario() -> None:
        async with listening(a, b):
            sender, relay = a.notifier.relay, b.notifier.relay
            assert sender is not None and relay is not None
            with ExitStack() as stack:
                feed = stack.enter_context(b.notifier.follow("owner:z"))
                assert not feed.heard.is_set()  # B did not listen on z's bucket yet
                await asyncio.wait_for(feed.heard.wait(), 10)
                assert feed.take() == (set(), True)  # what it may have missed: re-read
                last = stack.enter_context(b.notifier.subscribe("job:last"))
                received = relay.received
                assert feed_bucket("owner:y") != feed_bucket("owner:z")
                a.notifier.notify("owner:y/j1")  # nobody follows y's bucket
                a.notifier.notify("owner:z/j2!")
                a.notifier.notify("job:last")
                await asyncio.wait_for(last.wait(), 10)
                await asyncio.wait_for(feed.event.wait(), 10)
                assert feed.take() == ({"j2"}, False)
                assert relay.received - received == 2  # z's key and job:last, not y's
                back = stack.enter_context(a.notifier.subscribe("job:back"))
                b.notifier.notify("job:back")
                await asyncio.wait_for(back.wait(), 10)

    asyncio.run(scenario())


def test_a_completions_job_key_reaches_only_the_long_polls_of_its_owner(
    make_core: MakeCore,
) -> None:
    """A job key notified with its owner's topic (a completion's) goes on that owner's
    bucket: a waiter on B subscribed with the topic (and `heard`) is woken; B never
    receives one for an owner it neither follows nor waits on, though a plain job key
    (a cancel's) still reaches it."""
    a, b = make_core(), make_core()

    async def scenario() -> None:
        async with listening(a, b):
            relay = b.notifier.relay
            assert relay is not None
            assert feed_bucket("owner:y") != feed_bucket("owner:z")
            with ExitStack() as stack:
                mine = stack.enter_context(b.notifier.subscribe("job:j", "owner:z"))
                await asyncio.wait_for(b.notifier.heard("owner:z"), 10)
                assert relay.listens_on(feed_bucket("owner:z") or 0)
                other = stack.enter_context(b.notifier.subscribe("job:k"))
                last = stack.enter_context(b.notifier.subscribe("job:last"))
                received = relay.received
                a.notifier.notify("job:k", topic="owner:y")  # y's: B is not told
                a.notifier.notify("job:j", topic="owner:z")
                a.notifier.notify("job:last")
                await asyncio.wait_for(last.wait(), 10)
                await asyncio.wait_for(mine.wait(), 10)
                assert not other.is_set()
                assert relay.received - received == 2

    asyncio.run(scenario())


def test_a_completion_reaches_only_the_coordinators_following_its_owner(
    make_core: MakeCore,
) -> None:
    """A job completed through A: its `job:` key, its owner's change and the view go on
    the owner's bucket, so B, which neither follows that owner nor long-polls the job,
    receives none of them; C, following the owner, gets the end with its view."""
    a, b, c = make_core(), make_core(), make_core()
    owner = new_identity(a)
    job_id = submit(a, owner, word="hi")
    worker = new_worker(a)
    [claimed] = a.queue.claim(worker, 1)
    topic = f"owner:{owner}"

    async def scenario() -> None:
        async with listening(a, b, c):
            relay = b.notifier.relay
            assert relay is not None
            with ExitStack() as stack:
                feed = stack.enter_context(c.notifier.follow(topic))
                await asyncio.wait_for(feed.heard.wait(), 10)
                feed.take()  # the resync that came with it
                last = stack.enter_context(b.notifier.subscribe("job:last"))
                received = relay.received
                done = JobCompletion(lease_id=claimed.lease_id, state="succeeded", result={})
                await asyncio.to_thread(a.queue.complete, worker, job_id, done)
                await asyncio.wait_for(feed.urgent.wait(), 10)
                a.notifier.notify("job:last")
                await asyncio.wait_for(last.wait(), 10)
                assert relay.received - received == 1  # job:last only
                items, resync, views = feed.take_views()
                assert (items, resync, set(views)) == ({job_id}, False, {job_id})

    asyncio.run(scenario())


def test_a_bucket_no_longer_followed_is_unlistened(
    make_core: MakeCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the last feed of a bucket goes (and `UNLISTEN_AFTER_SECONDS` has passed, here
    0), B stops listening there: A's later keys of that owner no longer reach B."""
    from csml.store import relay as relay_module

    monkeypatch.setattr(relay_module, "UNLISTEN_AFTER_SECONDS", 0.0)
    a, b = make_core(), make_core()

    async def scenario() -> None:
        async with listening(a, b):
            relay = b.notifier.relay
            assert relay is not None
            bucket = feed_bucket("owner:z")
            assert bucket is not None
            with b.notifier.follow("owner:z") as feed:
                await asyncio.wait_for(feed.heard.wait(), 10)
                assert relay.listens_on(bucket)
            for _ in range(1000):  # until its thread's next turn (at most a poll)
                if not relay.listens_on(bucket):
                    break
                await asyncio.sleep(0.01)
            assert not relay.listens_on(bucket)
            with b.notifier.subscribe("job:last") as last:
                received = relay.received
                a.notifier.notify("owner:z/j3!")
                a.notifier.notify("job:last")
                await asyncio.wait_for(last.wait(), 10)
            assert relay.received - received == 1

    asyncio.run(scenario())


def _ended_row(job_id: str, **changes: object) -> JobRow:
    now = datetime.now(UTC)
    row = JobRow(
        seq=7, id=job_id, owner_id="z", app="echo", operation="echo",
        params={"i": 1, "text": "a b"}, limits={}, state="succeeded", fair_rank=2,
        created_at=now, started_at=now, finished_at=now, attempts=1, max_attempts=3,
        progress_fraction=1.0, progress_message="", error=None,
        result={"params": {"i": 1}}, worker_id="w", lease_id=None, lease_expires_at=None,
        parent_seq=None, step_index=None, requires_key=None, warm_key=None,
        files=(FileRow("output", "out.txt", 3, "ab" * 32, "text/plain", "b/c"),),
    )  # fmt: skip
    return replace(row, **changes)  # type: ignore[arg-type]


def test_an_ended_jobs_view_is_relayed_with_its_key(make_core: MakeCore) -> None:
    """A's `notify(key, view)` of an ended job reaches B's feed following that owner with
    the same row (B's event stream sends it without loading the job); a confidential
    job's view, or one too large, is not relayed: B gets the key alone, as before."""
    a, b = make_core(), make_core()
    plain = _ended_row("j1")
    sealed = _ended_row("j2", confidential=Envelope(1, "n", "k", "p", None))
    large = _ended_row("j3", result={"text": "x" * 5000})

    async def scenario() -> None:
        async with listening(a, b):
            with b.notifier.follow("owner:z") as feed:
                await asyncio.wait_for(feed.heard.wait(), 10)  # B listens on z's bucket
                feed.take()  # the resync that came with it
                for row in (plain, sealed, large):
                    a.notifier.notify(f"owner:z/{row.id}!", row)
                for _ in range(1000):  # until all three have come
                    if len(feed.pending) == 3:
                        break
                    await asyncio.sleep(0.01)
                items, resync, views = feed.take_views()
                assert (items, resync) == ({"j1", "j2", "j3"}, False)
                assert views == {"j1": plain}

    asyncio.run(scenario())


def test_a_change_that_ends_nothing_waits_for_company_on_its_way_out(
    make_core: MakeCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner's change that ends no job (here: `owner:z/j1`, e.g. a job now running) is
    not sent alone: it goes out with the next key that may not wait (`job:x`), in one
    transaction; keys that may not wait go at once."""
    from csml.store import relay as relay_module

    monkeypatch.setattr(relay_module, "DEFER_SECONDS", 60.0)  # only company sends it
    a, b = make_core(), make_core()

    async def scenario() -> None:
        async with listening(a, b):
            sender = a.notifier.relay
            assert sender is not None
            with ExitStack() as stack:
                feed = stack.enter_context(b.notifier.follow("owner:z"))
                await asyncio.wait_for(feed.heard.wait(), 10)  # B listens on z's bucket
                feed.take()  # the resync that came with it
                woken = stack.enter_context(b.notifier.subscribe("job:x"))
                publishes = sender.publishes
                a.notifier.notify("owner:z/j1")
                await asyncio.sleep(0.5)
                assert sender.publishes == publishes and not feed.event.is_set()
                a.notifier.notify("job:x")
                await asyncio.wait_for(woken.wait(), 10)
                await asyncio.wait_for(feed.event.wait(), 10)
                assert feed.take() == ({"j1"}, False)
                # The sender counts a transaction once `pg_notify` has returned, which may
                # be after the listener here was woken by it: wait for the count, then
                # leave time for a second transaction to be counted if there were one.
                deadline = time.monotonic() + 10
                while sender.publishes == publishes and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)
                assert sender.publishes == publishes + 1  # both in one transaction

    asyncio.run(scenario())


def test_a_burst_of_keys_goes_out_in_one_transaction(
    make_core: MakeCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys published while the relay lingers for company (here 5 s: the twenty publishes
    must all land inside it, even on a loaded machine) go out in one transaction; published
    on the event loop (the relay's), they cost no hop to it."""
    from csml.store import relay as relay_module

    monkeypatch.setattr(relay_module, "LINGER_SECONDS", 5.0)
    a, b = make_core(), make_core()

    async def scenario() -> None:
        async with listening(a, b):
            sender = a.notifier.relay
            assert sender is not None
            with ExitStack() as stack:
                woken = [stack.enter_context(b.notifier.subscribe(f"job:{i}")) for i in range(20)]
                pokes, publishes = sender.pokes, sender.publishes
                for i in range(20):
                    a.notifier.notify(f"job:{i}")
                for event in woken:
                    await asyncio.wait_for(event.wait(), 20)
                assert sender.pokes == pokes
                deadline = time.monotonic() + 10  # counted once `pg_notify` returned
                while sender.publishes == publishes and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert sender.publishes - publishes == 1

    asyncio.run(scenario())


def test_the_relay_runs_on_the_event_loop(make_core: MakeCore) -> None:
    """No relay thread: B's relay reads A's key on B's event loop and hands it to the
    waiter there with no hop between threads (`Notifier.hops` unchanged), and A's key
    published on A's loop needs no hop either (`pokes`). (Until session 15 a thread per
    coordinator read the connection and woke the loop for every packet it followed.)"""
    a, b = make_core(), make_core()

    async def scenario() -> None:
        async with listening(a, b):
            sender, relay = a.notifier.relay, b.notifier.relay
            assert sender is not None and relay is not None
            names = {t.name for t in threading.enumerate()}
            assert "csml-pg-relay" not in names
            with b.notifier.subscribe("job:x") as woken:
                hops, pokes, handed = b.notifier.hops, sender.pokes, b.notifier.relayed_deliveries
                a.notifier.notify("job:x")
                await asyncio.wait_for(woken.wait(), 10)
                assert b.notifier.relayed_deliveries == handed + 1
                assert b.notifier.hops == hops
                assert sender.pokes == pokes

    asyncio.run(scenario())


def test_a_key_published_from_another_thread_is_relayed(make_core: MakeCore) -> None:
    """`Notifier.notify` is safe from any thread: a key notified from a worker thread hops
    to the loop once (`pokes`) and is relayed like one notified there."""
    a, b = make_core(), make_core()

    async def scenario() -> None:
        async with listening(a, b):
            sender = a.notifier.relay
            assert sender is not None
            with b.notifier.subscribe("job:y") as woken:
                pokes = sender.pokes
                await asyncio.to_thread(a.notifier.notify, "job:y")
                await asyncio.wait_for(woken.wait(), 10)
                assert sender.pokes == pokes + 1

    asyncio.run(scenario())


def test_a_relay_whose_connection_drops_reconnects_and_wakes_every_waiter(
    make_core: MakeCore,
) -> None:
    """B's relay connection is terminated by the server: B stops listening, reconnects,
    wakes every local waiter (what was sent meanwhile is lost) and hears A's keys again."""
    a, b = make_core(), make_core()

    async def scenario() -> None:
        async with listening(a, b):
            relay = b.notifier.relay
            assert relay is not None
            pid = relay.backend_pid
            assert pid is not None
            with ExitStack() as stack:
                waiter = stack.enter_context(b.notifier.subscribe("job:x"))
                with a.engine.connect() as conn:
                    conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                    conn.commit()
                await asyncio.wait_for(waiter.wait(), 20)  # woken by the reconnection (None)
                await asyncio.to_thread(relay.listening.wait, 30)
                assert relay.backend_pid not in (None, pid)
                later = stack.enter_context(b.notifier.subscribe("job:y"))
                a.notifier.notify("job:y")
                await asyncio.wait_for(later.wait(), 10)

    asyncio.run(scenario())


def test_a_relay_that_cannot_reconnect_at_once_keeps_trying(
    make_core: MakeCore, caplog: pytest.LogCaptureFixture
) -> None:
    """B's relay connection drops while the database refuses new connections: its first
    reconnections fail and it keeps trying with backoff (on the event loop, its
    connection opened in a worker thread); once connections are allowed again it
    listens and relays again."""
    a, b = make_core(), make_core()

    def allow(conn: Any, database: str, yes: bool) -> None:
        flag = "true" if yes else "false"
        conn.exec_driver_sql(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {flag}')

    async def scenario() -> None:
        async with listening(a, b):
            relay = b.notifier.relay
            assert relay is not None
            pid = relay.backend_pid
            database = a.engine.url.database
            assert pid is not None and database is not None
            # From another database: one cannot disallow connections to one's own.
            other = create_engine(a.engine.url.set(database="postgres"), poolclass=NullPool)
            admin = other.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                allow(admin, database, False)
                try:
                    admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                    for _ in range(3000):  # until a reconnection has failed
                        if "relay connection failed" in caplog.text:
                            break
                        await asyncio.sleep(0.01)
                    assert "relay connection failed" in caplog.text
                    assert not relay.listening.is_set()
                finally:
                    allow(admin, database, True)
            finally:
                admin.close()
                other.dispose()
            await asyncio.to_thread(relay.listening.wait, 30)
            with b.notifier.subscribe("job:z") as woken:
                a.notifier.notify("job:z")
                await asyncio.wait_for(woken.wait(), 10)

    with caplog.at_level(logging.WARNING, logger="csml.coordinator.notify"):
        asyncio.run(scenario())


def test_a_coordinators_own_notifications_cost_it_no_wake_up(make_core: MakeCore) -> None:
    """PostgreSQL delivers a session's own notifications to it as well. The relay sends
    on its listening connection, so they come back in the answer to its `pg_notify` and
    never wake its thread through the socket; another coordinator's do (and are
    delivered there)."""
    a, b = make_core(), make_core()

    async def scenario() -> None:
        async with listening(a, b):
            sender, other = a.notifier.relay, b.notifier.relay
            assert sender is not None and other is not None
            with b.notifier.subscribe("job:x") as woken:
                wakes, publishes, packets = sender.wakes, sender.publishes, other.packets
                for i in range(20):  # one transaction each: a key that may not wait
                    a.notifier.notify("job:x")
                    await asyncio.wait_for(woken.wait(), 10)
                    woken.clear()
                    deadline = time.monotonic() + 10  # counted once `pg_notify` returned
                    while sender.publishes < publishes + i + 1 and time.monotonic() < deadline:
                        await asyncio.sleep(0.005)
            await asyncio.sleep(0.2)
            assert sender.publishes - publishes >= 20
            assert other.packets - packets >= 20
            assert sender.wakes == wakes

    asyncio.run(scenario())
