"""Jobs as clients see them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from csml.schemas.apps import Requirement
from csml.schemas.confidential import ConfidentialSpec, EncryptedResult


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class LimitsRequest(BaseModel):
    """Tighter limits than the coordinator's maxima, if a job wants them."""

    model_config = ConfigDict(extra="forbid")
    timeout_seconds: float | None = Field(None, gt=0, description="Wall-clock limit.")
    memory_mb: int | None = Field(None, ge=16, description="Memory the job may allocate.")
    cpu_seconds: float | None = Field(None, gt=0, description="CPU-time limit.")


class JobSpec(BaseModel):
    """The `spec` part of a submission."""

    model_config = ConfigDict(extra="forbid")
    app: str = Field(min_length=1, max_length=40)
    operation: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = {}
    limits: LimitsRequest | None = None
    confidential: ConfidentialSpec | None = Field(
        None,
        description="End-to-end encrypted job: `params` must be {}, the inputs are ciphertext.",
    )
    requires: Requirement = Field(
        {},
        description="Labels the worker must have, besides the operation's own: a value "
        'means equality, {"min": n} a numeric minimum (see docs/user-guide/placement.md).',
    )

    trusted_only: bool = Field(
        False,
        description="Run only on the operator's workers (never a contributed one). A "
        "confidential job already runs only on the workers it was sealed to.",
    )
    min_reputation: int | None = Field(
        None,
        ge=0,
        le=1_000_000,
        description="Run only on operator workers or contributed workers whose reputation "
        "(agreements minus a penalty per disagreement) is at least this.",
    )


class FileInfo(BaseModel):
    name: str
    size: int
    sha256: str
    media_type: str


class Progress(BaseModel):
    fraction: float = Field(0.0, ge=0.0, le=1.0)
    message: str = Field("", max_length=500)


class StepStatus(BaseModel):
    """One step of a pipeline, as its parent job shows it."""

    name: str
    app: str
    operation: str
    state: str = Field(description="`pending` (not created yet) or the step job's state.")
    job_id: str | None = Field(None, description="The step's own job (GET /v1/jobs/{id}).")
    error: str | None = None


class Job(BaseModel):
    id: str
    app: str
    operation: str
    params: dict[str, Any]
    state: JobState
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    max_attempts: int
    progress: Progress = Progress()
    queue_position: int | None = Field(
        None, description="Queued jobs: place in the app's queue (1 = claimed next)."
    )
    error: str | None = None
    result: dict[str, Any] | None = None
    limits: dict[str, float] = {}
    inputs: dict[str, FileInfo] = {}
    outputs: dict[str, FileInfo] = {}
    models: dict[str, str] = Field(
        {}, description="Outputs kept as model artifacts: output name -> model id."
    )
    steps: list[StepStatus] | None = Field(
        None, description="Pipelines only: each step with its state and job id."
    )
    trusted_only: bool = Field(
        False,
        description="Runs only on the operator's workers (asked at submission, or while a "
        "contributed worker's result waits for a trusted run to check it).",
    )
    min_reputation: int | None = Field(
        None, description="The least reputation of a contributed worker that may run it."
    )
    confidential: bool = False
    encrypted_result: EncryptedResult | None = Field(
        None, description="A confidential job's result (or error), for its client only."
    )


class JobList(BaseModel):
    jobs: list[Job]
