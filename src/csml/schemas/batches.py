"""Batch submission: many jobs in one request (`POST /v1/jobs/batch`).

A batch is a list of items, each a job spec (`JobSpec`) with its small input files
inline (input name -> base64 bytes). The answer lists, per item and in order, the job
created (the same view a single `POST /v1/jobs` answers with) or the refusal of that
item (the error body a single submission would have got, its `field` naming the item:
`items.3.spec.params.scale`).

Invariants:
- At most `MAX_BATCH_ITEMS` items; each inline input at most `INLINE_MAX_BYTES` once
  decoded (the worker protocol's inline bound); the whole body at most
  `MAX_BATCH_BODY_BYTES` (and the coordinator's `CSML_MAX_REQUEST_BYTES`, if smaller).
  Passing one of these bounds refuses the whole request, before any item is submitted.
- One item's refusal never refuses another: each item is checked and submitted as a
  single submission would be, and counts against quotas and fairness as one job.

The coordinator reads the items leniently (`BatchItemIn.spec` is any object), so a bad
spec refuses its item only; `BatchSubmission` is the documented shape of the body.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from csml.schemas.errors import ErrorDetail
from csml.schemas.jobs import Job, JobSpec
from csml.schemas.workers import INLINE_MAX_BYTES

MAX_BATCH_ITEMS = 500
"""Items per batch request."""

MAX_BATCH_BODY_BYTES = 12 << 20
"""Bytes of one batch request's body (JSON, inputs in base64). The route reads the body
whole before parsing it, so this bounds what one request can make the coordinator hold
(the SDK sends at most `csml.client.batch.BATCH_BYTES`, 8 MiB, per request)."""

INLINE_MAX_CHARS = (INLINE_MAX_BYTES + 2) // 3 * 4
"""The longest base64 text of one inline input."""


class BatchItem(BaseModel):
    """One job of a batch: its spec and its input files inline."""

    model_config = ConfigDict(extra="forbid")
    spec: JobSpec
    inputs: dict[str, str] = Field(
        {},
        description=f"Input name -> the file's bytes in base64 (at most {INLINE_MAX_BYTES} "
        "bytes decoded; larger files go to `POST /v1/jobs` as multipart).",
    )


class BatchSubmission(BaseModel):
    """The body of `POST /v1/jobs/batch`."""

    model_config = ConfigDict(extra="forbid")
    items: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)


class BatchItemIn(BaseModel):
    """How the coordinator first reads an item: its spec is checked on its own later,
    so that a bad spec refuses this item only."""

    model_config = ConfigDict(extra="forbid")
    spec: dict[str, Any]
    inputs: dict[str, str] = {}


class BatchItemResult(BaseModel):
    """What became of one item: `job` when it was accepted, `error` when refused."""

    index: int = Field(description="The item's place in the request (0-based).")
    status: int = Field(
        description="202 when accepted; otherwise the status a single submission of this "
        "item would have been refused with (422, 429, 404, 413, ...)."
    )
    job: Job | None = None
    error: ErrorDetail | None = None
    retry_after: int | None = Field(
        None, description="Refusals that pass with time (429): seconds before trying again."
    )


class BatchSubmitted(BaseModel):
    """The answer to a batch: one result per item, in the items' order."""

    items: list[BatchItemResult]
    accepted: int = Field(description="Items that became jobs.")
    refused: int = Field(description="Items refused (see each item's `error`).")


__all__ = [
    "INLINE_MAX_CHARS",
    "MAX_BATCH_BODY_BYTES",
    "MAX_BATCH_ITEMS",
    "BatchItem",
    "BatchItemIn",
    "BatchItemResult",
    "BatchSubmission",
    "BatchSubmitted",
]
