"""Large files over HTTP without thread-pool hops where the bytes are in the page cache:
a submission's upload after its spec's check, a worker's input download and output
upload (`csml.coordinator.uploads`, `csml.coordinator.file_responses`, the worker routes).

Hops are counted by wrapping anyio's `to_thread.run_sync` (the real one still runs):
Starlette's `run_in_threadpool`, `FileResponse`'s file calls and the multipart parser all
go through it."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest

from csml.coordinator.uploads import (
    LOOP_BYTES,
    SMALL_SUBMISSION_BYTES,
    Accepts,
    FormLimits,
    parse_submission,
)
from tests.unit.inproc import HttpWorker, InProcessCoordinator, sent_statements
from tests.unit.test_bodies import BOUNDARY, part, refuse
from tests.unit.test_worker_protocol import claim, complete_batch


@contextmanager
def counted_hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the functions sent to anyio's thread pool meanwhile."""
    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        named = func.func if isinstance(func, functools.partial) else func
        hops.append(getattr(named, "__qualname__", repr(named)))
        return await real(func, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(anyio.to_thread, "run_sync", run_sync)
        yield hops


class Streamed:
    """A request whose body arrives in the given chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}
        self.chunks = chunks

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


class RecordingBudget:
    """A budget that covers everything and records the thread of each charge."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def covers(self, received: int) -> bool:
        return True

    def __call__(self, received: int) -> None:
        self.threads.append(threading.get_ident())


def _parse(tmp_path: Path, chunks: list[bytes], budget: RecordingBudget) -> tuple[Any, int]:
    limits = FormLimits(file_bytes=1 << 30, request_bytes=1 << 30, parts=8, spec_bytes=100)

    async def main() -> tuple[Any, int]:
        parsed = await parse_submission(
            Streamed(chunks), tmp_path, limits, lambda raw: Accepts({"a"}, refuse), budget
        )
        return parsed, threading.get_ident()

    return asyncio.run(main())


def test_chunks_after_the_spec_are_parsed_on_the_event_loop(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    body = part("spec", b"{}") + part("a", data) + b"--" + BOUNDARY + b"--\r\n"
    head = body.index(data) + 1000  # the spec and the start of the file
    chunks = [body[:head], body[head : head + 150_000], body[head + 150_000 :]]
    budget = RecordingBudget()
    parsed, loop_thread = _parse(tmp_path, chunks, budget)
    assert parsed.files["a"].sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "a").read_bytes() == data
    first, *rest = budget.threads
    assert first != loop_thread  # the chunk with the spec: its check may read the store
    assert rest and all(t == loop_thread for t in rest)


def test_past_loop_bytes_chunks_go_to_the_thread_pool(tmp_path: Path) -> None:
    data = b"z" * (LOOP_BYTES + 200_000)
    body = part("spec", b"{}") + part("a", data) + b"--" + BOUNDARY + b"--\r\n"
    step = 1 << 20
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    budget = RecordingBudget()
    parsed, loop_thread = _parse(tmp_path, chunks, budget)
    assert parsed.files["a"].size == len(data)
    on_loop = sum(t == loop_thread for t in budget.threads)
    assert 0 < on_loop < len(budget.threads)
    assert budget.threads[-1] != loop_thread  # the last chunks, past the bound


def test_a_large_submission_takes_two_hops_and_reads_its_stored_bytes_once(
    coordinator: InProcessCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `SMALL_SUBMISSION_BYTES`: the early check (which also seeds the storage
    budget) with the chunk holding the spec, then the fsync of the file too large to be
    kept in memory; nothing per later chunk, nothing to discard."""
    user = coordinator.new_user()
    user.submit("echo", "echo", files={"data": b"warm"})  # the identity is remembered
    stored = lambda s: "stored_bytes" in s and s.startswith("SELECT")  # noqa: E731
    with counted_hops(monkeypatch) as hops, sent_statements(coordinator, stored) as reads:
        job = user.submit("echo", "echo", files={"data": os.urandom(SMALL_SUBMISSION_BYTES)})
    assert job.id
    assert hops == ["parse_submission.<locals>.first", "fsync_paths"]
    assert len(reads) == 1, reads  # the early check's, not again for the budget


def test_a_small_submission_on_disk_hops_only_for_its_fsync(
    coordinator: InProcessCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within `SMALL_SUBMISSION_BYTES`, a file too large to be kept in memory: parsed on
    the event loop from its spec on (no early check: its write checks the quotas), one
    hop for the fsync; the identity's stored bytes are not read before the write."""
    user = coordinator.new_user()
    user.submit("echo", "echo", files={"data": b"warm"})  # the identity is remembered
    stored = lambda s: "stored_bytes" in s and s.startswith("SELECT")  # noqa: E731
    with counted_hops(monkeypatch) as hops, sent_statements(coordinator, stored) as reads:
        job = user.submit("echo", "echo", files={"data": os.urandom(400_000)})
    assert job.id
    assert hops == ["fsync_paths"]
    assert reads == []


def test_a_small_upload_stays_in_memory_no_hop_and_no_staging_folder(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file part within `db_blob_max_bytes` is held in memory while it is parsed: no
    staged file written, read back and removed, no staging folder made and discarded,
    no hop at all (a small submission: no early check); its bytes reach the job as sent."""
    user = coordinator.new_user()
    user.submit("echo", "echo", files={"data": b"warm"})  # the identity is remembered
    staging = coordinator.core.blobs.root / "staging"
    data = os.urandom(100_000)
    with counted_hops(monkeypatch) as hops:
        job = user.submit("echo", "echo", files={"data": data})
    assert hops == []
    assert list(staging.iterdir()) == []
    [claimed] = [j for j in claim(echo_worker, 8).jobs if j.id == job.id]
    assert base64.b64decode(claimed.inline_inputs["data"]) == data


def test_a_worker_moves_large_files_without_per_chunk_hops(
    coordinator: InProcessCoordinator,
    echo_worker: HttpWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = coordinator.new_user()
    content = os.urandom(700_000)  # over the inline bound: claimed without its bytes
    job = user.submit("echo", "echo", files={"data": content})
    (taken,) = claim(echo_worker, 1).jobs
    with counted_hops(monkeypatch) as hops:
        got = echo_worker.download(taken, "data")
    assert got.status_code == 200 and got.content == content
    assert hops == []  # read whole on the event loop
    with counted_hops(monkeypatch) as hops:
        put = echo_worker.upload(taken, "data", content[::-1])
    assert put.status_code == 204, put.text
    assert len(hops) == 1, hops  # the meta file and the fsyncs, together
    assert job.id


@pytest.mark.parametrize("over", [False, True])
def test_a_completion_hops_only_to_write_a_file(
    coordinator: InProcessCoordinator,
    echo_worker: HttpWorker,
    monkeypatch: pytest.MonkeyPatch,
    over: bool,
) -> None:
    """An inline output the database keeps (within `db_blob_max_bytes`) is decoded and
    hashed on the event loop: its completion takes no thread-pool hop; one over it is
    written as a file and fsync'd, in one hop. Both come back as sent."""
    user = coordinator.new_user()
    bound = coordinator.core.settings.db_blob_max_bytes
    job = user.submit("echo", "echo", files={"data": b"in"})
    (taken,) = claim(echo_worker, 1).jobs
    content = os.urandom(bound + 3 if over else bound)
    with counted_hops(monkeypatch) as hops:
        done = complete_batch(
            echo_worker,
            {
                "job_id": taken.id,
                "lease_id": taken.lease_id,
                "state": "succeeded",
                "result": {},
                "inline_outputs": [{"name": "data", "content": base64.b64encode(content).decode()}],
            },
        )
    assert [o.status for o in done.results] == [204]
    assert hops == (["JobQueue._prepare"] if over else [])
    got = user.request("GET", f"/v1/jobs/{job.id}/outputs/data")
    assert got.status_code == 200 and got.content == content
