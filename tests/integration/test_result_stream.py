"""The result stream: one event stream per SDK `Client` delivers the results of 1,000
jobs, shared by every `Job.wait()`, with long-poll as the fallback.

A real coordinator and echo workers (SQLite); the SDK talks HTTP over loopback. The
client's requests are counted by a transport around httpx's own: with the stream, a
wait costs no request of its own (the stream pushes the result); without it, each
wait long-polls `GET /v1/jobs/{id}`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from csml.client import Client
from tests.cluster import Cluster, running_cluster

pytestmark = pytest.mark.timeout(900)

JOBS = 1000


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/v1/jobs/") and path != "/v1/jobs/events":
            path = "/v1/jobs/{id}"
        self.seen[f"{request.method} {path}"] += 1
        return super().handle_request(request)


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster whose quotas admit 1,000 jobs from one identity."""
    settings = {
        "CSML_MAX_ACTIVE_JOBS": str(JOBS),
        "CSML_SUBMISSION_RATE_LIMIT": str(10 * JOBS),
        "CSML_QUEUE_CAPACITY": str(2 * JOBS),
    }
    root: Path = tmp_path_factory.mktemp("result-stream")
    with running_cluster(root, settings, {"echo": 8}) as c:
        yield c


def test_one_stream_delivers_a_thousand_results_to_one_client(roomy: Cluster) -> None:
    transport = CountingTransport()
    user = roomy.new_user()
    with Client(roomy.url, user.token, transport=transport) as client:
        first = client.submit("echo", "echo", params={"word": "first"})
        first.wait(timeout=60)  # opens the stream
        jobs = [client.submit("echo", "echo", params={"word": str(i)}) for i in range(JOBS)]
        for job in jobs:
            job.wait(timeout=300)
        assert [j.state.value for j in jobs] == ["succeeded"] * JOBS
        assert [(j.result or {})["params"]["word"] for j in jobs] == [str(i) for i in range(JOBS)]
    seen = transport.seen
    assert seen["GET /v1/jobs/events"] >= 1
    # Jobs submitted while the stream was up need no request to wait: at most a re-read
    # per waiter after each reconnection (one waiter at a time here), and the first job.
    assert seen["GET /v1/jobs/{id}"] <= seen["GET /v1/jobs/events"] + 1, seen
    assert seen["POST /v1/jobs"] == JOBS + 1


def test_without_the_stream_each_wait_long_polls(roomy: Cluster) -> None:
    transport = CountingTransport()
    user = roomy.new_user()
    with Client(roomy.url, user.token, transport=transport, result_stream=False) as client:
        jobs = [client.submit("echo", "echo", params={"word": str(i)}) for i in range(20)]
        for job in jobs:
            job.wait(timeout=120)
        assert all(j.state.value == "succeeded" for j in jobs)
    assert transport.seen["GET /v1/jobs/events"] == 0
    assert transport.seen["GET /v1/jobs/{id}"] >= 20


def test_refused_stream_falls_back_to_long_poll(roomy: Cluster) -> None:
    """With the identity's streams all taken (429), waits long-poll and still finish."""
    user = roomy.new_user()
    headers = {"Authorization": f"Bearer {user.token}"}
    with httpx.Client(base_url=roomy.url, headers=headers, timeout=30) as raw:
        holders = []
        try:
            while True:  # take every stream slot of this identity
                r = raw.send(raw.build_request("GET", "/v1/jobs/events"), stream=True)
                if r.status_code == 429:
                    r.close()
                    break
                holders.append(r)
            transport = CountingTransport()
            with Client(roomy.url, user.token, transport=transport) as client:
                jobs = [client.submit("echo", "echo", params={"word": str(i)}) for i in range(5)]
                for job in jobs:
                    job.wait(timeout=120)
                assert all(j.state.value == "succeeded" for j in jobs)
            assert transport.seen["GET /v1/jobs/events"] == 1  # tried once, then long-polled
            assert transport.seen["GET /v1/jobs/{id}"] >= 5
        finally:
            for r in holders:
                r.close()


def test_the_stream_sends_ends_only_unless_a_waiter_reports_progress(roomy: Cluster) -> None:
    """The SDK's stream asks for ends only (`ended_only`: no event, and no load on the
    coordinator, for a job submitted or running); a wait with `on_progress` still sees
    each update: it long-polls while the stream sends ends only, and the stream's next
    connection sends every change."""
    user = roomy.new_user()
    with Client(roomy.url, user.token) as client:
        client.submit("echo", "echo").wait(timeout=60)  # opens the stream
        stream = client._results
        assert stream is not None and not stream._every_change
        seen: list[tuple[str, float]] = []
        # A long-poll answers at the job's end or when its `poll` (1 s) runs out: a job
        # running 2.5 s is seen running at least once (a 1 s job could end just before
        # the first poll's answer, once the platform's own cost per job got small).
        job = client.submit("echo", "echo", params={"sleep": 2.5})
        job.wait(timeout=60, on_progress=lambda j: seen.append((j.state.value, j.progress[0])))
        assert stream.progress and job.state.value == "succeeded"
        assert "running" in {state for state, _ in seen} and seen[-1][0] == "succeeded"


def test_the_stream_follows_its_own_link_with_no_wait_re_reading(
    roomy: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a custom transport the stream reads its events over a keep-alive link of
    its own (`csml.link`, parsed by httptools), and every wait is served by it: after
    the first (which opens the stream), no wait re-reads its job."""
    from csml.client.sdk import Job
    from csml.link import Link

    reads: Counter[str] = Counter()
    refresh = Job.refresh

    def counted(job: Job, wait: float = 0.0) -> Job:
        reads[job.id] += 1
        return refresh(job, wait)

    monkeypatch.setattr(Job, "refresh", counted)
    user = roomy.new_user()
    with Client(roomy.url, user.token) as client:
        client.submit("echo", "echo").wait(timeout=60)  # opens the stream
        stream = client._results
        assert stream is not None and isinstance(stream._link, Link)
        assert stream._response is None  # not httpx's
        reads.clear()
        jobs = [client.submit("echo", "echo", params={"i": i}) for i in range(100)]
        for i, job in enumerate(jobs):
            job.wait(timeout=120)
            assert job.state.value == "succeeded" and (job.result or {})["params"]["i"] == i
        assert sum(reads.values()) == 0


def test_a_waiting_thread_reads_its_result_itself(
    roomy: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a link, the stream is read by the waiting threads themselves: no reader
    thread is started (one waiter reads its job's end with no thread to wake), and with
    several threads waiting on one client each still gets its result, with no re-read
    (the reading passes from one waiter to the next as their jobs end)."""
    from csml.client.sdk import Job

    reads: Counter[str] = Counter()
    refresh = Job.refresh

    def counted(job: Job, wait: float = 0.0) -> Job:
        reads[job.id] += 1
        return refresh(job, wait)

    user = roomy.new_user()
    with Client(roomy.url, user.token) as client:
        client.submit("echo", "echo").wait(timeout=60)  # opens the stream
        stream = client._results
        assert stream is not None and stream._thread is None
        monkeypatch.setattr(Job, "refresh", counted)
        for i in range(20):
            job = client.submit("echo", "echo", params={"i": i})
            assert job.wait(timeout=60).state.value == "succeeded"
        failures: list[BaseException] = []

        def wait_some(start: int) -> None:
            try:
                for i in range(start, start + 10):
                    sleep = 0.05 if i % 3 == 0 else 0.0  # ends in another order
                    job = client.submit("echo", "echo", params={"i": i, "sleep": sleep})
                    job.wait(timeout=60)
                    assert (job.result or {})["params"]["i"] == i
            except BaseException as exc:  # reported by the test's thread
                failures.append(exc)

        threads = [threading.Thread(target=wait_some, args=(100 * n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not failures, failures
        assert sum(reads.values()) == 0
        assert not [t for t in threading.enumerate() if t.name == "csml-results"]


def test_a_reading_waiter_times_out_in_time_and_the_stream_goes_on(roomy: Cluster) -> None:
    """A waiter that reads the stream itself still stops at its timeout (it waits for
    bytes no longer than that), and the stream serves the next waits."""
    from csml.client.errors import WaitTimeout

    user = roomy.new_user()
    with Client(roomy.url, user.token) as client:
        client.submit("echo", "echo").wait(timeout=60)  # opens the stream
        slow = client.submit("echo", "echo", params={"sleep": 5})
        with pytest.raises(WaitTimeout):
            slow.wait(timeout=0.5)
        job = client.submit("echo", "echo", params={"i": 1})
        assert job.wait(timeout=60).state.value == "succeeded"
        assert slow.wait(timeout=60).state.value == "succeeded"
        stream = client._results
        assert stream is not None and stream._state == "connected"
