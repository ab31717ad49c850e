"""A completion that starts a pipeline's next step, or keeps a model, may run more than
once before it commits: the writer runs a `Rerunnable` batch again with savepoints when
an op after it fails, and a deadlock (PostgreSQL) runs the completion again. Nothing of
an undone run may stay behind, on disk either: every job folder has its job's row, every
model folder its model's.

The step that takes a model is of a pipeline submitted before pipelines pinned their
models at submission (its pin is removed here to make one): starting it pins the model
on the pipeline then, at a path that is the same for every run, where a link of an
undone run is found again (and goes with the pipeline), instead of under the new step's
id, which is drawn anew by each run."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, delete, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import InstrumentedAttribute

from csml.apps.base import App, Input, JobContext, ModelSpec, OperationParams, Output
from csml.apps.echo import app as echo_app
from csml.coordinator.artifacts import PINNED
from csml.coordinator.queue import JobQueue
from csml.schemas import ClaimedJob
from csml.schemas.workers import BatchedCompletion
from csml.store.tables import Job, JobFile
from csml.store.tables_artifacts import ModelArtifact
from csml.store.writer import Rerunnable
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import HttpWorker, InProcessCoordinator
from tests.unit.test_writer import queue_behind_gate

SPEC = ModelSpec("thing", "csml-test-thing", 1)
WEIGHTS = b"the weights of a thing"
thing = App("thing", version="1.0", description="Keeps a model, then uses it, for tests.")


class NoParams(OperationParams):
    pass


class UseParams(OperationParams):
    model: str | None = None


@thing.operation(outputs=[Output("model", model=SPEC)])
def train(ctx: JobContext, params: NoParams) -> dict[str, Any]:
    ctx.output("model").write_bytes(WEIGHTS)
    return {}


@thing.operation(inputs=[Input("model", model=SPEC)], outputs=[Output("out")])
def use(ctx: JobContext, params: UseParams) -> dict[str, Any]:
    ctx.output("out").write_bytes(ctx.input("model").read_bytes())
    return {}


class DeadlockDetected(Exception):
    sqlstate = "40P01"  # what psycopg raises when PostgreSQL breaks a deadlock


def undo_by_a_later_failure(queue: JobQueue, op: Callable[[Connection], Any]) -> None:
    """The writer's way: `op` runs bare in a batch, an op after it fails, the writer rolls
    the batch back and runs `op` again, with a savepoint."""

    runs = 0

    def counted(conn: Connection) -> Any:
        nonlocal runs
        runs += 1
        return op(conn)

    def failing(conn: Connection) -> None:
        raise ValueError("refused")

    assert isinstance(op, Rerunnable)  # an echo step's completion: it may run bare
    queue.writer.max_batch_seconds = 10.0  # one batch, however long the completion takes
    held, (done, refused) = queue_behind_gate(queue.writer, [(counted, True), (failing, True)])
    held.result(10)
    done.result(10)
    with pytest.raises(ValueError):
        refused.result(10)
    assert runs == 2


def undo_by_a_deadlock(queue: JobQueue, op: Callable[[Connection], Any]) -> None:
    """PostgreSQL's way: the first run is aborted to break a deadlock, and runs again."""
    runs = 0

    def aborted_once(conn: Connection) -> Any:
        nonlocal runs
        runs += 1
        done = op(conn)
        if runs == 1:
            raise OperationalError("UPDATE jobs …", {}, DeadlockDetected("deadlock detected"))
        return done

    queue._write(aborted_once, "a completion batch", rerun=True)
    assert runs == 2


@pytest.mark.parametrize("undo", [undo_by_a_later_failure, undo_by_a_deadlock])
def test_an_undone_run_of_a_completion_starting_a_step_leaves_no_folder(
    make_coordinator: MakeCoordinator,
    tmp_path: Path,
    undo: Callable[[JobQueue, Callable[[Connection], Any]], None],
) -> None:
    coordinator = make_coordinator()
    queue = coordinator.core.queue
    user = coordinator.new_user()
    things, echoes = coordinator.worker(thing), coordinator.worker(echo_app)
    trained = user.submit("thing", "train")
    [claimed] = things.claim()
    assert things.run(claimed, tmp_path).status_code == 204
    model_id = trained.refresh().models["model"]
    pipeline = user.submit_pipeline(
        [
            {"name": "first", "app": "echo", "operation": "echo"},
            {"name": "second", "app": "thing", "operation": "use", "params": {"model": model_id}},
        ]
    )
    unpin(coordinator, pipeline.id)

    [first] = echoes.claim()
    undo(queue, completion_op(queue, echoes, first))

    assert rowless_folders(coordinator, "jobs", Job.id) == []
    [second] = things.claim()
    assert second.operation == "use" and second.params == {"model": model_id}
    model = things.download(second, "model")
    assert model.status_code == 200 and model.content == WEIGHTS


class _Worker:
    """What the queue needs of a worker (`WorkerRef`): its id and app."""

    def __init__(self, worker: HttpWorker) -> None:
        self.id = worker.id
        self.app = worker.app.name


def unpin(coordinator: InProcessCoordinator, pipeline_id: str) -> None:
    """Make the pipeline one submitted before models were pinned: no pin row, no link."""
    with coordinator.core.engine.begin() as conn:
        seq = conn.scalar(select(Job.seq).where(Job.id == pipeline_id))
        removed = conn.execute(
            delete(JobFile).where(JobFile.job_seq == seq, JobFile.kind == PINNED)
        ).rowcount
    assert removed == 1
    shutil.rmtree(coordinator.core.blobs.job_dir(pipeline_id) / PINNED)


def rowless_folders(
    coordinator: InProcessCoordinator, under: str, ids: InstrumentedAttribute[str]
) -> list[str]:
    """The folders `<under>/<xx>/<id>` of the blob store whose id has no row (`ids`)."""
    blobs = coordinator.core.blobs
    folders = {p.name for p in (blobs.root / under).glob("*/*") if p.is_dir()}
    with coordinator.core.engine.connect() as conn:
        kept = set(conn.scalars(select(ids).where(ids.in_(folders))))
    return sorted(folders - kept)


def completion_op(
    queue: JobQueue, worker: HttpWorker, job: ClaimedJob
) -> Callable[[Connection], Any]:
    """The write operation of `job`'s success as `worker` reports it (its files already
    uploaded), as the completion route makes it."""
    ref = _Worker(worker)
    batch = [BatchedCompletion(job_id=job.id, lease_id=job.lease_id, state="succeeded")]
    return queue._complete_op(ref, batch, queue._prepare(ref, batch), False)


def test_an_undone_run_of_a_completion_keeping_a_model_leaves_no_folder(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    """A completion that keeps a model, undone by a deadlock and run again: the model's
    folder is the one its row names, and no other is left (`model_ids`)."""
    coordinator = make_coordinator()
    queue = coordinator.core.queue
    user = coordinator.new_user()
    things = coordinator.worker(thing)
    trained = user.submit("thing", "train")
    [claimed] = things.claim()
    assert things.upload(claimed, "model", WEIGHTS).status_code == 204
    undo_by_a_deadlock(queue, completion_op(queue, things, claimed))

    model_id = trained.refresh().models["model"]
    assert rowless_folders(coordinator, "models", ModelArtifact.id) == []
    assert user.download_model(model_id, tmp_path / "model").read_bytes() == WEIGHTS
