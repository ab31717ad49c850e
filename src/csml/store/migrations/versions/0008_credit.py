"""credit: the ledger and balances per identity, a credit weight per app, the priority lease

Revision ID: 0008_credit
Revises: 0007_contributions
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from csml.store.tables import UTCDateTime

revision = "0008_credit"
down_revision = "0007_contributions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credit_ledger",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("identity_id", sa.String(length=64), nullable=False),
        sa.Column("at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("app", sa.String(length=40), nullable=False),
        sa.Column("worker_id", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["identity_id"], ["identities.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_credit_ledger_identity", "credit_ledger", ["identity_id", "id"])
    op.create_table(
        "credit_balances",
        sa.Column("identity_id", sa.String(length=64), nullable=False),
        sa.Column("balance_milli", sa.BigInteger(), nullable=False),
        sa.Column("earned_milli", sa.BigInteger(), nullable=False),
        sa.Column("spent_milli", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["identity_id"], ["identities.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("identity_id"),
    )
    op.create_index("ix_credit_balances_balance", "credit_balances", ["balance_milli"])
    # Plain ADD COLUMN on both dialects (no reference: SQLite needs no table copy; see
    # 0007 on why a batch copy of jobs or workers must never happen).
    op.add_column(
        "contribution_settings",
        sa.Column("credit_weight", sa.Float(), nullable=False, server_default="1.0"),
    )
    op.add_column("jobs", sa.Column("credit_lease", sa.String(length=64), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE jobs DROP COLUMN credit_lease")
        op.execute("ALTER TABLE contribution_settings DROP COLUMN credit_weight")
    else:
        op.drop_column("jobs", "credit_lease")
        op.drop_column("contribution_settings", "credit_weight")
    op.drop_index("ix_credit_balances_balance", table_name="credit_balances")
    op.drop_table("credit_balances")
    op.drop_index("ix_credit_ledger_identity", table_name="credit_ledger")
    op.drop_table("credit_ledger")
