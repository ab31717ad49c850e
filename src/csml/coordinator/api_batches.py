"""Route for batch submission: `POST /v1/jobs/batch`, many jobs in one request.

Invariants:
- The caller is authenticated from the headers before a byte of the body is read
  (the route has no body parameter; its identity dependency runs first), and the body
  is bounded while it streams (`csml.coordinator.middleware`, "a batch submission").
- What concerns the whole body (not JSON, no items, too many items, an inline input
  over its bound) refuses the request with the usual error body, before any item is
  submitted. Otherwise the answer is 200 with one result per item, in order: the job
  (the view `POST /v1/jobs` answers with) or the item's own error body and status,
  its `field` naming the item (`items.3.spec.params.scale`).
- Each accepted job is announced to its owner's event streams, as a single one is.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from csml import refusals
from csml.coordinator import batches
from csml.coordinator.api_users import ERRORS
from csml.coordinator.auth import AuthFirstRoute, current_identity, lean
from csml.coordinator.errors import ApiError, from_refusal
from csml.coordinator.notify import owner_change
from csml.coordinator.state import Core, core
from csml.coordinator.views import job_views
from csml.schemas import ErrorDetail
from csml.schemas.batches import (
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_ITEMS,
    BatchItemResult,
    BatchSubmitted,
)
from csml.schemas.workers import INLINE_MAX_BYTES
from csml.store.tables import Identity

log = logging.getLogger("csml.coordinator.batches")
router = APIRouter(route_class=AuthFirstRoute, prefix="/v1")
Me = Annotated[Identity, Depends(current_identity)]

_ITEM = {
    "type": "object",
    "additionalProperties": False,
    "required": ["spec"],
    "properties": {
        "spec": {"$ref": "#/components/schemas/JobSpec"},
        "inputs": {
            "type": "object",
            "description": f"Input name -> the file's bytes in base64 (at most "
            f"{INLINE_MAX_BYTES} bytes decoded).",
            "additionalProperties": {"type": "string", "contentEncoding": "base64"},
        },
    },
}
BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "title": "BatchSubmission",
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["items"],
                    "properties": {
                        "items": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH_ITEMS,
                            "items": _ITEM,
                        }
                    },
                }
            }
        },
    }
}


DESCRIPTION = (
    f"Submit up to {MAX_BATCH_ITEMS} jobs at once, each a job spec with its small input "
    f"files inline (base64, at most {INLINE_MAX_BYTES} bytes each decoded; the body at most "
    f"{MAX_BATCH_BODY_BYTES} bytes, or `CSML_MAX_REQUEST_BYTES` if smaller). Each item is "
    "checked and queued exactly as `POST /v1/jobs` would check and queue it (spec, params, "
    "quotas, queue bound, fair turn), and counts as one job. The answer lists, in order, "
    "each item's job (`status` 202, the view `POST /v1/jobs` answers with) or its refusal "
    "(`status`, `error` and, for 429, `retry_after`), the error's field naming the item: "
    "`items.3.spec.params.scale`. One item's refusal never refuses the others; too many "
    "items, an inline input over its bound or a body that is not a batch refuse the whole "
    "request, before any item is submitted."
)


@router.post(
    "/jobs/batch",
    response_model=BatchSubmitted,
    tags=["jobs"],
    responses=ERRORS,
    openapi_extra=BATCH_BODY,
    summary="Submit many jobs in one request",
    description=DESCRIPTION,
)
@lean
async def submit_batch(request: Request, me: Me) -> Response:
    """Many jobs in one request (see DESCRIPTION)."""
    c = core(request)
    raw = await request.body()  # bounded by the middleware
    return await run_in_threadpool(_submit, c, me.id, raw)


def _submit(c: Core, owner_id: str, raw: bytes) -> Response:
    items = batches.read(raw, c.settings.max_params_depth)
    outcomes = batches.submit(c, owner_id, items)
    jobs = [o.job for o in outcomes if o.job is not None]
    for job in jobs:
        c.notifier.notify(owner_change(owner_id, job.id))
    views = iter(job_views(c.queue, jobs, positions=False))
    results: list[BatchItemResult] = []
    for outcome in outcomes:
        if outcome.job is not None:
            results.append(BatchItemResult(index=outcome.index, status=202, job=next(views)))
        else:
            assert outcome.error is not None
            results.append(_refused(outcome.index, outcome.error))
    accepted = len(jobs)
    body = BatchSubmitted(items=results, accepted=accepted, refused=len(results) - accepted)
    # Encoded by pydantic-core at once (not dumped to Python values, then json.dumps'd).
    return Response(body.model_dump_json(), media_type="application/json")


def _refused(index: int, error: Exception) -> BatchItemResult:
    """An item's refusal as the error body a single submission would have got."""
    if isinstance(error, refusals.Refusal):
        error = from_refusal(error)
    if not isinstance(error, ApiError):
        log.error("batch item %d failed", index, exc_info=error)
        error = ApiError(
            500, "internal_error", "the coordinator failed to submit this item; it was logged"
        )
    retry = (error.headers or {}).get("Retry-After")
    return BatchItemResult(
        index=index,
        status=error.status,
        error=ErrorDetail(
            code=error.code,
            message=error.message,
            field=batches.item_field(index, error.field),
            details=error.details,
        ),
        retry_after=int(retry) if retry and retry.isdigit() else None,
    )
