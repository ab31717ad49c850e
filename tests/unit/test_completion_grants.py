"""A completion's inline outputs are written on the lease this coordinator granted by a
claim, without reading the job first (`JobQueue._Granted`); a completion of a lease
granted elsewhere reads it as before; files written on a grant for a completion the
transaction refuses are removed."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from csml.apps.echo import app as echo_app
from csml.schemas import ClaimedJob, ClaimResponse
from csml.schemas.workers import CompletionResults
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import HttpWorker, InProcessCoordinator, sent_statements

PREPARE_READ = "SELECT jobs.seq, jobs.id, jobs.owner_id, jobs.app, jobs.operation, jobs.state"
OUTPUT = b"the output's bytes"


def done(job: ClaimedJob, content: bytes = OUTPUT) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "lease_id": job.lease_id,
        "state": "succeeded",
        "result": {"n": 1},
        "inline_outputs": [{"name": "data", "content": base64.b64encode(content).decode()}],
    }


def ride(
    coordinator: InProcessCoordinator, worker: HttpWorker, *completions: dict[str, Any]
) -> tuple[ClaimResponse, list[str]]:
    """`worker`'s claim to `coordinator` (same token: the store is shared) carrying
    `completions`; its answer and the statements the coordinator sent."""
    there = HttpWorker(coordinator.http, worker.app, worker.registered)
    with sent_statements(coordinator) as sent:
        r = there.post("/claim", {"max_jobs": 1, "wait": 0, "completions": list(completions)})
    assert r.status_code == 200, r.text
    return ClaimResponse.model_validate(r.json()), sent


def test_a_granted_lease_needs_no_read_before_its_inline_outputs_are_written(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    """Pinned count: the completion's inline outputs are written without the read of
    who holds the lease (it was one `SELECT … jobs` per completion with outputs)."""
    job = coordinator.new_user().submit("echo", "echo")
    [taken] = echo_worker.claim(1)
    answer, sent = ride(coordinator, echo_worker, done(taken))
    assert [o.status for o in answer.results] == [204]
    assert not any(s.startswith(PREPARE_READ) for s in sent), sent
    job.wait(timeout=10)
    assert job.state.value == "succeeded"
    assert job.download("data", tmp_path / "out").read_bytes() == OUTPUT


def test_a_lease_granted_by_another_coordinator_is_read_first(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    first, second = make_coordinator(), make_coordinator()
    worker = first.worker(echo_app)
    job = first.new_user().submit("echo", "echo")
    [taken] = worker.claim(1)
    answer, sent = ride(second, worker, done(taken))
    assert [o.status for o in answer.results] == [204]
    assert len([s for s in sent if s.startswith(PREPARE_READ)]) == 1, sent
    job.wait(timeout=10)
    assert job.download("data", tmp_path / "out").read_bytes() == OUTPUT
    # The grant stays unused on the first coordinator: a repeat there is refused and
    # removes nothing the kept completion listed.
    again, _ = ride(first, worker, done(taken, b"other bytes"))
    assert [o.status for o in again.results] == [409]
    assert job.download("data", tmp_path / "again").read_bytes() == OUTPUT


def test_outputs_written_on_a_grant_for_a_refused_completion_are_removed(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    job = coordinator.new_user().submit("echo", "echo")
    [taken] = echo_worker.claim(1)
    job.cancel()  # the lease is gone; the worker has not heard yet
    answer, _ = ride(coordinator, echo_worker, done(taken))
    assert [o.status for o in answer.results] == [409]
    folder = coordinator.core.queue.attempt_dir(taken.id, taken.lease_id)
    assert not (folder / "data").exists()
    # The completion path names the same folder by text, without pathlib.
    assert coordinator.core.queue.attempt_dir_name(taken.id, taken.lease_id) == str(folder)


def test_a_grant_is_used_by_the_lease_it_names_only(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    job = coordinator.new_user().submit("echo", "echo")
    [taken] = echo_worker.claim(1)
    wrong = {**done(taken), "lease_id": "not-the-lease"}
    r = echo_worker.post("/complete", {"completions": [wrong, done(taken)]})
    assert r.status_code == 200, r.text
    results = CompletionResults.model_validate(r.json()).results
    assert [o.status for o in results] == [409, 204]
    assert not coordinator.core.queue.attempt_dir(taken.id, "not-the-lease").exists()
    job.wait(timeout=10)
    assert job.state.value == "succeeded"
