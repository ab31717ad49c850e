"""confidential jobs: worker keys, job recipients, job envelopes

Revision ID: 0002_confidential
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from csml.store.tables import UTCDateTime

revision = "0002_confidential"
down_revision = "0001"
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "worker_keys",
        sa.Column("worker_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("collateral", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["worker_id"], ["workers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("worker_id"),
    )
    op.create_table(
        "job_recipients",
        sa.Column("job_seq", _SEQ, nullable=False),
        sa.Column("worker_id", sa.String(length=64), nullable=False),
        sa.Column("wrapped_key", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["job_seq"], ["jobs.seq"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_seq", "worker_id"),
    )
    op.create_table(
        "job_confidential",
        sa.Column("job_seq", _SEQ, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("job_nonce", sa.String(length=64), nullable=False),
        sa.Column("result_public_key", sa.String(length=64), nullable=False),
        sa.Column("encrypted_params", sa.Text(), nullable=False),
        sa.Column("encrypted_result", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["job_seq"], ["jobs.seq"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_seq"),
    )


def downgrade() -> None:
    op.drop_table("job_confidential")
    op.drop_table("job_recipients")
    op.drop_table("worker_keys")
