"""Group commit (csml.store.writer) on a real PostgreSQL server: concurrent threads and
coroutines, an op whose error aborts its savepoint (not the batch), a failing COMMIT,
and two writers (two coordinators) on the same rows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import resource
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from psycopg import pq
from sqlalchemy import Connection, Engine, insert, text
from sqlalchemy.exc import IntegrityError

from csml.store import writer as writer_module
from csml.store.db import make_engine
from csml.store.writer import CommitFailed, Writer, WriterCrashed
from tests.unit.test_writer import CHILDREN, ITEMS, Gate, add, commits, prepare, tags

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    prepare(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def writer(engine: Engine) -> Iterator[Writer]:
    """One lane, so that a `Gate` holding it makes the next ops one batch."""
    writer = Writer(engine, max_batch_seconds=10.0, lanes=1)
    yield writer
    writer.close()


@pytest.fixture
def lanes(engine: Engine) -> Iterator[Writer]:
    """The default on PostgreSQL: several writer threads, one connection each."""
    writer = Writer(engine)
    assert writer.lanes > 1
    yield writer
    writer.close()


@pytest.mark.parametrize("lane_count", [1, 4])
def test_threads_and_coroutines_share_commits(engine: Engine, lane_count: int) -> None:
    writer = Writer(engine, lanes=lane_count)
    assert engine.dialect.name == "postgresql"
    before = commits(engine)
    n_coroutines, n_threads, per = 150, 6, 30

    async def main() -> list[int]:
        return list(
            await asyncio.gather(*(writer.run_async(add(f"c{i}")) for i in range(n_coroutines)))
        )

    def thread_client(t: int) -> list[int]:
        return [writer.run(add(f"t{t}-{i}")) for i in range(per)]

    try:
        with ThreadPoolExecutor(n_threads) as pool:
            futures = [pool.submit(thread_client, t) for t in range(n_threads)]
            from_coroutines = asyncio.run(main())
            from_threads = [v for f in futures for v in f.result()]
    finally:
        writer.close()
    total = n_coroutines + n_threads * per
    assert sorted(from_coroutines + from_threads) == list(range(1, total + 1))
    assert len(tags(engine)) == total
    # One lane: while it commits, everything else queues, so batches are large. Four lanes
    # share the queue, and how many ops each batch catches depends on how the machine
    # schedules them (184 commits for 330 writes once at load 10): they must still share.
    assert commits(engine) - before < (total / 2 if lane_count == 1 else total * 0.8)


def test_an_error_aborts_only_its_savepoint(engine: Engine, writer: Writer) -> None:
    """On PostgreSQL an error aborts the whole transaction unless rolled back to a
    savepoint: the ops after it in the batch must still commit."""
    gate = Gate(writer)
    before = commits(engine)

    def duplicate(conn: Connection) -> None:
        conn.execute(insert(ITEMS).values(tag="a"))  # "a" is inserted earlier in the batch

    def bad_sql(conn: Connection) -> None:
        conn.execute(text("SELECT no_such_column FROM w_items"))

    with ThreadPoolExecutor(6) as pool:
        held = pool.submit(writer.run, gate.op(add("a")))
        assert gate.entered.wait(10)
        futures = []
        for op in (duplicate, bad_sql, add("b")):
            futures.append(pool.submit(writer.run, op))
            while writer.pending < len(futures):
                threading.Event().wait(0.002)
        gate.open_when_pending(3)
        assert held.result(10) == 1
        with pytest.raises(IntegrityError):
            futures[0].result(10)
        with pytest.raises(Exception, match="no_such_column"):
            futures[1].result(10)
        assert futures[2].result(10) == 2
    assert tags(engine) == {"a", "b"}
    assert commits(engine) - before == 1


def test_a_failing_commit_fails_the_batch_and_the_writer_goes_on(
    engine: Engine, writer: Writer
) -> None:
    gate = Gate(writer)

    def orphan(conn: Connection) -> None:
        conn.execute(insert(CHILDREN).values(id=1, parent_id=999))  # deferred: at COMMIT

    with ThreadPoolExecutor(3) as pool:
        held = pool.submit(writer.run, gate.op(add("x")))
        assert gate.entered.wait(10)
        bad = pool.submit(writer.run, orphan)
        gate.open_when_pending(1)
        for future in (held, bad):
            with pytest.raises(CommitFailed) as caught:
                future.result(10)
            assert isinstance(caught.value.__cause__, IntegrityError)
    assert tags(engine) == set()
    assert writer.run(add("y")) == 1
    assert tags(engine) == {"y"}


def test_two_writers_on_one_database(db_url: str, engine: Engine) -> None:
    """Two coordinators, each with its own writer, bump the same counter row."""
    other_engine = make_engine(db_url)
    first, second = Writer(engine), Writer(other_engine)
    try:

        def client(n: int) -> list[int]:
            writer = first if n % 2 else second
            return [writer.run(add(f"w{n}-{i}")) for i in range(25)]

        with ThreadPoolExecutor(8) as pool:
            values = [v for r in pool.map(client, range(8)) for v in r]
    finally:
        first.close()
        second.close()
        other_engine.dispose()
    assert sorted(values) == list(range(1, 201))
    assert len(tags(engine)) == 200


def test_lanes_commit_side_by_side(engine: Engine, lanes: Writer) -> None:
    """A lane waiting for the server (a lock another connection holds, as another
    coordinator's transaction may) does not stop the others: ops keep committing (the
    watchdog wakes a helper lane for what waits behind the held batch)."""

    def held_op(conn: Connection) -> int:
        conn.execute(text("SELECT pg_advisory_xact_lock(4242)"))
        return add("held")(conn)

    with engine.connect() as holder, ThreadPoolExecutor(4) as pool:
        holder.execute(text("SELECT pg_advisory_lock(4242)"))
        held = pool.submit(lanes.run, held_op)
        for _ in range(2000):  # until the held op waits for the lock
            waiting = holder.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            ).scalar_one()
            if waiting:
                break
            threading.Event().wait(0.005)
        assert waiting == 1
        assert [lanes.run(add(f"free{i}")) for i in range(20)] == list(range(1, 21))
        holder.execute(text("SELECT pg_advisory_unlock(4242)"))
        assert held.result(10) == 21  # it waited for the counter row the others updated
    assert len(tags(engine)) == 21


def test_ops_queued_behind_the_busy_lane_wait_for_it_and_share_its_commit(engine: Engine) -> None:
    """Lanes open on demand: ops queued while the primary lane is in a batch wait for it
    (here `help_after` never comes) and commit with that batch, though three lanes are
    idle; taking one idle lane each, they would commit one by one."""
    writer = Writer(engine, max_batch_seconds=10.0, lanes=4, help_after=60.0)
    gate = Gate(writer)
    before = commits(engine)
    try:
        with ThreadPoolExecutor(6) as pool:
            held = pool.submit(writer.run, gate.op(add("held")))
            assert gate.entered.wait(10)
            queued = [pool.submit(writer.run, add(f"q{i}")) for i in range(5)]
            gate.open_when_pending(5)
            assert held.result(10) == 1
            assert sorted(f.result(10) for f in queued) == [2, 3, 4, 5, 6]
    finally:
        writer.close()
    assert commits(engine) - before == 1


class Boom(BaseException):
    """Kills the lane it runs in."""


def test_a_crashed_lane_fails_its_batch_only(engine: Engine, lanes: Writer) -> None:
    def explode(conn: Connection) -> None:
        conn.execute(insert(ITEMS).values(tag="exploded"))
        raise Boom()

    with pytest.raises(WriterCrashed):
        lanes.run(explode)
    assert [lanes.run(add(f"after{i}")) for i in range(10)] == list(range(1, 11))
    assert tags(engine) == {f"after{i}" for i in range(10)}


def test_an_op_calling_the_writer_from_any_lane_fails_loudly(lanes: Writer) -> None:
    def nested(conn: Connection) -> int:
        return lanes.run(add("inner"))

    for _ in range(8):  # whichever lane takes it
        with pytest.raises(RuntimeError, match="inside a write operation"):
            lanes.run(nested)


@pytest.fixture
def high_descriptors() -> Iterator[None]:
    """Descriptors 3..~1100 taken, so that sockets opened meanwhile get numbers above
    `select`'s limit (FD_SETSIZE, 1024), as in a coordinator with many clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1400
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the descriptor limit ({hard}) is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    base = os.open(os.devnull, os.O_RDONLY)
    taken = [os.dup(base) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in [base, *taken]:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def _lane_waiting_for_lock(
    engine: Engine, writer: Writer, pool: ThreadPoolExecutor, key: int
) -> Iterator[Future[int]]:
    """A write op (adding one row) whose lane waits for the server: for advisory lock
    `key`, held here until the block ends. Yields the op's future once the lane waits."""

    def locked(conn: Connection) -> int:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        return add("locked")(conn)

    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        waiting = pool.submit(writer.run, locked)
        for _ in range(2000):  # until the lane waits for the lock
            if holder.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar_one():
                break
            threading.Event().wait(0.005)
        try:
            yield waiting
        finally:
            holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            holder.commit()


def test_the_watchdog_tells_the_server_s_turn_from_the_lane_s(
    db_url: str, high_descriptors: None
) -> None:
    """The watchdog asks whether the primary lane waits for the server (then a helper
    lane may take what queues behind it) or for its own Python (then a helper would wait
    too) without touching the driver the lane's thread is using: a lane between
    statements of its transaction is the lane's turn, a lane waiting for a lock the
    server's; also when the connection's socket number is above `select`'s limit."""
    engine = make_engine(db_url)
    prepare(engine)
    writer = Writer(engine, max_batch_seconds=10.0, lanes=2, help_after=60.0)
    gate = Gate(writer)
    try:
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(writer.run, gate.op(add("held")))
            assert gate.entered.wait(10)
            lane = writer._primary_lane
            assert lane is not None and lane.conn is not None
            dbapi = lane.conn.connection.dbapi_connection
            assert dbapi is not None and dbapi.fileno() > 1024  # the lane waits in the gate
            assert writer._server_turn() is False  # idle in transaction: the lane's Python
            gate.release.set()
            assert held.result(10) == 1

            with _lane_waiting_for_lock(engine, writer, pool, 4343) as waiting:
                assert writer._server_turn() is True  # a statement the server holds
            assert waiting.result(10) == 2
    finally:
        writer.close()
        engine.dispose()


def _voluntary_switches(thread: threading.Thread) -> int:
    """A thread's voluntary context switches so far (each a wake-up after a wait)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux /proc")
def test_a_coroutine_s_op_behind_a_stalled_lane_gets_a_helper_from_the_loop_s_timer(
    engine: Engine,
) -> None:
    """An op a coroutine queues behind the primary lane's batch waiting for the server (a
    lock) is timed by the loop's own timer, not by waking the watchdog thread: once the
    batch has been open `help_after`, a helper lane takes it and it commits while the
    primary still waits; the watchdog never woke (its voluntary context switches did not
    move: it wakes at least once per stall when it times one)."""
    writer = Writer(engine, lanes=2, help_after=0.05)

    def locked(conn: Connection) -> int:
        conn.execute(text("SELECT pg_advisory_xact_lock(4344)"))
        return add("locked")(conn)

    try:
        assert writer.run(add("first")) == 1  # the lanes' and the watchdog's start
        watchdog = writer._watchdog
        assert watchdog is not None
        with engine.connect() as holder, ThreadPoolExecutor(1) as pool:
            holder.execute(text("SELECT pg_advisory_lock(4344)"))
            try:
                stuck = pool.submit(writer.run, locked)
                for _ in range(2000):  # until the primary lane waits for the lock
                    if holder.execute(
                        text("SELECT count(*) FROM pg_locks WHERE NOT granted")
                    ).scalar_one():
                        break
                    threading.Event().wait(0.005)
                woken = _voluntary_switches(watchdog)

                async def behind() -> int:
                    return await writer.run_async(add("behind"))

                assert asyncio.run(behind()) == 2  # by a helper lane: the primary waits on
                assert not stuck.done()
                assert _voluntary_switches(watchdog) == woken
            finally:
                holder.execute(text("SELECT pg_advisory_unlock(4344)"))
                holder.commit()
            assert stuck.result(10) == 3
    finally:
        writer.close()
    assert tags(engine) == {"first", "behind", "locked"}


@contextmanager
def traced(writer: Writer, path: Path) -> Iterator[list[str]]:
    """libpq's protocol trace of the primary lane's connection for the block: the
    messages the coordinator sent (their names: "Query", "Parse", "Sync"...), listed
    once the block ends. A round trip ends with a "Sync" (the extended protocol) or is
    one "Query" (the simple protocol)."""
    lane = writer._primary_lane
    assert lane is not None and lane.conn is not None
    pgconn = lane.conn.connection.dbapi_connection.pgconn  # type: ignore[union-attr]
    sent: list[str] = []
    with path.open("w") as out:
        pgconn.trace(out.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield sent
        finally:
            pgconn.untrace()
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[0] == "F":
            sent.append(fields[2].split(" ")[0])


def test_a_lone_write_costs_its_statements_and_one_round_trip_more(
    engine: Engine, writer: Writer, tmp_path: Path
) -> None:
    """A write transaction of one op on PostgreSQL: its statements and one round trip
    more, "COMMIT; BEGIN" (the next transaction begun with this one's COMMIT), not a
    BEGIN of its own before the first statement and a COMMIT after the last."""
    assert writer.run(add("warm")) == 1  # the lane and its connection exist
    with traced(writer, tmp_path / "trace") as sent:
        for i in range(3):
            assert writer.run(add(f"x{i}")) == i + 2  # two statements each
    trips = sent.count("Sync") + sent.count("Query")
    assert sent.count("Query") == 3  # one "COMMIT; BEGIN" per op, nothing else simple
    assert trips == 3 * (2 + 1)
    assert tags(engine) == {"warm", "x0", "x1", "x2"}


def test_the_next_transaction_begun_at_commit_sees_later_commits(
    engine: Engine, writer: Writer
) -> None:
    """A BEGIN sent with the previous COMMIT takes no snapshot: an op sees what other
    connections committed after that BEGIN (READ COMMITTED, a snapshot per statement)."""
    assert writer.run(add("first")) == 1
    with engine.begin() as other:  # another coordinator, after the lane's COMMIT; BEGIN
        other.execute(insert(ITEMS).values(tag="elsewhere"))

    def count(conn: Connection) -> int:
        return int(conn.execute(text("SELECT count(*) FROM w_items")).scalar_one())

    assert writer.run(count) == 2


def test_an_idle_lane_rolls_its_begun_transaction_back(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lane left with a begun, empty transaction after its COMMIT does not hold it
    open while idle: after `BEGUN_IDLE_SECONDS` its backend is idle, not "idle in
    transaction", and the lane's next op still commits."""
    monkeypatch.setattr(writer_module, "BEGUN_IDLE_SECONDS", 0.05)
    looked = threading.Event()

    class HeldIdleWait(queue.SimpleQueue):  # type: ignore[type-arg]
        """The writer's queue, whose begun lane's idle wait (`Writer._take`) starts only
        once the test has seen the begun transaction: a condition, not a time (under
        load a first look 50 ms late saw the lane "idle" already)."""

        def get(self, block: bool = True, timeout: float | None = None) -> object:
            if timeout == writer_module.BEGUN_IDLE_SECONDS:
                looked.wait()
            return super().get(block, timeout)

    writer = Writer(engine, lanes=1)
    writer._queue = HeldIdleWait()  # before any op: the lanes open on demand
    try:
        assert writer.run(add("a")) == 1
        lane = writer._primary_lane
        assert lane is not None and lane.conn is not None
        pid = lane.conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        with engine.connect() as watcher:

            def state() -> str:
                found = watcher.execute(
                    text("SELECT state FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
                ).scalar_one()
                watcher.rollback()
                return str(found)

            assert state() == "idle in transaction"  # begun with the COMMIT
            looked.set()  # the lane's idle wait starts now
            while state() != "idle":  # until it rolled the transaction back
                threading.Event().wait(0.005)
        assert writer.run(add("b")) == 2
    finally:
        looked.set()
        writer.close()
    assert tags(engine) == {"a", "b"}


def test_an_op_that_swallows_an_error_is_not_acknowledged(engine: Engine, writer: Writer) -> None:
    """An op that catches a database error itself leaves its transaction aborted (it
    should not: ops let errors out). PostgreSQL answers the COMMIT of an aborted
    transaction with a silent ROLLBACK; the writer must not report that as committed."""

    def swallowing(conn: Connection) -> str:
        conn.execute(insert(ITEMS).values(tag="lost"))
        with contextlib.suppress(Exception):
            conn.execute(text("SELECT no_such_column FROM w_items"))
        return "done"

    with pytest.raises(CommitFailed):
        writer.run(swallowing)
    assert tags(engine) == set()
    assert writer.run(add("after")) == 1


class _CountedQueue(queue.SimpleQueue[object]):
    """The writer's helper wake-ups, counted as they are put (a woken lane takes them)."""

    puts = 0

    def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
        self.puts += 1
        super().put(item, block, timeout)


def test_one_help_decision_for_the_watchdog_and_the_loop_timer(engine: Engine) -> None:
    """`Writer._look`, the step both timers take (`_watch`, `_loop_check`), at a batch of
    the primary lane open since `since` and due for help once open `after`: not due,
    look again then; due while the lane waits for its own Python (here: idle in its
    transaction, in a gate), look again once open twice as long and wake nobody; due
    while it waits for the server (a lock), wake one helper lane."""
    writer = Writer(engine, max_batch_seconds=10.0, lanes=2, help_after=60.0)
    helpers = writer._helpers = _CountedQueue()  # before the lanes start
    gate = Gate(writer)
    now = time.monotonic()
    try:
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(writer.run, gate.op(add("held")))
            assert gate.entered.wait(10)
            assert writer._look(now, 60.0) == 60.0
            assert writer._look(now - 61.0, 60.0) == 120.0  # the lane's turn
            assert helpers.puts == 0
            gate.release.set()
            assert held.result(10) == 1

            with _lane_waiting_for_lock(engine, writer, pool, 4345) as waiting:
                assert writer._look(now, 60.0) == 60.0  # not due: no look at the lane
                assert helpers.puts == 0
                assert writer._look(now - 61.0, 60.0) is None  # the server's turn: help
                assert helpers.puts == 1
            assert waiting.result(10) == 2
    finally:
        writer.close()
