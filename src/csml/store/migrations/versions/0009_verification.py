"""verification: deterministic operations' results of contributed workers are compared

Revision ID: 0009_verification
Revises: 0008_credit
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from csml.store.tables import UTCDateTime

revision = "0009_verification"
down_revision = "0008_credit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs (with server defaults): never a batch copy of jobs or workers,
    # which other tables reference with ON DELETE CASCADE (see 0007's note).
    op.add_column(
        "workers", sa.Column("agreements", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column(
        "workers", sa.Column("disagreements", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column("workers", sa.Column("quarantined_at", UTCDateTime(timezone=True)))
    op.add_column("contribution_settings", sa.Column("verification", sa.String(32)))
    op.add_column(
        "jobs",
        sa.Column("trusted_only", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column("jobs", sa.Column("min_reputation", sa.Integer()))
    op.add_column(
        "jobs", sa.Column("verify_runs", sa.Integer(), server_default="0", nullable=False)
    )
    op.create_table(
        "job_runs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("worker_id", sa.String(64), nullable=False),
        sa.Column("contributor_id", sa.String(64), nullable=True),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("counts", sa.Boolean(), nullable=False),
        sa.Column("wall_seconds", sa.Float(), nullable=False),
        sa.Column("at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("credit", sa.String(8), nullable=True),
        sa.ForeignKeyConstraint(["job_seq"], ["jobs.seq"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["contributor_id"], ["identities.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_runs_job", "job_runs", ["job_seq", "contributor_id"])
    op.create_index("ix_job_runs_worker_id", "job_runs", ["worker_id"])
    op.create_index("ix_job_runs_contributor_id", "job_runs", ["contributor_id"])


def downgrade() -> None:
    op.drop_index("ix_job_runs_contributor_id", table_name="job_runs")
    op.drop_index("ix_job_runs_worker_id", table_name="job_runs")
    op.drop_index("ix_job_runs_job", table_name="job_runs")
    op.drop_table("job_runs")
    dropped = {
        "jobs": ("verify_runs", "min_reputation", "trusted_only"),
        "contribution_settings": ("verification",),
        "workers": ("quarantined_at", "disagreements", "agreements"),
    }
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, columns in dropped.items():
        for column in columns:
            if sqlite:  # in place (3.35+), as 0007: never a batch copy of these tables
                op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
            else:
                op.drop_column(table, column)
