"""`GET /v1/jobs/events?ended_only=true` (the SDK's result stream): only the changes that
may have ended a job are followed; a submitted or running job is neither loaded nor
sent. (The SDK asks for it unless a waiter reports progress:
tests/integration/test_result_stream.py.)"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from csml.coordinator import api_events
from csml.coordinator.notify import owner_feed
from tests.cluster import wait_for
from tests.unit.inproc import HttpWorker, InProcessCoordinator, sent_statements
from tests.unit.test_event_stream_writes import parse, user_id


@pytest.mark.parametrize("ended_only", [True, False])
def test_a_stream_of_ends_neither_loads_nor_sends_a_claimed_job(
    coordinator: InProcessCoordinator,
    echo_worker: HttpWorker,
    monkeypatch: pytest.MonkeyPatch,
    ended_only: bool,
) -> None:
    """Pinned count: with ended_only, the claim's news costs the stream nothing (without
    it: one load and one `running` event); the end is sent as before."""
    monkeypatch.setattr(api_events, "STREAM_SECONDS", 1.5)
    monkeypatch.setattr(api_events, "SETTLE_SECONDS", 0.01)
    user = coordinator.new_user()
    job = user.submit("echo", "echo", params={"i": 1})
    url = "/v1/jobs/events?positions=false" + ("&ended_only=true" if ended_only else "")
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(coordinator.http.get, url, headers=user._headers())
        feeds = coordinator.core.notifier._feeds
        wait_for(lambda: owner_feed(user_id(coordinator, job.id)) in feeds, 10, 0.01)
        with sent_statements(
            coordinator, lambda s: "files_json" in s and "jobs.id IN" in s
        ) as loads:
            [taken] = echo_worker.claim(1)
            wait_for(lambda: loads or ended_only, 5, 0.01)
            if ended_only:  # as long as the other case takes to load, and more
                time.sleep(0.3)
            claim_loads = len(loads)
        done = {"job_id": taken.id, "lease_id": taken.lease_id, "state": "succeeded"}
        r = echo_worker.post("/complete", {"completions": [{**done, "result": {"i": 1}}]})
        assert r.status_code == 200, r.text
        response: httpx.Response = streaming.result(timeout=30)
    states = [d["state"] for name, d in parse(response.content) if name == "job"]
    if ended_only:
        assert claim_loads == 0 and states == ["succeeded"]
    else:
        assert claim_loads == 1 and states == ["running", "succeeded"]
