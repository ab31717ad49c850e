"""Row lock order on PostgreSQL: statements that lock several running jobs lock them in
`seq` order, so a completion and a heartbeat of one worker's jobs (in two writer lanes
or two coordinators) never deadlock.

Each test holds the lower job's row on a connection of its own and starts the
statement over both jobs: ids listed highest first, and the higher row's newest version
before the lower one's in the heap and in the lease index, so a plan that locks rows in
the order it visits them takes the higher one first. Once the statement waits for a
lock, the test checks that it has not locked the higher job (a statement that locked
out of order would hold it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import column, func, select, table, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from csml.coordinator.state import Core
from csml.store import jobs_end, jobs_write
from csml.store.jobs import JOBS
from csml.store.tables import utcnow
from tests.integration.postgres.support import new_identity, new_worker, submit

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(120)]

Held = tuple[tuple[int, str, str], tuple[int, str, str]]  # (seq, id, lease id), low first


def two_running_jobs(core: Core) -> tuple[str, Held]:
    """A worker running two jobs; the lower one's row rewritten last (its newest
    version after the higher one's in the heap) and its lease ending later (after the
    higher one's in the lease index)."""
    owner, worker = new_identity(core), new_worker(core)
    for i in range(2):
        submit(core, owner, i=i)
    claimed = core.queue.claim(worker, 2)
    with core.engine.begin() as conn:
        rows = conn.execute(
            select(JOBS.c.seq, JOBS.c.id, JOBS.c.lease_id)
            .where(JOBS.c.id.in_([c.id for c in claimed]))
            .order_by(JOBS.c.seq)
        ).all()
        low, high = ((r.seq, r.id, r.lease_id) for r in rows)
        later = utcnow() + timedelta(hours=2)  # past the higher job's lease
        conn.execute(update(JOBS).where(JOBS.c.seq == low[0]).values(lease_expires_at=later))
    return worker.id, (low, high)


PG_LOCKS = table("pg_locks", column("granted"))


def not_granted(conn: Connection) -> int:
    """Lock requests waiting in the server."""
    waiting = select(func.count()).select_from(PG_LOCKS).where(PG_LOCKS.c.granted.is_(False))
    return int(conn.scalar(waiting) or 0)


def waits_behind_low_only(core: Core, low: int, high: int, op: Callable[[Connection], Any]) -> Any:
    """Run `op` (in the writer) while another transaction holds job `low`; once it waits,
    whether job `high` can be locked (it must: `op` locks `low` first). Returns op's result."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(core.writer.run(op))
        except BaseException as exc:
            errors.append(exc)

    with core.engine.connect() as holder, core.engine.connect() as probe:
        hold = holder.begin()
        holder.execute(select(JOBS.c.seq).where(JOBS.c.seq == low).with_for_update())
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 30
        while not_granted(probe) == 0:  # the writer's statement now waits for `low`
            assert thread.is_alive(), f"the statement did not wait: {errors}"
            assert time.monotonic() < deadline, "the statement never waited for the lock"
            probe.rollback()
            time.sleep(0.01)
        probe.rollback()
        try:
            with probe.begin():
                probe.execute(
                    select(JOBS.c.seq).where(JOBS.c.seq == high).with_for_update(nowait=True)
                )
        except OperationalError as exc:
            raise AssertionError("the higher job was locked before the lower one") from exc
        finally:
            hold.rollback()
            thread.join(30)
    if errors:
        raise errors[0]
    return result[0]


def test_completion_locks_jobs_in_seq_order(core: Core) -> None:
    _, ((low, low_id, _), (high, high_id, _)) = two_running_jobs(core)
    locked = waits_behind_low_only(
        core, low, high, lambda conn: jobs_end.lock_to_complete(conn, [high_id, low_id])
    )
    assert set(locked) == {low_id, high_id}


def test_lease_extension_locks_jobs_in_seq_order(core: Core) -> None:
    worker_id, ((low, low_id, low_lease), (high, high_id, high_lease)) = two_running_jobs(core)
    until = utcnow() + timedelta(hours=1)
    held = waits_behind_low_only(
        core,
        low,
        high,
        lambda conn: jobs_write.extend_leases(
            conn, worker_id, [(high_id, high_lease), (low_id, low_lease)], until
        ),
    )
    assert set(held) == {low_id, high_id}
