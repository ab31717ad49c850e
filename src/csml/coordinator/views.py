"""Store rows to wire schemas."""

from __future__ import annotations

from csml.coordinator.queue import file_info
from csml.schemas import Job as JobView
from csml.schemas import JobState, Progress
from csml.store.models import Job


def job_view(job: Job) -> JobView:
    return JobView(
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
        error=job.error,
        result=job.result,
        limits=job.limits,
        inputs={f.name: file_info(f) for f in job.files if f.kind == "input"},
        outputs={f.name: file_info(f) for f in job.files if f.kind == "output"},
    )
