"""The event stream (`GET /v1/jobs/events`) on the real in-process coordinator: the jobs
of one wake-up go out in one write, each a whole event as before, loaded in one
statement without a read transaction (an end committed here: not read at all); the
last event of each job is its ended view, the same as a GET of it."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from csml.client import Client, Job
from csml.coordinator import api_events
from csml.coordinator.notify import owner_feed
from tests.cluster import wait_for
from tests.unit.inproc import (
    BASE_URL,
    HttpWorker,
    InProcessCoordinator,
    PortalTransport,
    sent_statements,
)


def parse(body: bytes) -> list[tuple[str, Any]]:
    """The server-sent events in `body` as (name, JSON data); comments skipped."""
    out = []
    for block in body.decode().split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if lines:
            name = next(ln[6:].strip() for ln in lines if ln.startswith("event:"))
            data = "".join(ln[5:].strip() for ln in lines if ln.startswith("data:"))
            out.append((name, json.loads(data)))
    return out


def stream_through_ends(
    coordinator: InProcessCoordinator,
    worker: HttpWorker,
    user: Client,
    jobs: list[Job],
    *,
    running_first: bool = False,
) -> tuple[httpx.Response, list[bytes], list[str]]:
    """Follow `user`'s event stream (`STREAM_SECONDS` patched short by the caller), let
    `worker` claim `jobs` and complete them in one batch; the stream's response, each of
    its writes, and the statements sent from the completion on. `running_first`: the
    claim's news has gone out before the completion is sent."""
    ids = {j.id for j in jobs}
    writes: list[bytes] = []

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_body(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                writes.append(message["body"])
            await send(message)

        await coordinator.app(scope, receive, send_body)

    def running_sent() -> bool:
        seen = {d["id"]: d["state"] for w in writes[1:] for n, d in parse(w) if n == "job"}
        return all(seen.get(i) == "running" for i in ids)

    transport = PortalTransport(cast(FastAPI, counted), coordinator.portal)
    with (
        httpx.Client(base_url=BASE_URL, transport=transport, timeout=30) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        streaming = pool.submit(
            http.get, "/v1/jobs/events?positions=false", headers=user._headers()
        )
        feeds = coordinator.core.notifier._feeds
        # Followed, and its snapshot read (the read happens right after following).
        wait_for(lambda: owner_feed(user_id(coordinator, jobs[0].id)) in feeds, 10, 0.01)
        wait_for(lambda: writes, 10, 0.01)
        claimed = worker.claim(max_jobs=len(jobs))
        assert {c.id for c in claimed} == ids
        if running_first:
            wait_for(running_sent, 10, 0.01)  # the claim's news is out: what follows is the end
        with sent_statements(coordinator) as statements:
            done = [
                {
                    "job_id": c.id,
                    "lease_id": c.lease_id,
                    "state": "succeeded",
                    "result": {"i": c.params["i"]},
                }
                for c in claimed
            ]
            r = worker.post("/complete", {"completions": done})
            assert r.status_code == 200, r.text
            response = streaming.result(timeout=30)
    return response, writes, statements


def test_a_wake_up_sends_its_jobs_in_one_write(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_events, "STREAM_SECONDS", 1.5)  # the response ends, then is read
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo", params={"i": i}) for i in range(3)]
    ids = {j.id for j in jobs}
    response, writes, statements = stream_through_ends(coordinator, echo_worker, user, jobs)
    assert response.status_code == 200
    assert b"".join(writes) == response.content
    events = parse(response.content)
    assert events[0][0] == "snapshot" and events[-1][0] == "reconnect"
    with_jobs = [parse(w) for w in writes[1:] if b"event: job" in w]
    assert with_jobs and all(sorted(d["id"] for _, d in w) == sorted(ids) for w in with_jobs)
    last = {d["id"]: d for name, d in events if name == "job"}
    for job in jobs:
        job.refresh()
        assert last[job.id] == job.data.model_dump(mode="json")
        assert last[job.id]["state"] == "succeeded" and last[job.id]["result"] == {
            "i": job.data.params["i"]
        }
    loads = [s for s in statements if "files_json" in s and "jobs.id IN" in s]
    # The wake-up with the ends reads nothing (their views came with their news, and
    # stand for the running news pending with them); one with the running views alone,
    # if it came apart on a slow machine, is one statement; no BEGIN.
    assert len(loads) <= 1 and "BEGIN" not in statements


def user_id(coordinator: InProcessCoordinator, job_id: str) -> str:
    from csml.store import jobs as store

    with coordinator.core.queue.read() as conn:
        row = store.by_id(conn, job_id)
    assert row is not None
    return row.owner_id


def test_an_end_committed_here_reaches_the_stream_without_a_read(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator that ends a plain job hands its streams the ended view (the row its
    one-statement end returned): the stream sends it without loading the job, and it is
    the view a GET of the job gives."""
    monkeypatch.setattr(api_events, "STREAM_SECONDS", 1.5)
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo", params={"i": i}) for i in range(2)]
    response, _writes, statements = stream_through_ends(
        coordinator, echo_worker, user, jobs, running_first=True
    )
    assert response.status_code == 200
    events = parse(response.content)
    last = {d["id"]: d for name, d in events if name == "job"}
    assert [s for s in statements if s.startswith("SELECT")] == []  # nothing read: no load
    for job in jobs:
        job.refresh()
        assert last[job.id] == job.data.model_dump(mode="json")  # the view a GET gives
        assert last[job.id]["state"] == "succeeded"


def test_an_ended_job_s_event_is_the_json_a_get_of_it_answers(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `job` event's data is the view's JSON as pydantic-core encodes it, byte for byte
    the body of a GET of the job (text beyond ASCII as UTF-8, not `\\u` escapes): each
    view is encoded once, with no dict and no `json.dumps` between (the push of a result
    is on the path of every `Job.wait`)."""
    monkeypatch.setattr(api_events, "STREAM_SECONDS", 1.5)
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo", params={"i": 0, "word": "café ✓ 東京"})]
    response, _writes, _statements = stream_through_ends(coordinator, echo_worker, user, jobs)
    assert response.status_code == 200
    data = [
        block.split(b"\ndata: ", 1)[1]
        for block in response.content.split(b"\n\n")
        if block.startswith(b"event: job\n")
    ]
    with httpx.Client(base_url=BASE_URL, transport=coordinator.transport, timeout=30) as http:
        got = http.get(f"/v1/jobs/{jobs[0].id}", headers=user._headers())
    assert got.status_code == 200
    assert json.loads(got.content)["state"] == "succeeded"
    assert data[-1] == got.content
    assert "café ✓ 東京".encode() in data[-1]
