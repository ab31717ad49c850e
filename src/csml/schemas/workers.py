"""The worker protocol: register, claim under a lease, heartbeat, complete.

Batched (protocol 2): a claim carries the heartbeats of the worker's running jobs
(`ClaimRequest.running`; the answer says which to abort), takes up to `max_jobs`
jobs at once and carries inputs inline (`ClaimedJob.inline_inputs`, base64, up to
`csml.coordinator.queue.INLINE_CLAIM_BYTES` per answer in all; until session 14 each
at most `INLINE_MAX_BYTES` too); completions go in batches (`CompletionBatch`), each
with its small outputs inline (`JobCompletion.inline_outputs`). The single-job
heartbeat, download, upload and complete routes stay for older workers.

Protocol 3: completions may also ride a claim (`ClaimRequest.completions`): the
coordinator ends them first, in the claim's transaction, and the answer's `results`
say what `POST …/complete` would have (one per completion, in order; committed before
the answer, and before any long-poll wait). A coordinator says it speaks protocol 3 in
`WorkerRegistered.protocol`; a worker folds completions into claims only then (an
older coordinator would ignore the field), and resends them alone if an answer
carries no `results` for them. Older workers, which send none, are served as before.

Larger inline outputs: a coordinator says at registration how large an output a
completion may carry inline (`WorkerRegistered.inline_output_bytes`, at most
`INLINE_OUTPUT_MAX_BYTES`; absent: `INLINE_MAX_BYTES`, as before), and a worker sends
inline only outputs within it, uploading larger ones first (`PUT …/outputs/{name}`) as
before: an output of 256 KiB - 1 MiB (a photo's annotated PNG) costs no request of its
own. Its bytes land where an upload's do (the attempt's folder, fsync'd before the
completion commits), under the same checks (the lease held by this worker, a declared
name, `Settings.max_output_bytes`, the body's bound).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from csml import placement
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
    labels: dict[str, bool | int | float | str] = Field(
        {},
        max_length=placement.MAX_LABELS,
        description='What this worker offers, e.g. {"gpu": true, "gpu_memory_gb": 24}: '
        "jobs' requirements are matched against them (see docs/user-guide/placement.md).",
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, bool | int | float | str]) -> dict[str, Any]:
        return placement.check_labels(labels)


INLINE_MAX_BYTES = 256 * 1024
"""The largest input a batch item carries inline (decoded bytes), and output a completion
does unless its coordinator allows more (`INLINE_OUTPUT_MAX_BYTES`); a claim's answer
carried no larger input until session 14 (now: up to its budget,
`csml.coordinator.queue.INLINE_CLAIM_BYTES`). 256 KiB: a small photo (and its annotated
PNG) travels inline rather than as a request of its own (at 64 KiB, 27% of 160-320 px
photos and half of their annotated PNGs did not). What one request holds in all is
bounded apart: a claim's inline inputs (`csml.coordinator.queue.INLINE_CLAIM_BYTES`), a
completion batch's (`csml.worker.agent.COMPLETION_BATCH_BYTES`), a batch submission's
body (`csml.schemas.batches.MAX_BATCH_BODY_BYTES`)."""


INLINE_OUTPUT_MAX_BYTES = 1 << 20
"""The largest output a completion carries inline when its coordinator allows it
(`WorkerRegistered.inline_output_bytes`). 1 MiB: (c)'s annotated PNGs (~245 KB on average,
38% of them over 256 KiB) fit, and one completion's inline outputs, at most 1 MiB in all
(`csml.worker.agent.INLINE_OUTPUT_BYTES`), keep a batch of them under the default 4 MiB
bound on a worker's JSON body."""


PROTOCOL = 3
"""The newest worker protocol this code speaks (see the module docstring)."""
COMPLETIONS_RIDE_CLAIMS = 3
"""The first protocol in which completions may ride a claim."""
MAX_COMPLETIONS = 64
"""Completions in one request at most (a batch, or riding a claim)."""


class WorkerRegistered(BaseModel):
    worker_id: str
    worker_token: str
    lease_seconds: float
    heartbeat_seconds: float
    protocol: int = Field(
        2,
        description="The newest worker protocol the coordinator speaks (absent: 2). From 3, "
        "completions may ride a claim (`ClaimRequest.completions`).",
    )
    inline_output_bytes: int = Field(
        INLINE_MAX_BYTES,
        ge=0,
        description="The largest output (decoded bytes) a completion may carry inline "
        "(`JobCompletion.inline_outputs`); larger ones are uploaded first (absent: 256 KiB). "
        "A worker sends no more than it knows (`INLINE_OUTPUT_MAX_BYTES`), whatever this says.",
    )


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
    inline_inputs: dict[str, str] = Field(
        {},
        description="Inputs' bytes (base64) by name, up to 1 MiB per claim answer in all: "
        "the worker need not download them.",
    )
    owner_key: str = Field(
        "",
        max_length=64,
        description="Stable and opaque per owner (not the identity id): the worker runs "
        "consecutive jobs of one owner in the same sandboxed process, never another's. "
        "Empty: a fresh process.",
    )


class CompletionOutcome(BaseModel):
    job_id: str
    status: int = Field(description="What the single-job route would answer: 204, 409, 422...")
    error: str = ""


class ClaimResponse(BaseModel):
    jobs: list[ClaimedJob]
    abort: list[str] = Field([], description="Running jobs to stop now (see Heartbeat).")
    results: list[CompletionOutcome] = Field(
        [],
        description="Protocol 3: one per completion that rode the claim, in order, as "
        "`POST …/complete` answers them.",
    )


class RunningJob(BaseModel):
    job_id: str
    lease_id: str
    progress: Progress = Progress()


class Heartbeat(BaseModel):
    running: list[RunningJob] = Field([], max_length=1024)


class HeartbeatResponse(BaseModel):
    abort: list[str] = Field([], description="Jobs to stop now: cancelled or lease lost.")


class InlineOutput(BaseModel):
    name: str = Field(max_length=64, description="A declared output (its declared media type).")
    content: str = Field(
        max_length=(INLINE_OUTPUT_MAX_BYTES + 2) // 3 * 4,
        description="The bytes, base64: at most the coordinator's "
        "`WorkerRegistered.inline_output_bytes` decoded.",
    )


class JobCompletion(BaseModel):
    lease_id: str
    state: Literal["succeeded", "failed"]
    result: dict[str, Any] | None = None
    error: str | None = Field(None, max_length=4000)
    encrypted_result: EncryptedResult | None = None
    inline_outputs: list[InlineOutput] = Field([], max_length=16)


class BatchedCompletion(JobCompletion):
    job_id: str = Field(max_length=64)


class ClaimRequest(BaseModel):
    max_jobs: int = Field(1, ge=1, le=256)
    wait: float = Field(20.0, ge=0, le=60, description="Long-poll up to this many seconds.")
    running: list[RunningJob] | None = Field(
        None,
        max_length=1024,
        description="The worker's running jobs: a heartbeat riding along (None: no heartbeat).",
    )
    completions: list[BatchedCompletion] = Field(
        [],
        max_length=MAX_COMPLETIONS,
        description="Protocol 3: jobs' ends riding the claim, ended before it takes any "
        "(see `CompletionBatch`); their outcomes are the answer's `results`.",
    )
    warm_models: list[str] = Field(
        [],
        max_length=placement.MAX_WARM,
        description="Models this worker holds loaded, each `placement.warm_key(owner_key, "
        "model sha256)`: the claim prefers jobs among them near the queue head.",
    )

    @field_validator("warm_models")
    @classmethod
    def _warm(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not re.match(placement.SHA256_PATTERN, key):
                raise ValueError("each warm model is a SHA-256 in lowercase hex")
        return keys


class CompletionBatch(BaseModel):
    completions: list[BatchedCompletion] = Field(min_length=1, max_length=MAX_COMPLETIONS)


class CompletionResults(BaseModel):
    results: list[CompletionOutcome]


class WorkerInfo(BaseModel):
    id: str
    app: str
    slots: int
    running: int
    sandbox: str
    registered_at: datetime
    last_heartbeat: datetime
    live: bool
