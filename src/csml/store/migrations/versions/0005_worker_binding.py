"""workers bound to apps: join tokens name their apps; app versions are pinned

Revision ID: 0005_worker_binding
Revises: 0004_pipelines
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from csml.store.tables import UTCDateTime

revision = "0005_worker_binding"
down_revision = "0004_pipelines"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Tokens made before keep serving any app (apps NULL); the operator sees them as such.
    op.add_column("join_tokens", sa.Column("apps", sa.JSON(), nullable=True))
    op.add_column(
        "join_tokens",
        sa.Column("may_publish", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column("workers", sa.Column("app_version", sa.String(length=40), nullable=True))
    op.create_table(
        "app_versions",
        sa.Column("app", sa.String(length=40), nullable=False),
        sa.Column("version", sa.String(length=40), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("join_token_id", sa.String(length=64), nullable=True),
        sa.Column("registered_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("app", "version"),
    )
    op.create_index(
        "ix_app_versions_join_token_id", "app_versions", ["join_token_id"], unique=False
    )
    # Today's catalog entries become pinned versions, as if the coordinator installed them.
    op.execute(
        "INSERT INTO app_versions (app, version, manifest, join_token_id, registered_at) "
        "SELECT name, version, manifest, NULL, updated_at FROM apps"
    )


def downgrade() -> None:
    op.drop_index("ix_app_versions_join_token_id", table_name="app_versions")
    op.drop_table("app_versions")
    with op.batch_alter_table("workers") as batch_op:
        batch_op.drop_column("app_version")
    with op.batch_alter_table("join_tokens") as batch_op:
        batch_op.drop_column("may_publish")
        batch_op.drop_column("apps")
