"""The store on a real PostgreSQL server: migrations, types, concurrent start-up."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from csml.apps.registry import installed_apps
from csml.coordinator.state import Core
from csml.store.db import make_engine, migrate, transaction
from csml.store.tables import AppRecord, Base
from tests.integration.postgres.support import MakeCore, job_row, new_identity, submit
from tests.pg_server import PostgresServer

# Starts a private PostgreSQL server (initdb) for the session's first test.
pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]

TABLES = {"alembic_version", "apps", "identities", "join_tokens", "jobs", "job_files", "workers"}


def migration_heads() -> set[str]:
    """Every head revision (sibling branches off 0001 are all applied)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from csml.store.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return set(ScriptDirectory.from_config(cfg).get_heads())


def applied(conn: Connection) -> set[str]:
    return set(conn.scalars(text("SELECT version_num FROM alembic_version")))


def test_server_is_private_and_on_loopback(pg_server: PostgresServer, pg_url: str) -> None:
    assert pg_url.startswith("postgresql+psycopg://")
    assert f"@127.0.0.1:{pg_server.port}/" in pg_url
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SHOW listen_addresses")) == "127.0.0.1"
            assert conn.scalar(text("SHOW fsync")) == "off"
            assert str(pg_server.root) in conn.scalar(text("SHOW unix_socket_directories"))
    finally:
        engine.dispose()


def test_migrations_apply(core: Core) -> None:
    assert core.engine.dialect.name == "postgresql"
    insp = inspect(core.engine)
    assert set(insp.get_table_names()) >= TABLES
    with core.engine.connect() as conn:
        assert applied(conn) == migration_heads()
        # The installed apps were registered by build_core.
        assert "echo" in set(conn.scalars(text("SELECT name FROM apps")))
    indexes = {ix["name"] for ix in insp.get_indexes("jobs")}
    assert {"ix_jobs_claim", "ix_jobs_owner", "ix_jobs_lease"} <= indexes
    cols = {c["name"]: c for c in insp.get_columns("jobs")}
    assert getattr(cols["created_at"]["type"], "timezone", None) is True  # timestamptz
    assert cols["seq"]["type"].python_type is int


def test_migrations_match_models(core: Core) -> None:
    """What the migration built on PostgreSQL is what models.py declares."""
    with core.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_migrate_is_idempotent(core: Core, make_core: MakeCore) -> None:
    migrate(core.engine)
    migrate(core.engine)
    make_core()  # a second coordinator on a migrated store
    with core.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM alembic_version")) == len(migration_heads())


def test_concurrent_migrations_serialise(db_url: str) -> None:
    """Several coordinators migrating one fresh database at once: the advisory lock orders them."""
    engines = [make_engine(db_url) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(engines))

    def run(engine) -> None:  # type: ignore[no-untyped-def]
        try:
            barrier.wait()
            migrate(engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        with engines[0].connect() as conn:
            assert applied(conn) == migration_heads()
    finally:
        for e in engines:
            e.dispose()


def test_first_registration_of_an_app_from_two_coordinators(make_core: MakeCore) -> None:
    one, two = make_core(), make_core()
    manifest = installed_apps()["echo"].manifest().model_copy(update={"name": "fresh"})
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with transaction(two.sessions) as session:
                two.catalog.install(session, manifest)
        except BaseException as exc:
            errors.append(exc)

    with one.sessions() as first, first.begin():
        one.catalog.install(first, manifest)
        first.flush()  # the first coordinator's row exists, not yet committed
        thread = threading.Thread(target=second)
        thread.start()
        wait_for_lock_waiter(one)  # the second now waits on the first's row
    thread.join(30)
    if errors:
        raise errors[0]
    with one.sessions() as session:
        assert session.get(AppRecord, "fresh") is not None


def wait_for_lock_waiter(core: Core, timeout: float = 10.0) -> None:
    """Until some other session of this database waits for a lock (or `timeout`)."""
    deadline = time.monotonic() + timeout
    with core.engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            conn.rollback()
            if waiting:
                return
            time.sleep(0.02)


def test_times_round_trip_as_utc(core: Core) -> None:
    owner = new_identity(core)
    before = datetime.now(UTC)
    job = job_row(core, submit(core, owner, x=1))
    assert job.created_at.tzinfo is not None
    assert job.created_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((job.created_at - before).total_seconds()) < 60
    assert job.params == {"x": 1}
    assert job.seq >= 1
