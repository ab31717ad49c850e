"""Outputs over 256 KiB inline in a completion (`WorkerRegistered.inline_output_bytes`,
at most `INLINE_OUTPUT_MAX_BYTES`): the coordinator says the bound at registration; a
completion, alone or riding a claim, lands such an output's bytes where an upload's land
(a file in the attempt's folder, counted in its owner's stored bytes), only for the
worker holding the job's lease, and refuses one over the bound (`max_output_bytes`
lowers it) without landing anything. The agent sends an output within the bound inline
and none larger."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from csml.apps.echo import app as echo_app
from csml.schemas import ClaimedJob, ClaimResponse, WorkerRegistered
from csml.schemas.workers import INLINE_MAX_BYTES, INLINE_OUTPUT_MAX_BYTES
from csml.store import jobs_quota
from csml.store.blobs import in_db
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import HttpWorker, InProcessCoordinator
from tests.unit.test_worker_protocol import claim, complete_batch

LARGE = 700_000  # over the old inline bound (256 KiB), within the new one (1 MiB)


def done(job: ClaimedJob, content: bytes, lease_id: str | None = None) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "lease_id": job.lease_id if lease_id is None else lease_id,
        "state": "succeeded",
        "result": {"n": 1},
        "inline_outputs": [{"name": "data", "content": base64.b64encode(content).decode()}],
    }


def stored(coordinator: InProcessCoordinator, owner_id: str) -> int:
    with coordinator.core.queue.read() as conn:
        return jobs_quota.stored_bytes(conn, owner_id)


def attempt_files(coordinator: InProcessCoordinator, job: ClaimedJob, lease_id: str) -> list[str]:
    folder = coordinator.core.queue.attempt_dir(job.id, lease_id)
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_registration_says_how_large_an_output_may_come_inline(
    make_coordinator: MakeCoordinator,
) -> None:
    assert INLINE_OUTPUT_MAX_BYTES > INLINE_MAX_BYTES
    default = make_coordinator().worker(echo_app)
    assert default.registered.inline_output_bytes == INLINE_OUTPUT_MAX_BYTES
    # No more than an upload may bring, nor than half a worker's JSON body in base64.
    capped = make_coordinator(max_output_bytes=300_000).worker(echo_app)
    assert capped.registered.inline_output_bytes == 300_000
    small_body = make_coordinator(max_worker_json_bytes=1 << 20).worker(echo_app)
    assert small_body.registered.inline_output_bytes == (1 << 20) * 3 // 8


def test_a_coordinator_that_says_nothing_allows_what_it_always_did() -> None:
    older = {"worker_id": "w", "worker_token": "t", "lease_seconds": 60, "heartbeat_seconds": 10}
    assert WorkerRegistered.model_validate(older).inline_output_bytes == INLINE_MAX_BYTES
    # A newer coordinator may allow more: this worker still joins (and sends no more than
    # it knows, `WorkerAgent.register`).
    newer = {**older, "inline_output_bytes": 4 * INLINE_OUTPUT_MAX_BYTES}
    assert WorkerRegistered.model_validate(newer).inline_output_bytes == 4 << 20


def test_a_large_inline_output_lands_as_an_uploaded_one_would(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo", files={"data": b"in"})
    owner = coordinator.job_row(job.id).owner_id
    before = stored(coordinator, owner)
    (taken,) = claim(echo_worker, 1).jobs
    content = os.urandom(LARGE)
    assert [o.status for o in complete_batch(echo_worker, done(taken, content)).results] == [204]
    job.wait(timeout=10)
    assert job.state.value == "succeeded"
    # A file in the attempt's folder (over the database's bound), fsync'd before the 204.
    f = job.data.outputs["data"]
    assert f.size == LARGE
    assert attempt_files(coordinator, taken, taken.lease_id) == ["data"]
    assert stored(coordinator, owner) == before + LARGE  # counted where the bytes land
    assert job.download("data", tmp_path / "out").read_bytes() == content


def test_a_large_inline_output_rides_a_claim(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    user = coordinator.new_user()
    first, second = (user.submit("echo", "echo", params={"i": i}) for i in range(2))
    (taken,) = claim(echo_worker, 1).jobs
    content = os.urandom(LARGE)
    r = echo_worker.post(
        "/claim", {"max_jobs": 1, "wait": 0, "completions": [done(taken, content)]}
    )
    assert r.status_code == 200, r.text
    answer = ClaimResponse.model_validate(r.json())
    assert [o.status for o in answer.results] == [204]
    assert [j.id for j in answer.jobs] == [second.id]
    first.wait(timeout=10)
    assert first.download("data", tmp_path / "out").read_bytes() == content


def test_a_worker_not_holding_the_lease_lands_nothing(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo")
    (taken,) = claim(echo_worker, 1).jobs
    owner = coordinator.job_row(job.id).owner_id
    before = stored(coordinator, owner)
    other = coordinator.worker(echo_app)  # another worker of the same join token's app
    content = os.urandom(LARGE)
    # The job's very lease, from a worker that does not hold it; then a lease not granted.
    for worker, lease in ((other, taken.lease_id), (echo_worker, "not-the-lease")):
        results = complete_batch(worker, done(taken, content, lease)).results
        assert [o.status for o in results] == [409]
        assert attempt_files(coordinator, taken, lease) == []
    assert stored(coordinator, owner) == before
    # Still running under its lease: its holder completes it once.
    again = complete_batch(echo_worker, done(taken, content[:10])).results
    assert [o.status for o in again] == [204]


def test_an_inline_output_over_the_bound_is_refused_and_lands_nothing(
    make_coordinator: MakeCoordinator,
) -> None:
    coordinator = make_coordinator(max_output_bytes=300_000)
    worker = coordinator.worker(echo_app)
    user = coordinator.new_user()
    job = user.submit("echo", "echo")
    (taken,) = claim(worker, 1).jobs
    results = complete_batch(worker, done(taken, os.urandom(300_001))).results
    assert [(o.status, "over 300000" in o.error) for o in results] == [(413, True)]
    assert attempt_files(coordinator, taken, taken.lease_id) == []
    # Within it, the same output lands (a file: over the database's bound).
    results = complete_batch(worker, done(taken, os.urandom(300_000))).results
    assert [o.status for o in results] == [204]
    (f,) = [f for f in coordinator.job_row(job.id).files if f.kind == "output"]
    assert f.size == 300_000 and not in_db(f.blob)
