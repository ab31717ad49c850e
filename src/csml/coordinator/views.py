"""Store rows to wire schemas."""

from __future__ import annotations

from csml.coordinator.queue import file_info
from csml.schemas import EncryptedResult, JobState, Progress
from csml.schemas import Job as JobView
from csml.store.models import Job
from csml.store.models_confidential import confidential_of


def job_view(job: Job) -> JobView:
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
        error=job.error,
        result=job.result,
        limits=job.limits,
        inputs={f.name: file_info(f) for f in job.files if f.kind == "input"},
        outputs={f.name: file_info(f) for f in job.files if f.kind == "output"},
    )
