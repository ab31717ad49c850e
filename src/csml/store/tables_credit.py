"""Tables of the credit ledger (issue 13 item 2). Migration `0008_credit` builds them.

- `credit_ledger`: append-only, one row per earning or spending of an identity, amounts in
  milli-credits (positive integers; `kind` says which way). Rows are never updated; they
  go only with their identity (ON DELETE CASCADE, and the erasure path deletes them).
- `credit_balances`: one row per identity that ever earned or spent: the running sums of
  its ledger, so a claim and a balance read cost one row. `balance_milli` is
  `earned_milli - spent_milli` and may go below zero (see `csml.store.credit`);
  `ix_credit_balances_balance` lets "is anyone credited?" be one index probe.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from csml.store.tables import Base, SerialId


class CreditEntry(Base):
    __tablename__ = "credit_ledger"

    id: Mapped[int] = mapped_column(SerialId, primary_key=True, autoincrement=True)
    identity_id: Mapped[str] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"))
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(8))  # "earned" | "spent"
    amount: Mapped[int] = mapped_column(BigInteger)  # milli-credits, > 0
    job_id: Mapped[str | None] = mapped_column(String(64))
    app: Mapped[str] = mapped_column(String(40))
    worker_id: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_credit_ledger_identity", "identity_id", "id"),)


class CreditBalance(Base):
    __tablename__ = "credit_balances"

    identity_id: Mapped[str] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), primary_key=True
    )
    balance_milli: Mapped[int] = mapped_column(BigInteger)
    earned_milli: Mapped[int] = mapped_column(BigInteger)
    spent_milli: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime]

    __table_args__ = (Index("ix_credit_balances_balance", "balance_milli"),)
