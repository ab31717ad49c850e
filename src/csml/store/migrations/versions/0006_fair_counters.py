"""fair counters: the last fair rank per (app, identity), so submissions lock no app row

Revision ID: 0006_fair_counters
Revises: 0005_worker_binding
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_fair_counters"
down_revision = "0005_worker_binding"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fair_counters",
        sa.Column("app", sa.String(length=40), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("last_rank", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["identities.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("app", "owner_id"),
    )
    # Each identity's counter starts at the last rank its jobs of the app were given.
    op.execute(
        "INSERT INTO fair_counters (app, owner_id, last_rank) "
        "SELECT app, owner_id, MAX(fair_rank) FROM jobs GROUP BY app, owner_id"
    )


def downgrade() -> None:
    op.drop_table("fair_counters")
