"""Fixtures for the PostgreSQL tests: one private server per session, one database per test.

The server is started by `tests.pg_server` (no server needs to be running).
Without PostgreSQL binaries these tests fail and say what to install, unless
CSML_SKIP_POSTGRES=1, in which case they are skipped.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csml.coordinator.config import Settings
from csml.coordinator.state import Core
from tests.integration.postgres.support import MakeCore
from tests.pg_server import (
    PostgresFailed,
    PostgresNotFound,
    PostgresServer,
    create_database,
    drop_database,
    find_bindir,
    running_postgres,
)


def _skip_requested() -> bool:
    return os.environ.get("CSML_SKIP_POSTGRES", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1, private to this test session."""
    if _skip_requested():
        pytest.skip("CSML_SKIP_POSTGRES is set: PostgreSQL tests skipped")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail(
            "psycopg is not installed; install it with `pip install -e '.[postgresql]'` "
            "(or set CSML_SKIP_POSTGRES=1 to skip the PostgreSQL tests)",
            pytrace=False,
        )
    try:
        find_bindir()
    except PostgresNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        with running_postgres() as server:
            yield server
    except PostgresFailed as exc:
        pytest.fail(f"could not start PostgreSQL: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def pg_url(pg_server: PostgresServer) -> str:
    """SQLAlchemy URL of the session's default database (shared: tests should use `db_url`)."""
    return pg_server.url


@pytest.fixture
def db_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test only; dropped afterwards."""
    name = f"csml_t_{secrets.token_hex(6)}"
    create_database(pg_server, name)
    try:
        yield pg_server.url_for(name)
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_core(db_url: str, data_dir: Path) -> Iterator[MakeCore]:
    """Build coordinators (`build_core`) on this test's database; each has its own engine."""
    from csml.coordinator.app import build_core

    cores: list[Core] = []

    def make(**overrides: Any) -> Core:
        settings = Settings(database_url=db_url, data_dir=data_dir, **overrides)
        core = build_core(settings)
        cores.append(core)
        return core

    try:
        yield make
    finally:
        for core in cores:
            core.engine.dispose()


@pytest.fixture
def core(make_core: MakeCore) -> Core:
    return make_core()
