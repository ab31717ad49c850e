"""SQLite store set-up: WAL, full fsync, reads that never wait for the write lock."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, exc, select, text

from csml.store.db import (
    WRITE_OPTION,
    counters,
    make_engine,
    make_sessionmaker,
    migrate,
    sqlite_url,
    transaction,
)
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


def test_a_begin_is_sent_in_one_driver_call(tmp_path: Path) -> None:
    """BEGIN (and BEGIN IMMEDIATE) go by `executescript`, which lets go of the GIL once,
    not by a cursor's `execute` (four times: see `csml.store.db._Script`), still through
    SQLAlchemy's raw path (listeners see them, `StoreCounters` counts them)."""
    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    sessions = make_sessionmaker(engine)
    cursors: list[tuple[str, bool]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("BEGIN"):
            cursors.append((statement, isinstance(cursor, sqlite3.Cursor)))

    before = counters(engine).by_kind.get("BEGIN IMMEDIATE", 0)
    with transaction(sessions) as session:
        session.add(Identity(id="a" * 64, token_hash="b" * 64, created_at=utcnow()))
    with sessions() as session:
        assert session.scalars(select(Identity.id)).all() == ["a" * 64]
    assert cursors == [("BEGIN IMMEDIATE", False), ("BEGIN", False)]
    assert counters(engine).by_kind.get("BEGIN IMMEDIATE", 0) == before + 1
    engine.dispose()


def test_a_write_begin_still_takes_the_write_lock(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
        other = sqlite3.connect(tmp_path / "csml.db", timeout=0, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()
    engine.dispose()


def test_a_begin_inside_an_open_transaction_fails_and_commits_nothing(tmp_path: Path) -> None:
    """`executescript` would COMMIT an open transaction first: a BEGIN on a connection
    that holds one is sent as before and fails, leaving that transaction uncommitted."""
    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        dbapi.execute("BEGIN")
        dbapi.execute(
            "INSERT INTO identities (id, token_hash, created_at) VALUES (?, ?, ?)",
            ("c" * 64, "d" * 64, utcnow().isoformat()),
        )
        with pytest.raises(exc.OperationalError, match="within a transaction"):
            conn.begin()
        dbapi.rollback()
    with engine.connect() as conn:
        assert conn.execute(select(Identity.id)).all() == []
    engine.dispose()
