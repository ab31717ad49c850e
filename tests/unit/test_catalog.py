"""The catalog inside a write transaction must not take a second pooled connection.

With SQLite, a transaction holding the write lock that waits for another pooled
connection deadlocks once every other connection is waiting for that lock (seen
as 'database is locked' under load in bench/core.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event

from csml.apps.registry import load_app
from csml.coordinator.catalog import Catalog
from csml.store.db import make_engine, make_sessionmaker, migrate, sqlite_url, transaction


def test_a_refresh_inside_a_transaction_reuses_its_connection(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    sessions = make_sessionmaker(engine)
    catalog = Catalog(sessions)
    with transaction(sessions) as session:
        catalog.install(session, load_app("echo").manifest())
    checkouts: list[Any] = []
    event.listen(engine, "checkout", lambda *a: checkouts.append(a))

    with transaction(sessions) as session:
        catalog._loaded_at = 0.0  # stale: the next lookup refreshes from the store
        catalog.operation("echo", "echo", session)
        assert len(checkouts) == 1  # the transaction's own connection only
        catalog._loaded_at = 0.0
        catalog.operation("echo", "echo")  # without the session: a second connection
        assert len(checkouts) == 2
    engine.dispose()
