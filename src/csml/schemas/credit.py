"""Credit: an identity's balance and ledger, and the operator's totals.

Amounts are integers in milli-credits (1 credit = 1000): one credit is one wall second
of a run of an app whose credit weight is 1.0 (see docs/user-guide/credit.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class CreditEntryInfo(BaseModel):
    id: int = Field(description="Ledger row id; pass it as `before` to page on.")
    at: datetime
    kind: Literal["earned", "spent"]
    amount_milli: int = Field(description="Milli-credits (> 0); `kind` says which way.")
    job_id: str | None = Field(
        description="Earned: the job your contributed worker ran. Spent: your job served "
        "by priority."
    )
    app: str
    worker_id: str | None = Field(description="The worker that ran it.")


class CreditPriority(BaseModel):
    """The bound: of every `n` consecutive jobs a coordinator hands out for an app, at
    most `k` go to identities with credit ahead of round-robin."""

    k: int
    n: int


class CreditInfo(BaseModel):
    balance_milli: int = Field(
        description="Earned minus spent; may be below zero. Above zero: your queued jobs "
        "may be served ahead of round-robin."
    )
    earned_milli: int
    spent_milli: int
    credited: bool = Field(description="Whether the balance is above zero now.")
    priority: CreditPriority
    entries: list[CreditEntryInfo] = Field(description="Newest first.")
    next_before: int | None = Field(
        description="Pass as `before` for the next (older) page; null: no older entries."
    )


class CreditAppTotals(BaseModel):
    app: str
    earned_milli: int
    spent_milli: int
    entries: int


class CreditTotals(BaseModel):
    """The ledger's totals: never per identity."""

    earned_milli: int
    spent_milli: int
    entries: int
    identities: int = Field(description="Identities that ever earned or spent.")
    credited_identities: int = Field(description="Identities with a balance above zero.")
    outstanding_milli: int = Field(description="Sum of the balances above zero.")
    priority: CreditPriority
    apps: list[CreditAppTotals]
