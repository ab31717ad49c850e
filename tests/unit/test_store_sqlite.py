"""SQLite store set-up: WAL, full fsync, reads that never wait for the write lock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, select, text

from csml.store.db import make_engine, make_sessionmaker, migrate, sqlite_url, transaction
from csml.store.tables import Identity, utcnow


def test_reads_begin_plainly_and_writes_take_the_lock_up_front(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    sessions = make_sessionmaker(engine)
    begins: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("BEGIN"):
            begins.append(statement)

    with transaction(sessions) as session:
        session.add(Identity(id="a" * 64, token_hash="b" * 64, created_at=utcnow()))
    with sessions() as session:
        assert session.scalars(select(Identity.id)).all() == ["a" * 64]
    assert begins == ["BEGIN IMMEDIATE", "BEGIN"]
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_the_log_is_checkpointed_every_4000_pages_durably(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == 4000
        assert conn.execute(text("PRAGMA secure_delete")).scalar() == 1  # stays on
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA page_size")).scalar() == 4096  # unchanged
    engine.dispose()
