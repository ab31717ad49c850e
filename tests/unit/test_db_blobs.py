"""Small blobs in the database (`csml.store.blobs`, "Small blobs in the database"): a
batch item's inline input and a completion's inline output of at most
`db_blob_max_bytes` are kept in their rows, not as files (no file, no folder), served
over HTTP as a file would be, counted by the stored-bytes quota as a file is, and gone
with their rows (erasure, retention); a larger one is still a file."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import httpx
from sqlalchemy import func, select

from csml.apps.echo import app as echo_app
from csml.client import Client
from csml.schemas.workers import ClaimedJob
from csml.store import jobs_quota
from csml.store.blobs import in_db
from csml.store.jobs import FileRow, JobRow
from csml.store.tables import JobFile
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import HttpWorker, InProcessCoordinator
from tests.unit.test_batch_submit import echo_item, post
from tests.unit.test_worker_protocol import claim, complete_batch

PHOTO = bytes(range(256)) * 40  # 10 KiB: under the default bound (256 KiB)


def _submit(coordinator: InProcessCoordinator, user: Client, *inputs: bytes) -> list[str]:
    r = post(coordinator, user, {"items": [echo_item({}, data=data) for data in inputs]})
    assert r.status_code == 200 and r.json()["accepted"] == len(inputs), r.text
    return [item["job"]["id"] for item in r.json()["items"]]


def _file(row: JobRow, kind: str) -> FileRow:
    (f,) = [f for f in row.files if f.kind == kind]
    return f


def _inline_done(taken: ClaimedJob, content: bytes) -> dict[str, Any]:
    return {
        "job_id": taken.id,
        "lease_id": taken.lease_id,
        "state": "succeeded",
        "result": {},
        "inline_outputs": [{"name": "data", "content": base64.b64encode(content).decode()}],
    }


def _contents_kept(coordinator: InProcessCoordinator) -> int:
    """File rows holding bytes in the database, all jobs together."""
    with coordinator.core.queue.read() as conn:
        stmt = select(func.count()).select_from(JobFile).where(JobFile.content.is_not(None))
        return int(conn.scalar(stmt) or 0)


def _stored(coordinator: InProcessCoordinator, owner_id: str) -> int:
    with coordinator.core.queue.read() as conn:
        return jobs_quota.stored_bytes(conn, owner_id)


def _get_output(
    coordinator: InProcessCoordinator, user: Client, job_id: str, **headers: str
) -> httpx.Response:
    return coordinator.http.get(
        f"/v1/jobs/{job_id}/outputs/data", headers={**user._headers(), **headers}
    )


def test_a_small_inline_input_is_kept_in_its_row_and_no_file_is_made(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    blobs = coordinator.core.blobs
    (job_id,) = _submit(coordinator, user, PHOTO)
    f = _file(coordinator.job_row(job_id), "input")
    assert in_db(f.blob) and f.content is None  # a load never carries the bytes
    assert f.size == len(PHOTO) and f.sha256 == hashlib.sha256(PHOTO).hexdigest()
    assert coordinator.core.queue.file_content(coordinator.job_row(job_id).seq, "input", "data")
    assert not blobs.job_dir(job_id).exists()  # no folder, no file
    assert list((blobs.root / "staging").iterdir()) == []
    blobs.base64.clear()  # the claim reads the row, not the memo
    (taken,) = claim(echo_worker, 1).jobs
    assert base64.b64decode(taken.inline_inputs["data"]) == PHOTO
    got = echo_worker.download(taken, "data")  # as a worker that did not take it inline
    assert got.status_code == 200 and got.content == PHOTO
    assert got.headers["content-length"] == str(len(PHOTO))
    assert got.headers["content-type"] == "application/octet-stream"
    assert {"etag", "last-modified", "accept-ranges"} <= got.headers.keys()


def test_a_small_uploaded_input_is_kept_in_its_row_and_its_staged_file_removed(
    make_coordinator: MakeCoordinator,
) -> None:
    coordinator = make_coordinator(db_blob_max_bytes=len(PHOTO))
    worker = coordinator.worker(echo_app)
    user = coordinator.new_user()
    blobs = coordinator.core.blobs
    small = user.submit("echo", "echo", files={"data": PHOTO})
    large = user.submit("echo", "echo", files={"data": PHOTO + b"!"})
    f = _file(coordinator.job_row(small.id), "input")
    assert in_db(f.blob) and f.sha256 == hashlib.sha256(PHOTO).hexdigest()
    assert not blobs.job_dir(small.id).exists()
    assert list((blobs.root / "staging").iterdir()) == []
    g = _file(coordinator.job_row(large.id), "input")
    assert not in_db(g.blob) and blobs.path(g.blob).read_bytes() == PHOTO + b"!"
    blobs.base64.clear()
    taken = {t.id: t for t in claim(worker, 2).jobs}
    assert base64.b64decode(taken[small.id].inline_inputs["data"]) == PHOTO
    assert worker.download(taken[small.id], "data").content == PHOTO


def test_a_small_inline_output_is_kept_in_its_row_and_served_as_a_file_would_be(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    blobs = coordinator.core.blobs
    kept_id, filed_id = _submit(coordinator, user, b"a", b"b")
    taken = {t.id: t for t in claim(echo_worker, 2).jobs}
    # The same bytes twice: inline (kept in the database), and uploaded (a file).
    assert echo_worker.upload(taken[filed_id], "data", PHOTO).status_code == 204
    filed_done = {k: v for k, v in _inline_done(taken[filed_id], PHOTO).items()}
    del filed_done["inline_outputs"]
    results = complete_batch(echo_worker, _inline_done(taken[kept_id], PHOTO), filed_done)
    assert [r.status for r in results.results] == [204, 204]
    kept, filed = (
        _file(coordinator.job_row(kept_id), "output"),
        _file(coordinator.job_row(filed_id), "output"),
    )
    assert in_db(kept.blob) and not in_db(filed.blob)
    assert not blobs.job_dir(kept_id).exists()  # no attempt folder
    assert blobs.path(filed.blob).read_bytes() == PHOTO
    a, b = _get_output(coordinator, user, kept_id), _get_output(coordinator, user, filed_id)
    assert a.status_code == b.status_code == 200
    assert a.content == b.content == PHOTO
    assert a.headers.keys() == b.headers.keys()
    for name in ("content-type", "content-length", "x-content-sha256", "accept-ranges"):
        assert a.headers[name] == b.headers[name], name
    assert a.headers["content-disposition"].endswith('-data.bin"') or a.headers[
        "content-disposition"
    ] == b.headers["content-disposition"].replace(filed_id[:8], kept_id[:8])
    ranged = _get_output(coordinator, user, kept_id, Range="bytes=10-19")
    assert ranged.status_code == 206 and ranged.content == PHOTO[10:20]
    assert ranged.headers["content-range"] == f"bytes 10-19/{len(PHOTO)}"


def test_a_blob_over_the_bound_is_still_a_file(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(db_blob_max_bytes=100)
    worker = coordinator.worker(echo_app)
    user = coordinator.new_user()
    blobs = coordinator.core.blobs
    small, large = _submit(coordinator, user, b"x" * 100, PHOTO)
    assert in_db(_file(coordinator.job_row(small), "input").blob)
    f = _file(coordinator.job_row(large), "input")
    assert not in_db(f.blob) and blobs.path(f.blob).read_bytes() == PHOTO
    taken = {t.id: t for t in claim(worker, 2).jobs}
    complete_batch(
        worker, _inline_done(taken[small], b"y" * 100), _inline_done(taken[large], PHOTO)
    )
    assert in_db(_file(coordinator.job_row(small), "output").blob)
    out = _file(coordinator.job_row(large), "output")
    assert not in_db(out.blob) and blobs.path(out.blob).read_bytes() == PHOTO


def test_the_bound_zero_keeps_every_blob_a_file(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(db_blob_max_bytes=0)
    user = coordinator.new_user()
    (job_id,) = _submit(coordinator, user, b"tiny")
    f = _file(coordinator.job_row(job_id), "input")
    assert not in_db(f.blob) and coordinator.core.blobs.path(f.blob).read_bytes() == b"tiny"
    assert _contents_kept(coordinator) == 0


def test_the_stored_bytes_quota_counts_a_kept_blob_as_a_file(
    make_coordinator: MakeCoordinator,
) -> None:
    coordinator = make_coordinator(max_stored_bytes=len(PHOTO) * 2 + 110)
    worker = coordinator.worker(echo_app)
    user = coordinator.new_user()
    (job_id,) = _submit(coordinator, user, PHOTO)
    owner = coordinator.job_row(job_id).owner_id
    assert _stored(coordinator, owner) == len(PHOTO)  # its input, kept in the database
    (taken,) = claim(worker, 1).jobs
    complete_batch(worker, _inline_done(taken, PHOTO[:100]))
    assert _stored(coordinator, owner) == len(PHOTO) + 100  # and its output
    # One more photo fits, a second does not: refused where the bytes would land.
    r = post(coordinator, user, {"items": [echo_item({}, data=PHOTO) for _ in range(2)]})
    assert [item["status"] for item in r.json()["items"]] == [202, 429], r.text
    assert _stored(coordinator, owner) == 2 * len(PHOTO) + 100
    assert _contents_kept(coordinator) == 3


def test_erasure_and_retention_take_the_kept_bytes_with_their_rows(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    erased, kept = coordinator.new_user(), coordinator.new_user()
    (first,) = _submit(coordinator, erased, PHOTO)
    (second,) = _submit(coordinator, kept, PHOTO)
    taken = {t.id: t for t in claim(echo_worker, 2).jobs}
    complete_batch(echo_worker, *(_inline_done(t, PHOTO) for t in taken.values()))
    assert _contents_kept(coordinator) == 4  # two inputs, two outputs
    erased.delete_identity()
    assert _contents_kept(coordinator) == 2  # the other identity's stay
    assert _get_output(coordinator, kept, second).content == PHOTO
    hours = coordinator.settings.retention_hours
    coordinator.clock.advance(hours * 3600 + 1)
    assert coordinator.sweep() == 1
    assert _contents_kept(coordinator) == 0
    assert first != second
