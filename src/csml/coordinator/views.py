"""Store rows (`csml.store.jobs.JobRow`) to wire schemas.

A job's view needs nothing beyond its row (files and envelope come with it); a
pipeline's also needs its steps (one query for all the pipelines in a list). Queue
positions cost a query per app, so views carry them only when asked (`positions=True`:
the routes' `positions` query parameter, the event stream). These reads run outside a
read transaction (`read_each`: no BEGIN), each statement its own snapshot."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Connection

from csml.coordinator import pipelines
from csml.coordinator.queue import QUEUED, TERMINAL, JobQueue, file_info
from csml.schemas import EncryptedResult, JobState, Progress, StepSpec, StepStatus
from csml.schemas import Job as JobView
from csml.store import jobs as store
from csml.store.jobs import JobRow


def queue_positions(conn: Connection, jobs: Sequence[JobRow]) -> dict[str, int]:
    """Each queued job's 1-based place in its app's queue, in claim order (fair_rank, seq).

    One query per app, reading only the ranks ahead of the caller's last queued job
    (a queue holds at most its capacity)."""
    mine: dict[str, list[JobRow]] = {}
    for job in jobs:
        if job.state == QUEUED:
            mine.setdefault(job.app, []).append(job)
    places: dict[str, int] = {}
    for app, queued in mine.items():
        ahead = store.ranks_ahead(conn, app, max(j.fair_rank for j in queued))
        for j in queued:
            places[j.id] = bisect_left(ahead, (j.fair_rank, j.seq)) + 1
    return places


def job_view(job: JobRow, queue_position: int | None = None) -> JobView:
    conf = job.confidential
    encrypted = (
        EncryptedResult.model_validate(conf.encrypted_result)
        if conf is not None and conf.encrypted_result is not None
        else None
    )
    return JobView(
        trusted_only=job.trusted_only,
        min_reputation=job.min_reputation,
        confidential=conf is not None,
        encrypted_result=encrypted,
        id=job.id,
        app=job.app,
        operation=job.operation,
        params=job.params,
        state=JobState(job.state),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        progress=Progress(fraction=job.progress_fraction, message=job.progress_message),
        queue_position=queue_position if job.state == QUEUED else None,
        error=job.error,
        result=job.result,
        limits=job.limits,
        inputs={f.name: file_info(f) for f in job.files if f.kind == "input"},
        outputs={f.name: file_info(f) for f in job.files if f.kind == "output"},
        models={f.name: f.model_id for f in job.files if f.kind == "output" and f.model_id},
    )


def _is_parent(job: JobRow) -> bool:
    return job.parent_seq is None and job.step_index is not None


def pipeline_view(
    base: JobView, job: JobRow, steps: Sequence[JobRow], places: dict[str, int]
) -> JobView:
    """A pipeline as one job: live state and progress come from its current step."""
    specs = [StepSpec.model_validate(s) for s in job.params.get("steps", [])]
    rows = {s.step_index: s for s in steps}
    statuses = []
    for i, spec in enumerate(specs):
        row = rows.get(i)
        statuses.append(
            StepStatus(
                name=spec.name,
                app=spec.app,
                operation=spec.operation,
                state=row.state if row is not None else pipelines.PENDING,
                job_id=row.id if row is not None else None,
                error=row.error if row is not None else None,
            )
        )
    update: dict[str, Any] = {"steps": statuses}
    first = rows.get(0)
    if first is not None:
        update["started_at"] = first.started_at
    current = rows.get(job.step_index or 0)
    if current is not None:
        update["attempts"] = current.attempts
    if job.state not in TERMINAL and current is not None:
        i, n = current.step_index or 0, len(specs)
        running = current.state == JobState.running.value
        state = JobState.running if running or i > 0 else JobState.queued
        fraction = (i + (current.progress_fraction if running else 0.0)) / n
        message = (
            current.progress_message if running and current.progress_message else current.state
        )
        update.update(
            state=state,
            queue_position=places.get(current.id) if state == JobState.queued else None,
            progress=base.progress.model_copy(
                update={
                    "fraction": min(1.0, fraction),
                    "message": f"step {i + 1}/{n} {specs[i].name}: {message}"[:500],
                }
            ),
        )
    return base.model_copy(update=update)


def job_views(queue: JobQueue, jobs: Sequence[JobRow], *, positions: bool = True) -> list[JobView]:
    """Wire views of `jobs`; with `positions`, queue positions for the queued ones. Reads
    only for pipelines (their steps) and positions."""
    parents = [j.seq for j in jobs if _is_parent(j)]
    if not parents and not positions:
        return [job_view(j) for j in jobs]
    # Each statement on its own (no read transaction): places change with every claim
    # anyway, and a step's place read a moment after the step is as good as any.
    with queue.read(each=True) as conn:
        steps = store.steps_of(conn, parents)  # a pipeline shows its current step
        places = (
            queue_positions(conn, [*jobs, *(s for ss in steps.values() for s in ss)])
            if positions
            else {}
        )
    return [
        pipeline_view(job_view(j), j, steps[j.seq], places)
        if j.seq in steps
        else job_view(j, places.get(j.id))
        for j in jobs
    ]
