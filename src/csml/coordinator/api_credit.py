"""Routes for credit: an identity's own balance and ledger (`GET /v1/credit`) and the
operator's totals (`GET /v1/operator/credit`).

The rules live in `csml.coordinator.credit` and `csml.store.credit`; these routes only
authenticate and translate. An identity sees only its own ledger; the operator sees only
totals, never whose.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from csml.coordinator import credit
from csml.coordinator.api_operator import ERRORS as OPERATOR_ERRORS
from csml.coordinator.api_operator import current_operator
from csml.coordinator.auth import AuthFirstRoute, current_identity
from csml.coordinator.state import Core, core
from csml.schemas import ErrorBody
from csml.schemas.credit import (
    CreditAppTotals,
    CreditEntryInfo,
    CreditInfo,
    CreditPriority,
    CreditTotals,
)
from csml.store.identities import IdentityRow

Me = Annotated[IdentityRow, Depends(current_identity)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 422)}

router = APIRouter(route_class=AuthFirstRoute, tags=["credit"])


def _priority(c: Core) -> CreditPriority:
    return CreditPriority(k=c.settings.credit_priority_k, n=c.settings.credit_priority_n)


def _info(c: Core, identity_id: str, limit: int, before: int | None) -> CreditInfo:
    found = credit.statement(c.sessions, identity_id, limit, before)
    return CreditInfo(
        balance_milli=found.balance.balance,
        earned_milli=found.balance.earned,
        spent_milli=found.balance.spent,
        credited=found.balance.balance > 0,
        priority=_priority(c),
        entries=[
            CreditEntryInfo(
                id=e.id,
                at=e.at,
                kind=e.kind,
                amount_milli=e.amount,
                job_id=e.job_id,
                app=e.app,
                worker_id=e.worker_id,
            )
            for e in found.entries
        ],
        next_before=found.next_before,
    )


@router.get("/v1/credit", response_model=CreditInfo, responses=ERRORS)
async def mine(
    request: Request,
    me: Me,
    limit: Annotated[int, Query(ge=1, le=credit.MAX_HISTORY)] = 50,
    before: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="Entries older than this id.")
    ] = None,
) -> CreditInfo:
    """Your credit balance and ledger, newest first (earned by your contributed workers'
    accepted runs of others' jobs, spent when your jobs are served by priority)."""
    return await run_in_threadpool(_info, core(request), me.id, limit, before)


operator = APIRouter(
    route_class=AuthFirstRoute,
    prefix="/v1/operator/credit",
    tags=["operator"],
    dependencies=[Depends(current_operator)],
    responses=OPERATOR_ERRORS,
)


def _totals(c: Core) -> CreditTotals:
    t = credit.totals(c.sessions)
    return CreditTotals(
        earned_milli=t.earned,
        spent_milli=t.spent,
        entries=t.entries,
        identities=t.identities,
        credited_identities=t.credited,
        outstanding_milli=t.outstanding,
        priority=_priority(c),
        apps=[
            CreditAppTotals(
                app=a.app, earned_milli=a.earned, spent_milli=a.spent, entries=a.entries
            )
            for a in t.by_app
        ],
    )


@operator.get("", response_model=CreditTotals)
async def totals(request: Request) -> CreditTotals:
    """The ledger's totals (earned, spent, per app) and how many identities hold credit."""
    return await run_in_threadpool(_totals, core(request))
