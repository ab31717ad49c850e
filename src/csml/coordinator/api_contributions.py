"""Routes for contributed workers: an identity's own join tokens (`/v1/contributions`) and
the operator's per-app rules and revocation (`/v1/operator/contributions`).

The rules live in `csml.coordinator.contributions`; these routes only authenticate and
translate. An identity sees and revokes only its own contributions (404 for another's).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from csml.coordinator import contributions, verification
from csml.coordinator.api_operator import ERRORS as OPERATOR_ERRORS
from csml.coordinator.api_operator import current_operator
from csml.coordinator.auth import AuthFirstRoute, current_identity
from csml.coordinator.state import core
from csml.schemas import ErrorBody
from csml.schemas.contributions import (
    ContributedWorkerRecords,
    ContributionCreated,
    ContributionList,
    ContributionRequest,
    ContributionSettingInfo,
    ContributionSettingRequest,
)
from csml.store.identities import IdentityRow

Me = Annotated[IdentityRow, Depends(current_identity)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 422, 429)
}

router = APIRouter(route_class=AuthFirstRoute, tags=["contributions"])


@router.post(
    "/v1/contributions", status_code=201, response_model=ContributionCreated, responses=ERRORS
)
async def create(request: Request, body: ContributionRequest, me: Me) -> ContributionCreated:
    """A join token for a worker of yours that serves `app` (shown once), with the commands
    that start it. Its workers serve that app's public queue, never publish a version."""
    url = str(request.base_url).rstrip("/")
    return await run_in_threadpool(
        contributions.create, core(request), me.id, body.app, body.label, url
    )


@router.get("/v1/contributions", response_model=ContributionList, responses=ERRORS)
async def list_mine(request: Request, me: Me) -> ContributionList:
    """Your contributed join tokens with their workers (never the tokens)."""
    found = await run_in_threadpool(contributions.list_of, core(request), me.id)
    return ContributionList(contributions=found)


@router.delete("/v1/contributions/{token_id}", status_code=204, responses=ERRORS)
async def revoke_mine(token_id: str, request: Request, me: Me) -> Response:
    """Revoke one of your contributed join tokens: its workers stop getting jobs now."""
    await run_in_threadpool(contributions.revoke, core(request), token_id, me.id)
    return Response(status_code=204)


operator = APIRouter(
    route_class=AuthFirstRoute,
    prefix="/v1/operator/contributions",
    tags=["operator"],
    dependencies=[Depends(current_operator)],
    responses=OPERATOR_ERRORS,
)


@operator.get("", response_model=list[ContributionSettingInfo])
async def rules(request: Request) -> list[ContributionSettingInfo]:
    """Per app: whether contributed workers are taken, the cap, how many are live."""
    return await run_in_threadpool(contributions.settings_info, core(request))


@operator.put("/{app}", response_model=ContributionSettingInfo)
async def set_rule(
    app: str, body: ContributionSettingRequest, request: Request
) -> ContributionSettingInfo:
    """Allow or deny contributed workers for `app`, and/or cap them (`max_workers`, null for
    no cap). Denying revokes the app's contributed tokens: their workers stop now."""
    return await run_in_threadpool(contributions.set_rule, core(request), app, body)


@operator.get("/workers", response_model=ContributedWorkerRecords)
async def worker_records(
    request: Request,
    quarantined: Annotated[
        bool, Query(description="Only quarantined workers (else every live contributed one).")
    ] = False,
) -> ContributedWorkerRecords:
    """Contributed workers with their record against accepted results: agreements,
    disagreements, reputation, probation, quarantine."""
    c = core(request)
    found = await run_in_threadpool(
        verification.records, c.engine, c.settings.verify_probation, quarantined_only=quarantined
    )
    return ContributedWorkerRecords(workers=found)


@operator.delete("/workers/{worker_id}/quarantine", status_code=204)
async def lift_quarantine(worker_id: str, request: Request) -> Response:
    """Lift a contributed worker's quarantine: it starts afresh, on probation."""
    c = core(request)
    await run_in_threadpool(verification.lift, c.engine, c.writer, worker_id)
    return Response(status_code=204)


@operator.delete("/tokens/{token_id}", status_code=204)
async def revoke_any(token_id: str, request: Request) -> Response:
    """Revoke anyone's contributed join token: its workers stop getting jobs now."""
    await run_in_threadpool(contributions.revoke, core(request), token_id, None)
    return Response(status_code=204)
