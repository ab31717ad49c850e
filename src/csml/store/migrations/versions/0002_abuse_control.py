"""abuse control: challenge secret, used challenges, rate windows, pending purges

Revision ID: 0002_abuse
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from csml.store.tables import UTCDateTime

revision = "0002_abuse"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_secrets",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "used_challenges",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest"),
    )
    with op.batch_alter_table("used_challenges", schema=None) as batch_op:
        batch_op.create_index("ix_used_challenges_expires_at", ["expires_at"], unique=False)

    op.create_table(
        "rate_windows",
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("window_start", UTCDateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("rate_windows", schema=None) as batch_op:
        batch_op.create_index("ix_rate_windows_window_start", ["window_start"], unique=False)

    op.create_table(
        "pending_purges",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )
    # A plain CREATE INDEX: no batch (table copy) on a table other revisions reference.
    op.create_index("ix_jobs_retention", "jobs", ["state", "finished_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_retention", table_name="jobs")
    op.drop_table("pending_purges")
    with op.batch_alter_table("rate_windows", schema=None) as batch_op:
        batch_op.drop_index("ix_rate_windows_window_start")
    op.drop_table("rate_windows")
    with op.batch_alter_table("used_challenges", schema=None) as batch_op:
        batch_op.drop_index("ix_used_challenges_expires_at")
    op.drop_table("used_challenges")
    op.drop_table("server_secrets")
