"""Group commit (csml.store.writer) on real SQLite files: results, isolation, batching,
failures of a whole batch, close, the reentrancy guard and a crashed writer thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from csml.store import writer as writer_module
from csml.store.db import counters, make_engine, sqlite_url
from csml.store.writer import CommitFailed, Rerunnable, Writer, WriterClosed, WriterCrashed

META = MetaData()
ITEMS = Table(
    "w_items",
    META,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tag", String(64), unique=True, nullable=False),
)
COUNTER = Table(
    "w_counter",
    META,
    Column("k", String(16), primary_key=True),
    Column("v", Integer, nullable=False),
)
PARENTS = Table("w_parents", META, Column("id", Integer, primary_key=True))
CHILDREN = Table(  # a deferred foreign key is checked at COMMIT: a real failing COMMIT
    "w_children",
    META,
    Column("id", Integer, primary_key=True),
    Column(
        "parent_id",
        Integer,
        ForeignKey("w_parents.id", deferrable=True, initially="DEFERRED"),
        nullable=False,
    ),
)


def prepare(engine: Engine) -> None:
    META.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(COUNTER).values(k="n", v=0))


def add(tag: str) -> Callable[[Connection], int]:
    """An op the size of a submit: insert a row, bump the counter, return both."""

    def op(conn: Connection) -> int:
        conn.execute(insert(ITEMS).values(tag=tag))
        return int(
            conn.execute(
                update(COUNTER)
                .where(COUNTER.c.k == "n")
                .values(v=COUNTER.c.v + 1)
                .returning(COUNTER.c.v)
            ).scalar_one()
        )

    return op


def tags(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(ITEMS.c.tag)))


def commits(engine: Engine) -> int:
    return counters(engine).write_commits


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(sqlite_url(tmp_path))
    prepare(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def writer(engine: Engine) -> Iterator[Writer]:
    writer = Writer(engine, max_batch_seconds=10.0)  # batches bounded by count only
    yield writer
    writer.close()


class Gate:
    """Holds the writer thread inside an op until the test has queued what it wants."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.entered = threading.Event()
        self.release = threading.Event()

    def op(self, then: Callable[[Connection], Any] | None = None) -> Callable[[Connection], Any]:
        def held(conn: Connection) -> Any:
            self.entered.set()
            assert self.release.wait(20)
            return then(conn) if then is not None else "gate"

        return held

    def open_when_pending(self, n: int) -> None:
        for _ in range(2000):
            if self.writer.pending >= n:
                break
            threading.Event().wait(0.005)
        assert self.writer.pending == n
        self.release.set()


def test_a_lone_op_commits_at_once_and_is_visible_on_return(engine: Engine, writer: Writer) -> None:
    before = commits(engine)
    assert writer.run(add("one")) == 1
    assert commits(engine) == before + 1
    assert tags(engine) == {"one"}  # another connection sees it: committed before return


def test_many_threads_each_get_their_own_result_and_share_commits(
    engine: Engine, writer: Writer
) -> None:
    before = commits(engine)
    threads, per_thread = 16, 40

    def client(t: int) -> list[int]:
        got = []
        for i in range(per_thread):
            got.append(writer.run(add(f"t{t}-{i}")))
            if i % 10 == 0:  # on return the row is committed: a fresh reader sees it
                assert f"t{t}-{i}" in tags(engine)
        return got

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(client, range(threads)))
    total = threads * per_thread
    flat = [v for r in results for v in r]
    assert sorted(flat) == list(range(1, total + 1))  # every counter value handed out once
    for r in results:
        assert r == sorted(r)  # a thread's own writes are ordered
    assert tags(engine) == {f"t{t}-{i}" for t in range(threads) for i in range(per_thread)}
    made = commits(engine) - before
    assert 1 <= made < total  # group commit under concurrency


def test_many_coroutines_and_threads_at_once(engine: Engine, writer: Writer) -> None:
    before = commits(engine)
    n_coroutines, n_threads, per = 200, 4, 50

    async def main() -> list[int]:
        loop_thread = threading.get_ident()

        async def one(i: int) -> int:
            value = await writer.run_async(add(f"c{i}"))
            assert threading.get_ident() == loop_thread
            return value

        return list(await asyncio.gather(*(one(i) for i in range(n_coroutines))))

    def thread_client(t: int) -> list[int]:
        return [writer.run(add(f"th{t}-{i}")) for i in range(per)]

    with ThreadPoolExecutor(n_threads) as pool:
        futures = [pool.submit(thread_client, t) for t in range(n_threads)]
        from_coroutines = asyncio.run(main())
        from_threads = [v for f in futures for v in f.result()]
    total = n_coroutines + n_threads * per
    assert sorted(from_coroutines + from_threads) == list(range(1, total + 1))
    assert len(tags(engine)) == total
    assert commits(engine) - before < total / 2


def test_a_failing_op_is_rolled_back_alone(engine: Engine, writer: Writer) -> None:
    gate = Gate(writer)
    before = commits(engine)

    def raises(conn: Connection) -> None:
        conn.execute(insert(ITEMS).values(tag="from-failing-op"))
        raise ValueError("refused by the op")

    def duplicate(conn: Connection) -> None:
        conn.execute(insert(ITEMS).values(tag="dup-by-op"))
        conn.execute(insert(ITEMS).values(tag="ok-1"))  # ok-1 is queued before: UNIQUE fails

    ops: list[Callable[[Connection], Any]] = [
        add("ok-0"),
        raises,
        add("ok-1"),
        duplicate,
        add("ok-2"),
    ]
    with ThreadPoolExecutor(len(ops) + 1) as pool:
        held = pool.submit(writer.run, gate.op())
        assert gate.entered.wait(10)
        futures = []
        for op in ops:  # queued in this order (each waits until the previous is queued)
            futures.append(pool.submit(writer.run, op))
            for _ in range(2000):
                if writer.pending == len(futures):
                    break
                threading.Event().wait(0.002)
        gate.open_when_pending(len(ops))
        assert held.result(10) == "gate"
        assert futures[0].result(10) == 1
        with pytest.raises(ValueError, match="refused by the op"):
            futures[1].result(10)
        assert futures[2].result(10) == 2
        with pytest.raises(IntegrityError):
            futures[3].result(10)
        assert futures[4].result(10) == 3
    assert tags(engine) == {"ok-0", "ok-1", "ok-2"}
    assert commits(engine) - before == 1  # the gate and all five ops: one transaction


def test_no_result_before_commit_even_for_a_failing_op(engine: Engine, writer: Writer) -> None:
    gate = Gate(writer)
    seen_on_error: list[set[str]] = []

    def fails(conn: Connection) -> None:
        conn.execute(insert(ITEMS).values(tag="never"))
        raise LookupError("nope")

    def caller() -> None:
        try:
            writer.run(fails)
        except LookupError:
            seen_on_error.append(tags(engine))  # what a fresh reader sees at that moment

    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(writer.run, gate.op(add("batch-mate")))
        assert gate.entered.wait(10)
        failing = pool.submit(caller)
        gate.open_when_pending(1)
        held.result(10)
        failing.result(10)
    # the refusal came back only once the batch it ran in (with its mate) had committed
    assert seen_on_error == [{"batch-mate"}]


def test_a_failing_first_op_is_rolled_back_and_the_rest_commit(
    engine: Engine, writer: Writer
) -> None:
    gate = Gate(writer)
    before = commits(engine)

    def then_fail(conn: Connection) -> None:
        conn.execute(insert(ITEMS).values(tag="first-fails"))
        raise ValueError("first op refused")

    with ThreadPoolExecutor(4) as pool:
        held = pool.submit(writer.run, gate.op(then_fail))  # first of its transaction
        assert gate.entered.wait(10)
        rest = [pool.submit(writer.run, add(f"r{i}")) for i in range(3)]
        gate.open_when_pending(3)
        with pytest.raises(ValueError, match="first op refused"):
            held.result(10)
        assert sorted(f.result(10) for f in rest) == [1, 2, 3]
    assert tags(engine) == {"r0", "r1", "r2"}
    assert commits(engine) - before == 1


def test_batches_are_bounded_by_count(engine: Engine) -> None:
    writer = Writer(engine, max_batch_ops=4, max_batch_seconds=10.0)
    gate = Gate(writer)
    before = commits(engine)
    try:
        with ThreadPoolExecutor(20) as pool:
            held = pool.submit(writer.run, gate.op())
            assert gate.entered.wait(10)
            futures = [pool.submit(writer.run, add(f"b{i}")) for i in range(19)]
            gate.open_when_pending(19)
            held.result(10)
            assert sorted(f.result(10) for f in futures) == list(range(1, 20))
    finally:
        writer.close()
    assert commits(engine) - before == 5  # 20 ops in batches of at most 4


def test_savepoints_are_counted_by_kind_too(engine: Engine) -> None:
    """A batch's savepoints count in the statements and by kind: the kinds (what /metrics
    sends as csml_store_statements_by_kind_total) sum to the statements."""
    writer = Writer(engine, max_batch_ops=8, max_batch_seconds=10.0)
    gate = Gate(writer)
    tally = counters(engine)
    statements, kinds = tally.statements, dict(tally.by_kind)
    try:
        with ThreadPoolExecutor(8) as pool:
            held = pool.submit(writer.run, gate.op())
            assert gate.entered.wait(10)
            futures = [pool.submit(writer.run, add(f"k{i}")) for i in range(4)]
            gate.open_when_pending(4)
            held.result(10)
            assert sorted(f.result(10) for f in futures) == [1, 2, 3, 4]
    finally:
        writer.close()
    grown = {k: v - kinds.get(k, 0) for k, v in tally.by_kind.items() if v != kinds.get(k, 0)}
    assert grown["SAVEPOINT"] >= 1 and grown["RELEASE"] >= 1, grown
    assert sum(grown.values()) == tally.statements - statements, grown


def test_a_failing_commit_fails_its_whole_batch_and_the_writer_goes_on(
    engine: Engine, writer: Writer
) -> None:
    gate = Gate(writer)

    def orphan(conn: Connection) -> str:
        conn.execute(insert(CHILDREN).values(id=1, parent_id=999))  # checked at COMMIT
        return "inserted"

    with ThreadPoolExecutor(4) as pool:
        held = pool.submit(writer.run, gate.op(add("before-orphan")))
        assert gate.entered.wait(10)
        good = pool.submit(writer.run, add("same-batch"))
        while writer.pending < 1:
            threading.Event().wait(0.002)
        bad = pool.submit(writer.run, orphan)
        gate.open_when_pending(2)
        for future in (held, good, bad):
            with pytest.raises(CommitFailed) as caught:
                future.result(10)
            assert caught.value.code == "store_unavailable"
            assert isinstance(caught.value.__cause__, IntegrityError)
    assert tags(engine) == set()  # none of the batch was kept
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(CHILDREN)) == 0
    assert writer.run(add("after")) == 1  # a fresh connection, the counter untouched
    assert tags(engine) == {"after"}


def test_close_runs_what_was_accepted_then_refuses(engine: Engine) -> None:
    before = set(threading.enumerate())  # other tests' writers are not this test's
    writer = Writer(engine, max_batch_ops=3)
    gate = Gate(writer)
    with ThreadPoolExecutor(12) as pool:
        held = pool.submit(writer.run, gate.op())
        assert gate.entered.wait(10)
        futures = [pool.submit(writer.run, add(f"k{i}")) for i in range(10)]
        while writer.pending < 10:
            threading.Event().wait(0.002)
        closer = pool.submit(writer.close)
        threading.Event().wait(0.05)
        assert not closer.done()  # waits for the accepted ops
        with pytest.raises(WriterClosed):
            writer.run(add("too-late"))
        gate.release.set()
        closer.result(10)
        assert held.result(10) == "gate"  # its pool thread may still be returning
        assert sorted(f.result(10) for f in futures) == list(range(1, 11))
    assert tags(engine) == {f"k{i}" for i in range(10)}
    with pytest.raises(WriterClosed) as caught:
        writer.run(add("after-close"))
    assert caught.value.code == "store_unavailable"
    with pytest.raises(WriterClosed):
        asyncio.run(writer.run_async(add("after-close-async")))
    writer.close()  # idempotent
    assert not any(
        t.name == "csml-writer" and t.is_alive() for t in set(threading.enumerate()) - before
    )


def test_sqlite_has_one_lane(engine: Engine) -> None:
    assert Writer(engine).lanes == 1
    with pytest.raises(ValueError, match="one write lock"):
        Writer(engine, lanes=2)


def test_close_of_an_unused_writer_starts_nothing(engine: Engine) -> None:
    names = {t.name for t in threading.enumerate()}
    writer = Writer(engine)
    writer.close()
    assert {t.name for t in threading.enumerate()} == names
    with pytest.raises(WriterClosed):
        writer.run(add("x"))


def test_an_op_calling_the_writer_fails_loudly(engine: Engine, writer: Writer) -> None:
    def nested(conn: Connection) -> int:
        conn.execute(insert(ITEMS).values(tag="outer"))
        return writer.run(add("inner"))

    with pytest.raises(RuntimeError, match="inside a write operation"):
        writer.run(nested)

    def nested_async(conn: Connection) -> int:
        return asyncio.run(writer.run_async(add("inner-async")))

    with pytest.raises(RuntimeError, match="inside a write operation"):
        writer.run(nested_async)

    def closes(conn: Connection) -> None:
        writer.close()

    with pytest.raises(RuntimeError, match="inside a write operation"):
        writer.run(closes)
    assert tags(engine) == set()  # the outer op raised: its row was rolled back
    assert writer.run(add("still-works")) == 1


class Boom(BaseException):
    """Not an Exception: escapes the per-op isolation and kills the writer thread."""


def test_a_crashed_writer_thread_fails_its_callers_and_a_new_one_starts(
    engine: Engine, writer: Writer
) -> None:
    gate = Gate(writer)

    def explode(conn: Connection) -> None:
        conn.execute(insert(ITEMS).values(tag="exploded"))
        raise Boom()

    async def queued_coroutine() -> int:
        return await writer.run_async(add("queued-coroutine"))

    with ThreadPoolExecutor(6) as pool:
        held = pool.submit(writer.run, gate.op(explode))
        assert gate.entered.wait(10)
        queued = [pool.submit(writer.run, add(f"q{i}")) for i in range(3)]
        in_loop = pool.submit(asyncio.run, queued_coroutine())
        gate.open_when_pending(4)
        for future in (held, *queued, in_loop):
            with pytest.raises(WriterCrashed):
                future.result(10)
    assert tags(engine) == set()
    assert writer.run(add("after-crash")) == 1  # a fresh thread and connection
    assert tags(engine) == {"after-crash"}


def test_a_cancelled_coroutine_does_not_cancel_its_write(engine: Engine, writer: Writer) -> None:
    gate = Gate(writer)

    async def main() -> None:
        task = asyncio.create_task(writer.run_async(add("cancelled-caller")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.release.set()
        assert await writer.run_async(add("next")) == 2

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(writer.run, gate.op())
        assert gate.entered.wait(10)
        asyncio.run(main())
        held.result(10)
    assert tags(engine) == {"cancelled-caller", "next"}


def test_savepoints_on_pysqlite_keep_the_transaction_open(tmp_path: Path, engine: Engine) -> None:
    """pysqlite with isolation_level None (csml.store.db): SAVEPOINT, ROLLBACK TO and
    RELEASE run as sent, inside the BEGIN IMMEDIATE transaction, which stays open."""
    engine = make_engine(sqlite_url(tmp_path))  # a second engine: its connections are new
    sent: list[str] = []

    @event.listens_for(engine, "connect")
    def _trace(dbapi: Any, _record: Any) -> None:  # what SQLite itself runs
        dbapi.set_trace_callback(
            lambda sql: sent.append(sql.split("(")[0].split(" INTO")[0].split(" SET")[0].strip())
        )

    writer = Writer(engine, max_batch_seconds=10.0)
    gate = Gate(writer)
    still_open: list[bool] = []

    def after_rollback_to(conn: Connection) -> int:
        dbapi = conn.connection.dbapi_connection
        assert isinstance(dbapi, sqlite3.Connection)
        still_open.append(dbapi.in_transaction)
        return add("third")(conn)

    try:
        with ThreadPoolExecutor(4) as pool:
            held = pool.submit(writer.run, gate.op(add("first")))
            assert gate.entered.wait(10)
            ops: list[Callable[[Connection], Any]] = [
                add("second"),
                lambda conn: 1 // 0,
                after_rollback_to,
            ]
            futures = []
            for op in ops:
                futures.append(pool.submit(writer.run, op))
                while writer.pending < len(futures):
                    threading.Event().wait(0.002)
            gate.open_when_pending(3)
            assert held.result(10) == 1
            assert futures[0].result(10) == 2
            with pytest.raises(ZeroDivisionError):
                futures[1].result(10)
            assert futures[2].result(10) == 3
        assert writer.run(add("alone")) == 4
    finally:
        writer.close()
    engine.dispose()
    assert still_open == [True]
    one_op = ["INSERT", "UPDATE w_counter"]
    assert [q for q in sent if not q.startswith("PRAGMA")] == [
        "BEGIN IMMEDIATE",
        *one_op,  # the first op: no savepoint
        "SAVEPOINT csml_op",
        *one_op,
        "RELEASE SAVEPOINT csml_op",  # released when the next op sets its own
        "SAVEPOINT csml_op",
        "ROLLBACK TO SAVEPOINT csml_op",  # 1 // 0
        "RELEASE SAVEPOINT csml_op",
        "SAVEPOINT csml_op",
        *one_op,
        "COMMIT",  # releases the last savepoint
        "BEGIN IMMEDIATE",
        *one_op,  # a lone op: BEGIN, its statements, COMMIT
        "COMMIT",
    ]
    assert tags(engine) == {"first", "second", "third", "alone"}


def test_run_many_keeps_order_isolates_failures_and_shares_a_commit(engine: Engine) -> None:
    writer = Writer(engine)
    try:
        writer.run(add("warm"))  # the thread and its connection exist
        before = commits(engine)

        def refuse(conn: Connection) -> int:
            add("refused")(conn)
            raise ValueError("no")

        answers = writer.run_many([add("m0"), add("m1"), refuse, add("m2")])
        assert answers[:2] == [2, 3] and answers[3] == 4  # in order, each after the last
        assert isinstance(answers[2], ValueError)
        assert commits(engine) - before <= 2  # the thread may start on the first alone
        assert tags(engine) == {"warm", "m0", "m1", "m2"}
    finally:
        writer.close()


# -- bare (rerunnable) operations -----------------------------------------------------


class Runs:
    """Counts how many times each op ran (a rerunnable op may run again)."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}

    def add(self, tag: str) -> Callable[[Connection], int]:
        inner = add(tag)

        def op(conn: Connection) -> int:
            self.count[tag] = self.count.get(tag, 0) + 1
            return inner(conn)

        return op

    def fail(self, tag: str) -> Callable[[Connection], int]:
        def op(conn: Connection) -> int:
            self.count[tag] = self.count.get(tag, 0) + 1
            conn.execute(insert(ITEMS).values(tag=tag))  # written, then refused
            raise ValueError(f"{tag} refused")

        return op


def grown_kinds(engine: Engine, kinds: dict[str, int]) -> dict[str, int]:
    tally = counters(engine)
    return {k: v - kinds.get(k, 0) for k, v in tally.by_kind.items() if v != kinds.get(k, 0)}


def queue_behind_gate(
    writer: Writer,
    ops: list[tuple[Callable[[Connection], Any], bool]],
    then: Callable[[Connection], Any] | None = None,
) -> tuple[Any, list[Any]]:
    """Queue (op, rerunnable) pairs in order behind a held gate op (itself rerunnable, so
    the whole batch may run bare; it runs `then` once opened), release it; the futures
    of the gate and of `ops`."""
    gate = Gate(writer)
    pool = ThreadPoolExecutor(len(ops) + 1)
    held = pool.submit(writer.run, Rerunnable(gate.op(then)))
    assert gate.entered.wait(10)
    futures = []
    for op, rerunnable in ops:
        futures.append(pool.submit(writer.run, Rerunnable(op) if rerunnable else op))
        for _ in range(2000):
            if writer.pending == len(futures):
                break
            threading.Event().wait(0.002)
    gate.open_when_pending(len(ops))
    pool.shutdown(wait=False)
    return held, futures


def test_rerunnable_ops_share_a_transaction_without_savepoints(engine: Engine) -> None:
    writer = Writer(engine, max_batch_seconds=10.0)
    runs = Runs()
    kinds = dict(counters(engine).by_kind)
    before = commits(engine)
    try:
        held, futures = queue_behind_gate(writer, [(runs.add(f"s{i}"), True) for i in range(4)])
        assert held.result(10) == "gate"
        assert [f.result(10) for f in futures] == [1, 2, 3, 4]
    finally:
        writer.close()
    grown = grown_kinds(engine, kinds)
    assert "SAVEPOINT" not in grown and "RELEASE" not in grown, grown
    assert commits(engine) - before == 1
    assert runs.count == {f"s{i}": 1 for i in range(4)}


def test_a_failing_bare_op_is_rolled_back_alone_by_a_careful_repeat(engine: Engine) -> None:
    """The batch of `test_a_failing_op_is_rolled_back_alone`, every op rerunnable: the
    same answers and rows; the ops up to the failing one ran twice, the rest once; the
    lane's next batch is careful (savepoints), and the one after a clean batch bare."""
    writer = Writer(engine, max_batch_seconds=10.0)
    runs = Runs()
    before = commits(engine)
    try:
        ops = [runs.add("ok-0"), runs.fail("bad"), runs.add("ok-1"), runs.add("ok-2")]
        held, futures = queue_behind_gate(writer, [(op, True) for op in ops])
        assert held.result(10) == "gate"
        assert futures[0].result(10) == 1
        with pytest.raises(ValueError, match="bad refused"):
            futures[1].result(10)
        assert [futures[2].result(10), futures[3].result(10)] == [2, 3]
        assert tags(engine) == {"ok-0", "ok-1", "ok-2"}
        assert commits(engine) - before == 1
        assert runs.count == {"ok-0": 2, "bad": 2, "ok-1": 1, "ok-2": 1}

        kinds = dict(counters(engine).by_kind)
        held, futures = queue_behind_gate(writer, [(runs.add("c0"), True), (runs.add("c1"), True)])
        assert [f.result(10) for f in futures] == [4, 5]
        assert grown_kinds(engine, kinds).get("SAVEPOINT") == 2  # careful: after a failure

        kinds = dict(counters(engine).by_kind)
        held, futures = queue_behind_gate(writer, [(runs.add("b0"), True), (runs.add("b1"), True)])
        assert [f.result(10) for f in futures] == [6, 7]
        assert "SAVEPOINT" not in grown_kinds(engine, kinds)  # a clean batch before: bare
    finally:
        writer.close()


def test_an_op_not_rerunnable_runs_once_and_is_kept_when_a_later_op_fails(
    engine: Engine,
) -> None:
    """A bare prefix, an op that must run once, then a failing rerunnable op: only the
    bare prefix runs again; the once-only op keeps its single run and its row."""
    writer = Writer(engine, max_batch_seconds=10.0)
    runs = Runs()
    kinds = dict(counters(engine).by_kind)
    try:
        ops = [
            (runs.add("bare-0"), True),
            (runs.add("once"), False),
            (runs.fail("late"), True),
            (runs.add("after"), True),
        ]
        held, futures = queue_behind_gate(writer, ops)
        assert held.result(10) == "gate"
        assert [futures[0].result(10), futures[1].result(10)] == [1, 2]
        with pytest.raises(ValueError, match="late refused"):
            futures[2].result(10)
        assert futures[3].result(10) == 3
    finally:
        writer.close()
    assert runs.count == {"bare-0": 1, "once": 1, "late": 1, "after": 1}
    assert tags(engine) == {"bare-0", "once", "after"}
    # `once` and every op after it in its transaction had a savepoint.
    assert grown_kinds(engine, kinds).get("SAVEPOINT") == 3


def test_a_failing_first_op_then_a_failing_bare_op(engine: Engine) -> None:
    """The first op of the repeat fails again: it is rolled back alone, the others of
    the undone prefix commit."""
    writer = Writer(engine, max_batch_seconds=10.0)
    runs = Runs()
    try:
        ops = [(runs.add("p0"), True), (runs.fail("f1"), True), (runs.add("p2"), True)]
        held, futures = queue_behind_gate(writer, ops, then=runs.fail("first"))
        with pytest.raises(ValueError, match="first refused"):
            held.result(10)
        assert futures[0].result(10) == 1
        with pytest.raises(ValueError, match="f1 refused"):
            futures[1].result(10)
        assert futures[2].result(10) == 2
    finally:
        writer.close()
    assert tags(engine) == {"p0", "p2"}


def test_an_op_with_a_follower_holds_its_batch_for_the_next_op(
    engine: Engine, writer: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`queue_async(op, follower=True)`: the batch does not commit when the queue is
    empty after the op; it waits (up to `FOLLOWER_WAIT_SECONDS`, lengthened here so the
    test does not depend on the machine's speed) for the op queued next, and both commit
    together. Without a follower a lone op commits at once (the test above)."""
    monkeypatch.setattr(writer_module, "FOLLOWER_WAIT_SECONDS", 30.0)

    async def run() -> None:
        ran = threading.Event()

        def first(conn: Connection) -> int:
            value = add("first")(conn)
            ran.set()
            return value

        before = commits(engine)
        head = writer.queue_async(first, follower=True)
        await asyncio.to_thread(ran.wait, 20)  # it ran, and its batch waits for company
        assert not head.done()
        assert await writer.run_async(add("second")) == 2
        assert await head == 1
        assert commits(engine) == before + 1

    asyncio.run(run())
