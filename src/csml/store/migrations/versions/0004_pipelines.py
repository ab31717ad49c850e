"""pipelines: step jobs linked to their parent job

Revision ID: 0004_pipelines
Revises: 0003_models
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_pipelines"
down_revision = "0003_models"
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot add a constraint to a table, but may add a column that carries
        # one; batch mode would copy `jobs`, and the copy would cascade-delete job rows.
        op.execute(
            "ALTER TABLE jobs ADD COLUMN parent_seq INTEGER REFERENCES jobs (seq) ON DELETE CASCADE"
        )
    else:
        op.add_column("jobs", sa.Column("parent_seq", _SEQ, nullable=True))
        op.create_foreign_key(
            "jobs_parent_seq_fkey", "jobs", "jobs", ["parent_seq"], ["seq"], ondelete="CASCADE"
        )
    op.add_column("jobs", sa.Column("step_index", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_parent", "jobs", ["parent_seq", "step_index"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_parent", table_name="jobs")
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint("jobs_parent_seq_fkey", "jobs", type_="foreignkey")
        op.drop_column("jobs", "step_index")
        op.drop_column("jobs", "parent_seq")
        return
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("step_index")
        batch_op.drop_column("parent_seq")
