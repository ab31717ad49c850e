"""Store rows to wire schemas.

Queue positions cost a query per app, so views carry them only when asked
(`positions=True`: the routes' `positions` query parameter, the event stream)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from csml.coordinator import pipelines
from csml.coordinator.queue import QUEUED, file_info
from csml.schemas import EncryptedResult, JobState, Progress
from csml.schemas import Job as JobView
from csml.store.tables import Job
from csml.store.tables_confidential import confidential_of


def queue_positions(sessions: sessionmaker[Session], jobs: Sequence[Job]) -> dict[str, int]:
    """Each queued job's 1-based place in its app's queue, in claim order (fair_rank, seq).

    One query per app, reading only the ranks ahead of the caller's last queued job
    (a queue holds at most its capacity)."""
    mine: dict[str, list[Job]] = {}
    for job in jobs:
        if job.state == QUEUED:
            mine.setdefault(job.app, []).append(job)
    places: dict[str, int] = {}
    if not mine:
        return places
    with sessions() as session:
        for app, queued in mine.items():
            last = max(j.fair_rank for j in queued)
            ahead = [
                (rank, seq)
                for rank, seq in session.execute(
                    select(Job.fair_rank, Job.seq)
                    .where(Job.app == app, Job.state == QUEUED, Job.fair_rank <= last)
                    .order_by(Job.fair_rank, Job.seq)
                ).all()
            ]
            for j in queued:
                places[j.id] = bisect_left(ahead, (j.fair_rank, j.seq)) + 1
    return places


def job_view(job: Job, queue_position: int | None = None) -> JobView:
    conf = confidential_of(job)
    encrypted = (
        EncryptedResult.model_validate(conf.encrypted_result)
        if conf is not None and conf.encrypted_result is not None
        else None
    )
    return JobView(
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


def job_views(
    sessions: sessionmaker[Session], jobs: Sequence[Job], *, positions: bool = True
) -> list[JobView]:
    """Wire views of `jobs`; with `positions`, queue positions for the queued ones."""
    steps = pipelines.load_steps(sessions, jobs)  # a pipeline shows its current step
    places = (
        queue_positions(sessions, [*jobs, *(s for ss in steps.values() for s in ss)])
        if positions
        else {}
    )
    return [
        pipelines.view(job_view(j), j, steps[j.seq], places)
        if j.seq in steps
        else job_view(j, places.get(j.id))
        for j in jobs
    ]
