"""Alembic environment: runs on the connection the coordinator hands over."""

from __future__ import annotations

from alembic import context

from csml.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only through csml.store.db.migrate
    raise RuntimeError("run migrations through csml.store.db.migrate()")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
