"""contributions: join tokens an identity made for its own worker; per-app operator settings

Revision ID: 0007_contributions
Revises: 0006_fair_counters
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from csml.store.tables import UTCDateTime

revision = "0007_contributions"
down_revision = "0006_fair_counters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing tokens are the operator's (contributor_id NULL). On SQLite the column comes
    # with its reference in place (ADD COLUMN ... REFERENCES): a batch copy of join_tokens
    # would drop the table, and with foreign keys on that deletes every worker's row.
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "ALTER TABLE join_tokens ADD COLUMN contributor_id VARCHAR(64) "
            "REFERENCES identities (id) ON DELETE CASCADE"
        )
    else:
        op.add_column("join_tokens", sa.Column("contributor_id", sa.String(64), nullable=True))
        op.create_foreign_key(
            "fk_join_tokens_contributor_id_identities",
            "join_tokens",
            "identities",
            ["contributor_id"],
            ["id"],
            ondelete="CASCADE",
        )
    op.create_index(
        "ix_join_tokens_contributor_id", "join_tokens", ["contributor_id"], unique=False
    )
    op.create_table(
        "contribution_settings",
        sa.Column("app", sa.String(length=40), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("max_workers", sa.Integer(), nullable=True),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("app"),
    )


def downgrade() -> None:
    op.drop_table("contribution_settings")
    op.drop_index("ix_join_tokens_contributor_id", table_name="join_tokens")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE join_tokens DROP COLUMN contributor_id")
    else:
        op.drop_constraint(
            "fk_join_tokens_contributor_id_identities", "join_tokens", type_="foreignkey"
        )
        op.drop_column("join_tokens", "contributor_id")
