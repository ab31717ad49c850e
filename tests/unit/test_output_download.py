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

import httpx

from csml.client import Client
from csml.coordinator.file_responses import WHOLE_FILE_BYTES, BlobResponse, WholeFile
from tests.unit.inproc import HttpWorker, InProcessCoordinator, sent_statements
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


def _under_asgi_23(
    response: WholeFile | BlobResponse, headers: list[tuple[bytes, bytes]], method: str = "GET"
) -> tuple[list[dict[str, Any]], int]:
    """The messages `response` sends to a request of uvicorn's (ASGI 2.3), and how many
    times it called `receive` (a disconnect listener's)."""
    sent: list[dict[str, Any]] = []
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        await asyncio.Event().wait()  # the client stays: nothing comes
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "headers": headers,
        "asgi": {"version": "3.0", "spec_version": "2.3"},
    }
    asyncio.run(response(scope, receive, send))
    return sent, received


def test_a_plain_get_of_a_small_file_or_a_blob_listens_for_no_disconnect(
    tmp_path: Path,
) -> None:
    """Under ASGI 2.3 Starlette's `FileResponse` runs the file's sending in a task group
    beside a `receive` loop; a whole body sent at once needs neither. Ranges and HEAD
    still go through `FileResponse` and answer as before."""
    data = os.urandom(150_000)
    small = tmp_path / "small"
    small.write_bytes(data)

    def answers() -> list[WholeFile | BlobResponse]:
        return [
            WholeFile(small, stat_result=os.stat(small)),
            BlobResponse(data, "blob", 1_700_000_000.0, media_type="image/png"),
        ]

    for response in answers():
        sent, received = _under_asgi_23(response, [])
        assert received == 0
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        assert sent[0]["status"] == 200 and sent[1]["body"] == data
        assert dict(sent[0]["headers"])[b"content-length"] == str(len(data)).encode()
    for response in answers():
        sent, _ = _under_asgi_23(response, [(b"range", b"bytes=10-19")])
        assert sent[0]["status"] == 206
        assert b"".join(m.get("body", b"") for m in sent[1:]) == data[10:20]
    for response in answers():
        sent, _ = _under_asgi_23(response, [], method="HEAD")
        assert sent[0]["status"] == 200
        assert b"".join(m.get("body", b"") for m in sent[1:]) == b""


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


def _succeed_with(worker: HttpWorker, job_id: str, content: bytes) -> None:
    (taken,) = claim(worker, 1).jobs
    assert taken.id == job_id
    done = complete_batch(
        worker,
        {
            "job_id": job_id,
            "lease_id": taken.lease_id,
            "state": "succeeded",
            "result": {},
            "inline_outputs": [{"name": "data", "content": base64.b64encode(content).decode()}],
        },
    )
    assert [o.status for o in done.results] == [204]


def test_a_download_is_one_read_whether_the_database_or_a_file_keeps_it(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """The job, its output's row and (kept in the database) its bytes come in one SELECT:
    no job load beside a read of the bytes."""
    user = coordinator.new_user()
    bound = coordinator.core.settings.db_blob_max_bytes
    for size in (bound // 2, bound + 1000):  # in the database; a file
        job = user.submit("echo", "echo", files={"data": b"in"})
        content = os.urandom(size)
        _succeed_with(echo_worker, job.id, content)
        with sent_statements(coordinator, lambda s: s.startswith("SELECT")) as sent:
            got = user.request("GET", f"/v1/jobs/{job.id}/outputs/data")
        assert got.status_code == 200 and got.content == content
        assert got.headers["x-content-sha256"] == hashlib.sha256(content).hexdigest()
        assert len(sent) == 1, sent


def test_a_download_finds_only_the_owners_job_and_names_the_outputs_it_has(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user, other = coordinator.new_user(), coordinator.new_user()
    job = user.submit("echo", "echo", files={"data": b"in"})
    content = os.urandom(5000)
    _succeed_with(echo_worker, job.id, content)
    by_prefix = user.request("GET", f"/v1/jobs/{job.id[:12]}/outputs/data")
    assert by_prefix.status_code == 200 and by_prefix.content == content
    assert "filename=" in by_prefix.headers["content-disposition"]

    def raw(who: Client, path: str) -> httpx.Response:
        return who._http.get(path, headers=who._headers())

    assert raw(other, f"/v1/jobs/{job.id}/outputs/data").status_code == 404
    missing = raw(user, f"/v1/jobs/{job.id}/outputs/nope")
    assert missing.status_code == 404 and "outputs: data" in missing.text
    assert raw(user, f"/v1/jobs/{'0' * len(job.id)}/outputs/data").status_code == 404
