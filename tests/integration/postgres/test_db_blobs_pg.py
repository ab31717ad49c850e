"""Small blobs in the database on PostgreSQL (`csml.store.blobs`, migration
0012_blob_content): a batch item's inline input and a completion's inline output are
kept in their rows (bytea), read back whole for a claim and a download, counted by the
stored-bytes triggers as files are, and gone with the identity's erasure; one over the
bound is still a file."""

from __future__ import annotations

import base64
import json

import pytest
from sqlalchemy import func, select

from csml.coordinator import abuse, batches
from csml.coordinator.state import Core
from csml.refusals import NotFound
from csml.schemas import JobCompletion
from csml.schemas.workers import InlineOutput
from csml.store import jobs as store
from csml.store import jobs_quota
from csml.store.blobs import in_db
from csml.store.jobs import JobRow
from csml.store.tables import JobFile
from tests.integration.postgres.support import MakeCore, new_identity, new_worker

PHOTO = bytes(range(256)) * 40


def _batch(core: Core, owner: str, *inputs: bytes) -> list[str]:
    items = [
        {
            "spec": {"app": "echo", "operation": "echo", "params": {}},
            "inputs": {"data": base64.b64encode(data).decode()},
        }
        for data in inputs
    ]
    raw = json.dumps({"items": items}).encode()
    outcomes = batches.submit(core, owner, batches.read(raw, core.settings.max_params_depth))
    assert all(o.job is not None for o in outcomes), [o.error for o in outcomes]
    return [o.job.id for o in outcomes if o.job is not None]


def _row(core: Core, job_id: str) -> JobRow:
    with core.queue.read() as conn:
        row = store.by_id(conn, job_id)
    assert row is not None
    return row


def _contents_kept(core: Core) -> int:
    with core.queue.read() as conn:
        stmt = select(func.count()).select_from(JobFile).where(JobFile.content.is_not(None))
        return int(conn.scalar(stmt) or 0)


def test_small_blobs_are_kept_in_their_rows_on_postgresql(make_core: MakeCore) -> None:
    core = make_core(db_blob_max_bytes=len(PHOTO))
    owner, worker = new_identity(core), new_worker(core)
    small, large = _batch(core, owner, PHOTO, PHOTO + b"!")
    f = next(f for f in _row(core, small).files if f.kind == "input")
    assert in_db(f.blob) and not core.blobs.job_dir(small).exists()
    g = next(f for f in _row(core, large).files if f.kind == "input")
    assert not in_db(g.blob) and core.blobs.path(g.blob).read_bytes() == PHOTO + b"!"
    core.blobs.base64.clear()  # the claim reads the row
    taken = {t.id: t for t in core.queue.claim(worker, 2)}
    assert base64.b64decode(taken[small].inline_inputs["data"]) == PHOTO
    for job_id in (small, large):
        out = InlineOutput(name="data", content=base64.b64encode(PHOTO).decode())
        done = JobCompletion(
            lease_id=taken[job_id].lease_id, state="succeeded", result={}, inline_outputs=[out]
        )
        core.queue.complete(worker, job_id, done)
    row = _row(core, small)
    out_file = next(f for f in row.files if f.kind == "output")
    assert in_db(out_file.blob)
    assert core.queue.file_content(row.seq, "output", "data") == PHOTO
    assert core.queue.file_content(row.seq, "input", "data") == PHOTO
    # A download's one read (`owned_file`): the bytes from the row, by id or prefix; a
    # file on disk without them; another identity's job not at all.
    found = core.queue.owned_file(owner, small[:12], "output", "data")
    assert found is not None and found.job_id == small and found.file.content == PHOTO
    on_disk = core.queue.owned_file(owner, large, "input", "data")
    assert on_disk is not None and on_disk.file.content is None
    assert not in_db(on_disk.file.blob) and on_disk.file.size == len(PHOTO) + 1
    assert core.queue.owned_file(owner, small, "output", "nope") is None
    with pytest.raises(NotFound):
        core.queue.owned_file(new_identity(core), small, "output", "data")
    assert _contents_kept(core) == 3  # both outputs are at the bound; one input over it
    with core.queue.read() as conn:
        stored = jobs_quota.stored_bytes(conn, owner)
        assert stored == jobs_quota.summed_stored_bytes(conn, owner)
    assert stored == 3 * len(PHOTO) + len(PHOTO) + 1  # each blob once, wherever it is
    abuse.delete_identity(core, owner)
    assert _contents_kept(core) == 0
