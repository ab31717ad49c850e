"""The worker protocol: register, claim under a lease, heartbeat, complete."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from csml.schemas.apps import AppManifest
from csml.schemas.confidential import ClaimedConfidential, EncryptedResult, WorkerAttestation
from csml.schemas.jobs import FileInfo, Progress


class WorkerRegistration(BaseModel):
    app: AppManifest
    slots: int = Field(ge=1, le=256)
    sandbox: str = Field("", max_length=200, description="How jobs are isolated on this worker.")
    attestation: WorkerAttestation | None = Field(
        None, description="The worker's key for confidential jobs, and evidence binding it."
    )


class WorkerRegistered(BaseModel):
    worker_id: str
    worker_token: str
    lease_seconds: float
    heartbeat_seconds: float


class JobLimits(BaseModel):
    timeout_seconds: float
    memory_mb: int
    cpu_seconds: float


class ClaimedJob(BaseModel):
    id: str
    operation: str
    params: dict[str, Any]
    inputs: list[FileInfo]
    lease_id: str = Field(description="Fences this attempt: only its holder may report.")
    attempt: int
    limits: JobLimits
    confidential: ClaimedConfidential | None = None
    owner_key: str = Field(
        "",
        max_length=64,
        description="Stable and opaque per owner (not the identity id): the worker runs "
        "consecutive jobs of one owner in the same sandboxed process, never another's. "
        "Empty: a fresh process.",
    )


class ClaimResponse(BaseModel):
    jobs: list[ClaimedJob]


class RunningJob(BaseModel):
    job_id: str
    lease_id: str
    progress: Progress = Progress()


class Heartbeat(BaseModel):
    running: list[RunningJob] = []


class HeartbeatResponse(BaseModel):
    abort: list[str] = Field([], description="Jobs to stop now: cancelled or lease lost.")


class JobCompletion(BaseModel):
    lease_id: str
    state: Literal["succeeded", "failed"]
    result: dict[str, Any] | None = None
    error: str | None = Field(None, max_length=4000)
    encrypted_result: EncryptedResult | None = None


class WorkerInfo(BaseModel):
    id: str
    app: str
    slots: int
    running: int
    sandbox: str
    registered_at: datetime
    last_heartbeat: datetime
    live: bool
