"""Retention with the clock set: finished jobs and their files go `retention_hours` after
they end; a pipeline's finished steps stay while the pipeline runs, then go with it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from csml.store.tables import Job
from csml.store.tables_abuse import PendingPurge
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import InProcessCoordinator

HOUR = 3600.0


def job_folder(coordinator: InProcessCoordinator, job_id: str) -> Path:
    return coordinator.core.blobs.job_dir(job_id)


def count(coordinator: InProcessCoordinator, *job_ids: str) -> int:
    with coordinator.core.sessions() as session:
        return int(session.scalar(select(func.count()).where(Job.id.in_(job_ids))) or 0)


def test_a_finished_job_goes_after_the_retention_period(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    from csml.apps.echo import app as echo_app

    coordinator = make_coordinator(retention_hours=1)
    worker = coordinator.worker(echo_app)
    user = coordinator.new_user()
    job = user.submit("echo", "echo", files={"data": b"kept for an hour"})
    queued_only = user.submit("echo", "echo")
    [claimed] = worker.claim()
    assert worker.run(claimed, tmp_path).status_code == 204
    coordinator.clock.advance(HOUR - 1)
    assert coordinator.sweep() == 0
    assert job_folder(coordinator, job.id).is_dir()
    coordinator.clock.advance(2)
    assert coordinator.sweep() == 1
    assert count(coordinator, job.id) == 0 and not job_folder(coordinator, job.id).exists()
    assert [j.id for j in user.jobs()] == [queued_only.id]  # unfinished jobs are kept


def test_finished_steps_stay_while_their_pipeline_runs(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    from csml.apps.echo import app as echo_app

    coordinator = make_coordinator(retention_hours=1)
    worker = coordinator.worker(echo_app)
    user = coordinator.new_user()
    steps = [
        {"name": "copy", "app": "echo", "operation": "echo", "inputs": {"data": "upload:doc"}},
        {"name": "again", "app": "echo", "operation": "echo", "inputs": {"data": "copy.data"}},
    ]
    job = user.submit_pipeline(steps, files={"doc": b"kept while it runs"})
    [first] = worker.claim()
    assert worker.run(first, tmp_path).status_code == 204
    [second] = worker.claim()
    # Step 1 ended more than the retention period ago; the pipeline still runs.
    coordinator.clock.advance(HOUR + 1)
    assert worker.heartbeat(second).abort == []
    assert coordinator.sweep() == 0
    assert count(coordinator, first.id) == 1 and job_folder(coordinator, first.id).is_dir()
    assert worker.run(second, tmp_path).status_code == 204
    assert job.wait(timeout=10).state.value == "succeeded", job.error
    assert job.result == {
        "steps": {"copy": {"params": {"sleep": 0.0}}, "again": {"params": {"sleep": 0.0}}}
    }
    # Once the pipeline has ended and expired, it goes with all its steps, rows and files.
    everything = [job.id, first.id, second.id]
    coordinator.clock.advance(HOUR + 1)
    assert coordinator.sweep() == 1  # one pipeline, counted once
    assert count(coordinator, *everything) == 0
    assert not any(job_folder(coordinator, i).exists() for i in everything)
    with coordinator.core.sessions() as session:
        assert session.scalar(select(func.count()).select_from(PendingPurge)) == 0
