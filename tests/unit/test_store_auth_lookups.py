"""The per-request auth look-ups (on a cache miss) are one statement each and hand out
frozen rows: identity by token hash, worker by token hash (with its join token's
revocation), join token by hash."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from csml.store import identities, workers
from csml.store.db import make_engine, make_sessionmaker, migrate, sqlite_url, transaction
from csml.store.tables import utcnow
from tests.unit.inproc import HttpWorker, InProcessCoordinator


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    now = utcnow()
    with transaction(make_sessionmaker(engine)) as session:
        identities.add_identity(session, "a" * 64, "h" * 64, now)
        workers.add_join_token(
            session,
            id="j" * 64,
            token_hash="t" * 64,
            label="",
            created_at=now,
            apps=["echo"],
            may_publish=False,
        )
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO workers (id, token_hash, join_token_id, app, app_version, slots, "
            "sandbox, registered_at, last_heartbeat) VALUES (?, ?, ?, 'echo', '1', 2, '', ?, ?)",
            ("w" * 64, "k" * 64, "j" * 64, now.replace(tzinfo=None), now.replace(tzinfo=None)),
        )
    yield engine
    engine.dispose()


def selects(engine: Engine, run: Any) -> tuple[Any, list[str]]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        if str(args[2]).lstrip().upper().startswith("SELECT"):
            seen.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with engine.connect() as conn:
            return run(conn), seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_identity_by_token_is_one_statement(engine: Engine) -> None:
    found, seen = selects(engine, lambda c: identities.identity_by_token(c, "h" * 64))
    assert len(seen) == 1
    assert found is not None and found.id == "a" * 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.id = "b" * 64
    missing, _ = selects(engine, lambda c: identities.identity_by_token(c, "x" * 64))
    assert missing is None


def test_worker_by_token_is_one_statement_and_sees_revocation(engine: Engine) -> None:
    found, seen = selects(engine, lambda c: workers.worker_by_token(c, "k" * 64))
    assert len(seen) == 1
    assert found is not None and found.revoked_at is None
    assert (found.worker.id, found.worker.app, found.worker.slots) == ("w" * 64, "echo", 2)
    with transaction(make_sessionmaker(engine)) as session:
        workers.revoke_join_token(session, "j" * 64, utcnow())
    after, _ = selects(engine, lambda c: workers.worker_by_token(c, "k" * 64))
    assert after is not None and after.revoked_at is not None
    assert after.worker.stopped_at is not None  # revoking stopped its worker


def test_join_token_by_hash(engine: Engine) -> None:
    found, seen = selects(engine, lambda c: workers.join_token_by_hash(c, "t" * 64))
    assert len(seen) == 1
    assert found is not None and found.allows("echo") and not found.allows("opencv")


def test_a_cache_miss_on_the_coordinator_is_one_statement_without_begin(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """An identity's and a worker's token not remembered: each look-up is its one SELECT,
    outside any read transaction (no plain BEGIN, no ROLLBACK)."""
    from csml.coordinator.worker_tokens import CACHE

    user = coordinator.new_user()
    job = user.submit("echo", "echo", params={"n": 1})
    sent: list[str] = []

    def record(_conn: object, _cur: object, statement: str, *_: object) -> None:
        sent.append(" ".join(statement.split()))

    engine = coordinator.core.engine
    coordinator.core.identities.clear()
    CACHE.forget_worker(echo_worker.id)
    event.listen(engine, "before_cursor_execute", record)
    try:
        assert user.request("GET", f"/v1/jobs/{job.id}").json()["id"] == job.id
        [claimed] = echo_worker.claim()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert claimed.id == job.id
    assert "BEGIN" not in sent and "ROLLBACK" not in sent
    assert len([s for s in sent if s.startswith("SELECT identities.")]) == 1
    assert len([s for s in sent if "FROM workers JOIN join_tokens" in s]) == 1
