"""Small outputs with the result (`GET /v1/jobs/events?inline_outputs=N`): the `job`
event of a job that succeeded carries its outputs of at most N bytes in base64, only to
its owner's streams and only when asked; the SDK's `Job.download` then writes them
without a request, after checking their size and sha256 against the view."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest.mock import patch

import httpx
import pytest

from csml.client import Client
from csml.coordinator import api_events
from csml.coordinator.inline_outputs import Budget, outputs_of, with_view
from csml.store import jobs as store
from csml.store.blobs import in_db
from csml.store.jobs import Envelope
from tests.cluster import wait_for
from tests.unit.inproc import BASE_URL, HttpWorker, InProcessCoordinator
from tests.unit.test_event_stream_writes import parse
from tests.unit.test_worker_protocol import claim, complete_batch

SMALL = b"s" * 50
LARGER = b"L" * 300


def _done(taken: Any, content: bytes | None, state: str = "succeeded") -> dict[str, Any]:
    out: dict[str, Any] = {"job_id": taken.id, "lease_id": taken.lease_id, "state": state}
    if state == "succeeded":
        out["result"] = {}
    else:
        out["error"] = "it broke"
    if content is not None:
        out["inline_outputs"] = [{"name": "data", "content": base64.b64encode(content).decode()}]
    return out


def _streams(
    coordinator: InProcessCoordinator,
    worker: HttpWorker,
    readers: list[tuple[Client, str]],
    owner: Client,
    contents: list[bytes | None],
) -> tuple[list[Any], list[list[tuple[str, Any]]]]:
    """Open each reader's stream (with its query), run one job per content for `owner`
    (None: the job fails), and return the jobs and every stream's events."""
    jobs = [owner.submit("echo", "echo", params={"i": i}) for i in range(len(contents))]
    snapshots: list[str] = []
    read_snapshot = api_events._snapshot

    def counted(c: Any, owner_id: str, *rest: Any) -> dict[str, api_events.Sent]:
        out = read_snapshot(c, owner_id, *rest)
        snapshots.append(owner_id)
        return out

    with (
        httpx.Client(base_url=BASE_URL, transport=coordinator.transport, timeout=30) as http,
        ThreadPoolExecutor(len(readers)) as pool,
        patch.object(api_events, "_snapshot", counted),
    ):
        streaming = [
            pool.submit(http.get, f"/v1/jobs/events?positions=false{query}", headers=c._headers())
            for c, query in readers
        ]
        # Every stream follows its owner's feed and has read its snapshot before the ends
        # (a snapshot read after them would hold the ended views, sent without outputs).
        wait_for(lambda: len(snapshots) >= len(readers), 10, 0.01)
        taken = {t.id: t for t in claim(worker, len(jobs)).jobs}
        done = [
            _done(taken[j.id], content, "succeeded" if content is not None else "failed")
            for j, content in zip(jobs, contents, strict=True)
        ]
        assert all(r.status in (200, 204) for r in complete_batch(worker, *done).results)
        responses = [s.result(timeout=30) for s in streaming]
    assert all(r.status_code == 200 for r in responses)
    return jobs, [parse(r.content) for r in responses]


def _last(events: list[tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for name, d in events if name == "job"}


@pytest.fixture
def short_streams(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(api_events, "STREAM_SECONDS", 1.5)  # the responses end, then are read
    yield


def test_only_the_owners_stream_that_asks_gets_small_outputs_of_succeeded_jobs(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, short_streams: None
) -> None:
    owner, other = coordinator.new_user(), coordinator.new_user()
    jobs, (asked, plain, others) = _streams(
        coordinator,
        echo_worker,
        [(owner, "&inline_outputs=100"), (owner, ""), (other, "&inline_outputs=100")],
        owner,
        [SMALL, LARGER, None],
    )
    small, larger, failed = (j.id for j in jobs)
    got = _last(asked)
    assert got[small]["state"] == "succeeded"
    assert got[small]["inline_outputs"] == {"data": base64.b64encode(SMALL).decode()}
    assert got[larger]["state"] == "succeeded" and "inline_outputs" not in got[larger]
    assert got[failed]["state"] == "failed" and "inline_outputs" not in got[failed]
    # The view itself is the same as without inline outputs, and as a GET of the job.
    view = {k: v for k, v in got[small].items() if k != "inline_outputs"}
    assert view == _last(plain)[small]
    assert all("inline_outputs" not in d for d in _last(plain).values())
    assert _last(others) == {}  # another identity's stream hears nothing of these jobs


def test_the_asked_bound_is_checked(coordinator: InProcessCoordinator) -> None:
    user = coordinator.new_user()
    r = coordinator.http.get("/v1/jobs/events?inline_outputs=300000", headers=user._headers())
    assert r.status_code == 422


def test_outputs_of_reads_only_what_the_row_says(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """A file that is not the size its row says, a confidential or unfinished job, and
    the wake-up's budget: left out (the client downloads)."""
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo", params={"i": i}) for i in range(2)]
    taken = {t.id: t for t in claim(echo_worker, 2).jobs}
    complete_batch(echo_worker, *(_done(taken[j.id], SMALL) for j in jobs))
    with coordinator.core.queue.read() as conn:
        rows = [store.by_id(conn, j.id) for j in jobs]
    first, second = rows
    assert first is not None and second is not None
    blobs = coordinator.core.blobs
    wanted = {"data": base64.b64encode(SMALL).decode()}
    assert outputs_of(blobs, first, 100, Budget()) == wanted
    assert outputs_of(blobs, first, 49, Budget()) == {}  # over the asked bound
    sealed = Envelope(1, "nonce", "key", "params", {"ciphertext": "x"})
    assert outputs_of(blobs, replace(first, confidential=sealed), 100, Budget()) == {}
    assert outputs_of(blobs, replace(first, state="running"), 100, Budget()) == {}
    budget = Budget(60)
    assert outputs_of(blobs, first, 100, budget) == wanted
    assert outputs_of(blobs, second, 100, budget) == {}  # the budget is spent
    (out,) = [f for f in second.files if f.kind == "output"]
    assert in_db(out.blob)  # a small inline output is kept in the database
    kept = coordinator.core.queue.file_content
    assert outputs_of(blobs, second, 100, Budget(), kept) == wanted  # memo spent: read
    assert outputs_of(blobs, second, 100, Budget()) == {}  # nothing to read it with
    longer = lambda seq, kind, name: SMALL + b"more"  # noqa: E731 - not what its row says
    assert outputs_of(blobs, second, 100, Budget(), longer) == {}


def test_download_uses_the_inline_bytes_once_and_checks_them(
    coordinator: InProcessCoordinator,
    echo_worker: HttpWorker,
    short_streams: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner = coordinator.new_user()
    jobs, (events,) = _streams(
        coordinator, echo_worker, [(owner, "&inline_outputs=100")], owner, [SMALL, SMALL]
    )
    views = _last(events)
    good, tampered = jobs
    good._take_view(views[good.id])
    bad_view = dict(views[tampered.id])
    bad_view["inline_outputs"] = {"data": base64.b64encode(b"t" * 50).decode()}  # same size
    tampered._take_view(bad_view)
    assert good.data.outputs["data"].sha256 == hashlib.sha256(SMALL).hexdigest()

    fetched: list[str] = []
    real_stream = owner._stream

    def counted(path: str) -> Iterator[bytes]:
        fetched.append(path)
        return real_stream(path)

    monkeypatch.setattr(owner, "_stream", counted)
    assert good.download("data", tmp_path / "good").read_bytes() == SMALL
    assert fetched == []  # no request: the bytes came with the result
    assert good.download("data", tmp_path / "again").read_bytes() == SMALL
    assert len(fetched) == 1  # used once, then let go: downloaded
    # Bytes that are not the view's sha256 are not written: the output is downloaded.
    assert tampered.download("data", tmp_path / "tampered").read_bytes() == SMALL
    assert len(fetched) == 2


def test_with_view_writes_the_json_the_encoder_would() -> None:
    inline = {"a": base64.b64encode(b"\x00\xff" * 9).decode(), 'odd "name"\n': ""}
    for view in ({"id": "j", "outputs": {"a": {"size": 18}}, "state": "succeeded"}, {}):
        text = with_view(json.dumps(view, separators=(",", ":")), inline)
        assert json.loads(text) == {**view, "inline_outputs": inline}
        assert text == json.dumps({**view, "inline_outputs": inline}, separators=(",", ":"))
