"""A write operation PostgreSQL aborts to break a deadlock runs again, from threads and
from the event loop alike (`JobQueue._write`/`_write_async`, one rule: a `Rerunnable` op
or a caller's `rerun=True`; one policy: `queue._conflict_attempts`), on the coordinator's
real writer and SQLite store.

The abort is the driver error SQLAlchemy wraps (`OperationalError` whose `.orig`
carries the SQLSTATE `db.is_conflict` reads); SQLite never raises one by itself."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import OperationalError

from csml.coordinator.queue import CONFLICT_RETRIES, JobQueue, _conflict_attempts
from csml.schemas import JobSpec
from csml.store import jobs as store
from csml.store.jobs import APPS
from csml.store.tables import utcnow
from csml.store.writer import Rerunnable
from tests.unit.conftest import MakeCoordinator


class DeadlockDetected(Exception):
    """What psycopg raises for SQLSTATE 40P01 (`psycopg.errors.DeadlockDetected`)."""

    sqlstate = "40P01"


class SerializationFailure(Exception):
    sqlstate = "40001"


def failing(times: int, orig: type[Exception] = DeadlockDetected) -> Callable[[Connection], str]:
    """An op that writes an app row named after its run, then is aborted on its first
    `times` runs (after its write, as PostgreSQL aborts a statement midway)."""
    runs = 0

    def op(conn: Connection) -> str:
        nonlocal runs
        runs += 1
        name = f"run-{runs}"
        conn.execute(
            insert(APPS).values(
                name=name, version="1", manifest={}, served_rank=0, updated_at=utcnow()
            )
        )
        if runs <= times:
            raise OperationalError("UPDATE jobs …", {}, orig("deadlock detected"))
        return name

    return op


def app_names(queue: JobQueue) -> list[str]:
    with queue.engine.connect() as conn:
        return sorted(conn.scalars(select(APPS.c.name).where(APPS.c.name.like("run-%"))))


@pytest.mark.parametrize("orig", [DeadlockDetected, SerializationFailure])
def test_a_write_aborted_by_a_deadlock_runs_again_from_a_thread(
    make_coordinator: MakeCoordinator, caplog: pytest.LogCaptureFixture, orig: type[Exception]
) -> None:
    queue = make_coordinator().core.queue
    with caplog.at_level(logging.INFO, logger="csml.coordinator.queue"):
        assert queue._write(failing(CONFLICT_RETRIES - 1, orig), "a cancel", rerun=True) == (
            f"run-{CONFLICT_RETRIES}"
        )
    assert app_names(queue) == [f"run-{CONFLICT_RETRIES}"]  # the aborted runs left nothing
    assert caplog.messages.count("a cancel met a deadlock; running it again") == (
        CONFLICT_RETRIES - 1
    )


def test_a_write_aborted_by_a_deadlock_runs_again_from_the_event_loop(
    make_coordinator: MakeCoordinator,
) -> None:
    queue = make_coordinator().core.queue
    done = asyncio.run(queue._write_async(failing(CONFLICT_RETRIES - 1), rerun=True))
    assert done == f"run-{CONFLICT_RETRIES}"
    assert app_names(queue) == [f"run-{CONFLICT_RETRIES}"]


def test_the_last_deadlock_is_raised(make_coordinator: MakeCoordinator) -> None:
    queue = make_coordinator().core.queue
    with pytest.raises(OperationalError) as sync_raised:
        queue._write(failing(CONFLICT_RETRIES), rerun=True)
    assert isinstance(sync_raised.value.orig, DeadlockDetected)
    with pytest.raises(OperationalError):
        asyncio.run(queue._write_async(failing(CONFLICT_RETRIES), rerun=True))
    assert app_names(queue) == []


def test_other_errors_are_not_run_again(make_coordinator: MakeCoordinator) -> None:
    """A unique violation, a refusal …: raised from the first run, which is not repeated."""
    queue = make_coordinator().core.queue
    op = failing(1, orig=ValueError)
    with pytest.raises(OperationalError):
        queue._write(op, rerun=True)
    assert queue._write(op, rerun=True) == "run-2"  # the op's second run: the first was alone
    runs = 0

    def refused(conn: Connection) -> None:
        nonlocal runs
        runs += 1
        raise KeyError("not a conflict")

    with pytest.raises(KeyError):
        asyncio.run(queue._write_async(refused, rerun=True))
    assert runs == 1


def test_rerunnable_ops_run_again_others_run_once(make_coordinator: MakeCoordinator) -> None:
    """Submits, claims and heartbeats (`JobQueue._write`): a `Rerunnable` op is run again
    after a deadlock; another (a claim with credit priority, whose window in memory must
    not count twice) is run once and its deadlock raised."""
    queue = make_coordinator().core.queue
    done = queue._write(Rerunnable(failing(CONFLICT_RETRIES - 1)), "a claim")
    assert done == f"run-{CONFLICT_RETRIES}"
    done = asyncio.run(queue._write_async(Rerunnable(failing(1)), "a submission"))
    assert done == "run-2"
    with pytest.raises(OperationalError):
        queue._write(failing(1), "a claim")
    with pytest.raises(OperationalError):
        asyncio.run(queue._write_async(failing(1), "a claim"))
    assert app_names(queue) == sorted([f"run-{CONFLICT_RETRIES}", "run-2"])


def test_a_write_keeps_neither_its_op_nor_new_attempts(make_coordinator: MakeCoordinator) -> None:
    """Nothing outlives a write: its op (a submit's or claim's closure holds the job's
    spec and rows) is not remembered once answered, so a coordinator's memory does not
    grow with the jobs it served; the attempts are made once per name, not per write.
    (A writer thread holds the last op it took until it takes the next: the writer is
    closed before looking.)"""
    queue = make_coordinator().core.queue

    def op(conn: Connection) -> str:
        return "done"

    ref = weakref.ref(op)
    assert queue._write(Rerunnable(op), "a claim") == "done"
    assert asyncio.run(queue._write_async(Rerunnable(op), "a claim")) == "done"
    assert queue._write(op, "a claim", rerun=True) == "done"
    del op
    queue.writer.close()
    gc.collect()
    assert ref() is None
    assert _conflict_attempts("a claim") is _conflict_attempts("a claim")


def test_a_batch_submission_aborted_by_a_deadlock_runs_again(
    make_coordinator: MakeCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`submit_many`: an item PostgreSQL aborted is run again alone, and queued once."""
    coordinator = make_coordinator()
    queue = coordinator.core.queue
    owner_id = _owner_of(coordinator)
    real = queue._submit_op
    aborted: list[str] = []

    def submit_op(*args: Any, **kwargs: Any) -> Rerunnable[Any]:
        op = real(*args, **kwargs)
        assert isinstance(op, Rerunnable)

        def flaky(conn: Connection) -> Any:
            row = op(conn)  # its rows are written, then the statement is aborted
            if len(aborted) < 1:
                aborted.append(row.id)
                raise OperationalError("INSERT jobs …", {}, DeadlockDetected("deadlock"))
            return row

        return Rerunnable(flaky)

    monkeypatch.setattr(queue, "_submit_op", submit_op)
    specs = [JobSpec(app="echo", operation="echo", params={"n": n}) for n in range(3)]
    answers = queue.submit_many(owner_id, [(spec, None, {}) for spec in specs])
    assert all(not isinstance(a, Exception) for a in answers), answers
    assert aborted and aborted[0] in {a.id for a in answers if not isinstance(a, Exception)}
    with queue.read() as conn:
        queued = [store.by_id(conn, a.id) for a in answers if not isinstance(a, Exception)]
    assert [j.params if j else None for j in queued] == [{"n": 0}, {"n": 1}, {"n": 2}]


def _owner_of(coordinator: Any) -> str:
    job = coordinator.new_user().submit("echo", "echo")
    with coordinator.core.queue.read() as conn:
        row = store.by_id(conn, job.id)
    assert row is not None
    return str(row.owner_id)
