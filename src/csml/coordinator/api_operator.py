"""The operator's API (`/v1/operator/...`), behind `CSML_OPERATOR_TOKEN`.

The operator token is a setting of the coordinator, not a row of the store, and
is never an identity's or a worker's token. With no token configured the routes
answer 403 (the view is off).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from csml import ids
from csml.coordinator import opstats
from csml.coordinator.auth import AuthFirstRoute, bearer, from_headers
from csml.coordinator.errors import ApiError, not_found, unauthorized
from csml.coordinator.state import core
from csml.coordinator.tokens import new_join_token, revoke
from csml.coordinator.worker_tokens import CACHE as WORKER_TOKENS
from csml.schemas import ErrorBody, JoinTokenCreated
from csml.schemas.operator import (
    JoinTokenList,
    JoinTokenRequest,
    JoinTokenRow,
    OperatorOverview,
    OperatorStats,
)
from csml.store import workers
from csml.store.db import transaction

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 422)
}


@from_headers
def current_operator(request: Request) -> None:
    secret = core(request).settings.operator_secret()
    if secret is None:
        raise ApiError(
            403,
            "operator_view_off",
            "the operator view is off on this coordinator; set CSML_OPERATOR_TOKEN "
            "(or CSML_OPERATOR_TOKEN_FILE) to turn it on",
        )
    token = bearer(request)
    # Compare digests: constant time whatever the lengths.
    given = hashlib.sha256(token.encode()).digest()
    if not hmac.compare_digest(given, hashlib.sha256(secret.encode()).digest()):
        raise unauthorized("this is not the operator token")


router = APIRouter(
    route_class=AuthFirstRoute,
    prefix="/v1/operator",
    tags=["operator"],
    dependencies=[Depends(current_operator)],
    responses=ERRORS,
)


@router.get("/overview", response_model=OperatorOverview)
async def overview(request: Request) -> OperatorOverview:
    """Apps with their live workers and queues; every worker with its state and heartbeat."""
    return await run_in_threadpool(opstats.overview, core(request))


@router.get("/stats", response_model=OperatorStats)
async def stats(
    request: Request,
    minutes: Annotated[int, Query(ge=1, le=24 * 60, description="Window, in minutes.")] = 60,
) -> OperatorStats:
    """Per minute: jobs submitted and finished (and per second), latency; failures by reason."""
    return await run_in_threadpool(opstats.stats, core(request), minutes)


@router.get("/join-tokens", response_model=JoinTokenList)
def list_join_tokens(request: Request) -> JoinTokenList:
    with core(request).sessions() as session:
        tokens = workers.join_tokens(session)
    return JoinTokenList(
        tokens=[
            JoinTokenRow(
                id=t.id,
                label=t.label,
                created_at=t.created_at,
                revoked_at=t.revoked_at,
                apps=t.apps,
                may_publish=t.may_publish,
                workers=count,
                contributed=t.contributor_id is not None,
            )
            for t, count in tokens
        ]
    )


@router.post("/join-tokens", status_code=201, response_model=JoinTokenCreated)
def create_join_token(request: Request, body: JoinTokenRequest) -> JoinTokenCreated:
    """A new join token for `csml worker --join-token`, for the `apps` named (or `any_app`);
    shown once, only its hash is kept. With `publish`, its workers may announce a new
    version of their apps (see the catalog rules)."""
    new = new_join_token(body.label, None if body.any_app else body.apps, body.publish)
    with transaction(core(request).sessions) as session:
        new.store(session)
    return JoinTokenCreated(id=new.id, token=new.token)


@router.delete("/join-tokens/{token_id}", status_code=204)
def revoke_join_token(token_id: str, request: Request) -> Response:
    """Revoke a join token: workers that joined with it are stopped (refused from their next
    call), and catalog versions only it registered are withdrawn."""
    if not ids.is_id_prefix(token_id):
        raise not_found("join token", token_id)
    with transaction(core(request).sessions) as session:
        found = workers.join_tokens_by_prefix(session, token_id, limit=2)
        if not found:
            raise not_found("join token", token_id)
        if len(found) > 1:
            raise ApiError(400, "ambiguous_id", f"{token_id!r} matches several join tokens")
        revoke(session, found[0].id)
    WORKER_TOKENS.forget_join_token(found[0].id)  # committed: its workers are refused now
    core(request).catalog.reload()
    return Response(status_code=204)
