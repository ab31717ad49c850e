"""The stored-bytes counter on a real PostgreSQL server (plpgsql triggers, migration
0011_stored_bytes): a smaller property run than SQLite's (tests/unit/test_stored_bytes.py),
the named sequences, the backfill, and concurrent transactions on one identity (a model
kept while its job is deleted, files sharing a blob added and removed together) landing
exactly the sum."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from csml import ids
from csml.store import jobs_quota
from csml.store import models as model_rows
from csml.store.db import is_conflict, make_engine, migrate, transaction
from csml.store.jobs import FileRow
from csml.store.jobs_write import NewJob, add_files, insert_job
from csml.store.models import StoredModel
from csml.store.tables import utcnow
from tests.integration.postgres.support import run_threads
from tests.stored_bytes_ops import NAMED, SEEDED, Op, Store, seed_at_0010
from tests.unit.migrations import Store as Migrations
from tests.unit.test_stored_bytes import OPS

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(600)]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    engine = make_engine(db_url)
    migrate(engine)
    yield Store(engine)
    engine.dispose()


def test_the_counter_equals_the_sum_after_any_sequence(store: Store) -> None:
    @settings(
        max_examples=15,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(ops=OPS)
    def run(ops: list[Op]) -> None:
        store.play(ops)

    run()


def test_named_sequences(store: Store) -> None:
    for ops in NAMED:
        store.play(ops)


def test_the_migration_counts_what_is_already_stored(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrations = Migrations(engine)
        with engine.connect() as conn:
            migrations.to(conn, "0010_placement")
            seed_at_0010(conn)
            migrations.to(conn, "heads")
            for owner, total in SEEDED.items():
                assert jobs_quota.stored_bytes(conn, owner) == total
                assert jobs_quota.summed_stored_bytes(conn, owner) == total
            conn.commit()
            migrations.to(conn, "0010_placement", down=True)
            found = conn.scalar(text("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'stored%'"))
            assert found == 0
            migrations.to(conn, "heads")  # and up again, from the same rows
            assert jobs_quota.stored_bytes(conn, "a") == SEEDED["a"]
            conn.commit()
    finally:
        engine.dispose()


def _retrying(store: Store, work: object) -> None:
    """Run `work(conn)` in a transaction, again on a deadlock (as the writer's callers do)."""
    for attempt in range(5):
        try:
            with store.engine.begin() as conn:
                work(conn)  # type: ignore[operator]
            return
        except Exception as exc:
            if attempt == 4 or not is_conflict(exc):
                raise


def _job(store: Store, owner: str, blob: str) -> tuple[int, str]:
    job = NewJob(
        id=ids.new_id(),
        owner_id=owner,
        app="echo",
        operation="echo",
        params={"x": 1},
        limits={},
        fair_rank=1,
        created_at=utcnow(),
        max_attempts=1,
    )
    files = [
        FileRow("input", "shared", 100, "0" * 64, "application/octet-stream", blob),
        FileRow("input", "own", 7, "0" * 64, "application/octet-stream", f"own/{job.id}"),
    ]
    with store.engine.begin() as conn:
        seq = insert_job(conn, job, files, None)
    return seq, job.id


def test_concurrent_changes_of_one_identity_count_exactly(store: Store, tmp_path: Path) -> None:
    """Rounds of 8 transactions at once on one identity's jobs, which all hold one blob:
    for each job one keeps a model of it and adds an output holding the shared blob,
    while another deletes it. Whatever order they commit in, the counter is the sum."""
    owner = store.play([]).owners[0]
    for _ in range(6):
        jobs = [_job(store, owner, "blob/shared") for _ in range(4)]

        def race(i: int, jobs: list[tuple[int, str]] = jobs) -> str:
            seq, job_id = jobs[i // 2]
            if i % 2:
                drop = text("DELETE FROM jobs WHERE seq = :s")
                _retrying(store, lambda c: c.execute(drop, {"s": seq}))
                return "deleted"
            model = StoredModel(
                id=ids.new_id(),
                owner_id=owner,
                app="echo",
                kind="thing",
                format="test",
                format_version=1,
                name="m",
                operation="echo",
                job_id=job_id,
                size=1000,
                sha256="0" * 64,
                media_type="application/octet-stream",
                blob=f"models/{ids.new_id()}/m",
                metrics={},
                created_at=utcnow(),
            )
            with transaction(store.sessions) as session:
                model_rows.add(session, model)
            output = FileRow("output", "o", 100, "0" * 64, "text/plain", "blob/shared")
            try:
                _retrying(store, lambda c: add_files(c, seq, [output]))
            except IntegrityError:
                return "job gone"  # deleted first: no file row, nothing counted
            return "kept"

        outcomes = run_threads(8, race)
        assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
        store.check([owner])
    with store.engine.connect() as conn:
        assert jobs_quota.stored_bytes(conn, owner) == 6 * 4 * 1000  # every model outlived its job
