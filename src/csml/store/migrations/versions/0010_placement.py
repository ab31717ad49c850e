"""placement: worker labels, job requirement and warm-model keys, the requirement keys

Revision ID: 0010_placement
Revises: 0009_verification
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from csml.store.tables import UTCDateTime

revision = "0010_placement"
down_revision = "0009_verification"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain nullable columns without references: ADD COLUMN on both backends (no batch
    # copy of tables that others reference).
    op.add_column("workers", sa.Column("labels", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("requires_key", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("warm_key", sa.String(64), nullable=True))
    op.create_index(
        "ix_jobs_requires_key",
        "jobs",
        ["app", "requires_key"],
        unique=False,
        postgresql_where=sa.text("requires_key IS NOT NULL"),
        sqlite_where=sa.text("requires_key IS NOT NULL"),
    )
    op.create_table(
        "placement_keys",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("app", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("requires", sa.JSON(), nullable=False),
        sa.Column("used_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("app", "key", name="uq_placement_keys_app_key"),
    )
    op.create_index("ix_placement_keys_app_id", "placement_keys", ["app", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_placement_keys_app_id", table_name="placement_keys")
    op.drop_table("placement_keys")
    op.drop_index("ix_jobs_requires_key", table_name="jobs")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE jobs DROP COLUMN warm_key")
        op.execute("ALTER TABLE jobs DROP COLUMN requires_key")
        op.execute("ALTER TABLE workers DROP COLUMN labels")
    else:
        op.drop_column("jobs", "warm_key")
        op.drop_column("jobs", "requires_key")
        op.drop_column("workers", "labels")
