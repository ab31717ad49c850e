"""Where the security tests' coordinator processes keep their store.

`BACKENDS` parametrizes a test over SQLite (in the cluster's data folder) and
PostgreSQL (a fresh database on a private server, `tests.pg_server`; marked
`postgresql`). `store_env` gives the coordinator settings for either and
`store_url` the SQLAlchemy URL a test reads the rows back through.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from csml.store.db import sqlite_url
from tests.pg_server import (
    PostgresFailed,
    PostgresNotFound,
    PostgresServer,
    create_database,
    drop_database,
    running_postgres,
)

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL server (skipped with CSML_SKIP_POSTGRES=1, as elsewhere)."""
    if os.environ.get("CSML_SKIP_POSTGRES", "").strip().lower() in ("1", "true", "yes"):
        pytest.skip("CSML_SKIP_POSTGRES is set: PostgreSQL tests skipped")
    try:
        with running_postgres() as server:
            yield server
    except (PostgresNotFound, PostgresFailed) as exc:
        pytest.fail(str(exc), pytrace=False)


@contextmanager
def fresh_database(server: PostgresServer) -> Iterator[str]:
    name = f"csml_s_{secrets.token_hex(6)}"
    create_database(server, name)
    try:
        yield server.url_for(name)
    finally:
        drop_database(server, name)


def store_env(backend: str, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Coordinator settings for `backend` (for a fixture to yield from)."""
    if backend == "sqlite":
        yield {}
        return
    server: PostgresServer = request.getfixturevalue("pg")
    with fresh_database(server) as url:
        yield {"CSML_DATABASE_URL": url}


def store_url(settings: dict[str, str], data_dir: Path) -> str:
    return settings.get("CSML_DATABASE_URL") or sqlite_url(data_dir)
