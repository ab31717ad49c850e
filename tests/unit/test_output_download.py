"""Downloading an output (`GET /v1/jobs/{id}/outputs/{name}`): a small one is sent in one
body (read on the event loop) with every header a streamed file has, and ranges behave
as for any file."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from csml.coordinator.file_responses import WHOLE_FILE_BYTES, WholeFile
from tests.unit.inproc import HttpWorker, InProcessCoordinator
from tests.unit.test_worker_protocol import claim, complete_batch


def test_a_small_output_comes_whole_with_its_headers_and_ranges(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo", files={"data": b"in"})
    (taken,) = claim(echo_worker, 1).jobs
    content = os.urandom(200_000)
    done = complete_batch(
        echo_worker,
        {
            "job_id": job.id,
            "lease_id": taken.lease_id,
            "state": "succeeded",
            "result": {},
            "inline_outputs": [{"name": "data", "content": base64.b64encode(content).decode()}],
        },
    )
    assert [o.status for o in done.results] == [204]
    path = f"/v1/jobs/{job.id}/outputs/data"

    whole = user.request("GET", path)
    assert whole.status_code == 200
    assert whole.content == content
    headers = whole.headers
    assert headers["content-length"] == str(len(content))
    assert headers["x-content-sha256"] == hashlib.sha256(content).hexdigest()
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-disposition"].startswith("attachment; filename=")
    assert headers["etag"] and headers["last-modified"]

    part = user.request("GET", path, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(content)}"


def _messages(response: WholeFile) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "headers": [], "asgi": {"spec_version": "2.4"}}
    asyncio.run(response(scope, receive, send))
    return sent


def test_only_a_small_file_is_sent_in_one_piece(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"s" * 150_000)
    large.write_bytes(b"L" * (WHOLE_FILE_BYTES + 1))
    for path, bodies in ((small, 1), (large, 17)):  # 64 KiB chunks when streamed
        sent = _messages(WholeFile(path, stat_result=os.stat(path)))
        body = [m for m in sent if m["type"] == "http.response.body"]
        assert len(body) == bodies
        assert b"".join(m["body"] for m in body) == path.read_bytes()
        start = dict(sent[0]["headers"])
        assert start[b"content-length"] == str(path.stat().st_size).encode()


def test_an_inline_output_is_listed_once_and_replaces_an_upload_of_its_name(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    """Inline outputs are described from memory (no meta file); an upload of the same
    name made before the completion is replaced by the inline one, as before."""
    user = coordinator.new_user()
    job = user.submit("echo", "echo", files={"data": b"in"})
    (taken,) = claim(echo_worker, 1).jobs
    assert echo_worker.upload(taken, "data", b"uploaded first").status_code < 300
    inline = base64.b64encode(b"inline wins").decode()
    done = complete_batch(
        echo_worker,
        {
            "job_id": job.id,
            "lease_id": taken.lease_id,
            "state": "succeeded",
            "result": {},
            "inline_outputs": [{"name": "data", "content": inline}],
        },
    )
    assert [o.status for o in done.results] == [204]
    job.wait(timeout=10)
    assert list(job.data.outputs) == ["data"]
    info = job.data.outputs["data"]
    assert info.size == len(b"inline wins")
    assert info.sha256 == hashlib.sha256(b"inline wins").hexdigest()
    assert job.download("data", tmp_path / "out").read_bytes() == b"inline wins"
