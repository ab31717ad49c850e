"""Helpers of the SQLite migration tests: a store at a given Alembic revision, a way to
move it, and the rows the tests seed before a migration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from csml.store.db import MIGRATIONS, make_engine, sqlite_url

STAMP = "'2026-01-01 00:00:00'"
"""A timestamp literal for seeded rows."""


class Store:
    """A SQLite store under a folder; `to(conn, revision)` moves it up or down."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cfg = Config()
        self.cfg.set_main_option("script_location", str(MIGRATIONS))

    def to(self, conn: Connection, revision: str, *, down: bool = False) -> None:
        self.cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(self.cfg, revision)
        conn.commit()


@contextmanager
def store_at(folder: Path, revision: str) -> Iterator[Store]:
    """A SQLite store in `folder` migrated up to `revision` (disposed at the end)."""
    store = Store(make_engine(sqlite_url(folder)))
    try:
        with store.engine.connect() as conn:
            store.to(conn, revision)
        yield store
    finally:
        store.engine.dispose()


def add_worker_rows(conn: Connection) -> None:
    """An operator's join token 't' and its echo worker 'w' (columns every revision has)."""
    conn.execute(
        text(
            "INSERT INTO join_tokens (id, token_hash, label, created_at, may_publish) "
            f"VALUES ('t', 'th', '', {STAMP}, 0)"
        )
    )
    conn.execute(
        text(
            "INSERT INTO workers (id, token_hash, join_token_id, app, slots, sandbox, "
            f"registered_at, last_heartbeat) VALUES ('w', 'wh', 't', 'echo', 1, '', "
            f"{STAMP}, {STAMP})"
        )
    )
    conn.commit()
