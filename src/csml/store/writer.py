"""The writer: every write of the hot path goes through one `Writer`, by group commit.

A write is an operation `op(conn) -> T` over a SQLAlchemy Core `Connection` that is
already inside a write transaction. `Writer.run(op)` (from any thread) and
`await Writer.run_async(op)` (from the event loop, without a thread-pool hop)
return `op`'s result only after the transaction that holds it has committed, so a
caller that answers 2xx after `run` returns never acknowledges a row that is not
on disk. If `op` raises, nothing it wrote is kept and the caller gets the error.

Operations must be short, touch only the store (no network, no file I/O that can
block for long), return plain values (not a `Result` to read later), must not
commit or roll back the connection themselves, and must not call the writer (that
raises `RuntimeError` instead of deadlocking). Whatever should happen once a write is
durable (wake a long-poll, notify another coordinator, answer the client) the caller
does after `run` returns: there is no callback inside the writer.

How (group commit): a writer thread owns a write connection (on SQLite a connection
whose transactions begin with BEGIN IMMEDIATE, see `csml.store.db`). Callers put
their operation on a queue and wait on a future. The thread takes the first pending
operation, BEGINs, and runs it and every operation that is pending by the time it is
done, each after the first inside its own SAVEPOINT (sent on the DB-API cursor; the
first needs none: if it fails, the transaction holds nothing else and is rolled back
whole, and the next operation BEGINs afresh) unless it may run bare (below), until the
queue is empty or the batch
reaches `max_batch_ops` operations or `max_batch_seconds` of the writer thread's CPU
time (work, not wall time: on a busy machine a starved thread would otherwise cut
its batches short and pay one fsync per few operations); then it COMMITs once (one
fsync on SQLite in WAL with synchronous=FULL; one WAL flush on PostgreSQL) and
resolves every caller: threads through a `concurrent.futures.Future`, coroutines
through an asyncio future settled with one `call_soon_threadsafe` per event loop per
batch. There is no waiting for company: a lone operation commits at once, and while
one COMMIT runs the next batch gathers in the queue by itself. The one exception: an op
queued with `follower=True` (`queue_async`: its caller woke someone whose op comes next,
a claim for the job it submits) holds its batch open up to `FOLLOWER_WAIT_SECONDS` when
it is the last op run and the queue is empty, so that the next op shares its COMMIT.

Round trips (PostgreSQL): the lane's connection is in the driver's autocommit and the
lane sends its transaction control itself (`_Explicit`): a batch's COMMIT goes out as
"COMMIT; BEGIN" (one simple query, one round trip), which also begins the lane's next
transaction, so a batch costs its statements plus that one round trip, not psycopg's
BEGIN before the first statement plus a COMMIT (a lone two-statement write: 3 round
trips, not 4; `tests/integration/postgres/test_writer_pg.py` counts them in libpq's
protocol trace). A BEGIN takes no snapshot and no lock (READ COMMITTED: a snapshot
per statement) and the store's timestamps are the coordinator's, not the server's
`now()`, so a transaction begun early behaves as one begun at its first statement; a
lane that then waits `BEGUN_IDLE_SECONDS` for work rolls it back (one round trip, idle),
so an idle coordinator holds no transaction open. Operations must not NOTIFY (the
relay does, on its own connection, `csml.store.relay`): PostgreSQL before 15 may signal
the listeners only once the notifying backend is idle outside a transaction, which a
lane is not while busy. The answer to "COMMIT; BEGIN" is read
to its end before anything is delivered; a transaction PostgreSQL has aborted (an op
that swallowed its own error) is never sent a COMMIT, which the server would answer
with a silent ROLLBACK: its batch fails with `CommitFailed`.

Bare operations: a caller may mark an operation `Rerunnable(op)` (it has no effect outside
its transaction that running it again would change: no file written, no memory a second
run would count twice). While every operation of the open transaction so far is
rerunnable, a rerunnable one runs without a savepoint (the SAVEPOINT and RELEASE are
most of a group commit's extra statements). If such a bare operation fails, the writer
rolls the whole transaction back (undoing it and the ones before it, none of them
answered yet), BEGINs again and runs that prefix again, this time the careful way (a
savepoint for each after the first), the failing operation included; what that second
run decides is what its caller gets, and the rest of the batch goes on carefully. The
lane's next batch is careful too, until one has no failing operation (a stream of
refusals costs each batch at most one repeat). An operation that is not rerunnable
always runs either first or in its own savepoint, once, and every operation after it in
its transaction gets a savepoint, so it is never rolled back for another's failure.

Lanes: SQLite has one write lock, so it gets exactly one writer thread. On PostgreSQL
every statement is a network round trip and one connection could make the writer
round-trip bound (or hold everything behind an op waiting for another coordinator's
row lock), so there are `lanes` threads (default `PG_LANES`), each with its own
connection, and they open on demand: the first (primary) lane takes every batch, and
an op queued while it is in a batch waits for it (it joins that batch, or the next)
unless that batch has been open `help_after` seconds (`HELP_AFTER_SECONDS`) and waits
for the server (a statement or COMMIT in progress: a lock wait, a slow disk): then a
watchdog thread wakes an idle helper lane, which takes what waits, and so on while the
stall lasts. What an event loop queues (`run_async`, `queue_async`) is timed by a timer
of that loop instead (since session 17; `_check_on`, at most one pending, looking again
while ops are queued): the watchdog thread is woken only for ops queued from other
threads, not once per busy batch of the hot path (with 4 coordinators that was 1.2-2.2
of the ~11 context switches per job). Both timers decide by one step (`_look`). A
lane slow in its own Python (a busy machine's CPU, the GIL) gets no helper, which would
wait for the same: it is looked at again once its batch has been open twice as long.
Ops that each found an idle lane committed alone (four lanes, a coordinator sharing the
load with others: about one COMMIT per op); waiting for the busy lane makes group commit
work as on SQLite (`bench/coordinators.py`, load 13-16: 0.95 -> 0.25 write commits per
job with one coordinator, 1.9 -> 0.6 with two). The lanes' transactions are independent,
like those of several coordinators: an op may wait for a row another lane's open batch
has locked (at most that batch's length), and may fail alone with PostgreSQL's deadlock
or serialization error (its savepoint is rolled back, releasing what it locked). So ops
that lock several rows of a table lock them in one order (jobs by `seq`: a completion's
lock and a heartbeat's lease extension, see `csml.store.jobs_end`), and write no row
they need not (a deadlock waits for PostgreSQL's check, a second, with every op queued
behind either row). A batch is not held open for company: it is open as long as its lane
runs its operations, which on a busy machine is mostly the lane's turn for the GIL and a
CPU between statements (`bench/coordinators.py` samples it).

Invariants:
- No result, and no error, is delivered before the COMMIT of its batch has returned.
  An operation that raised is rolled back alone (to its savepoint; a bare one by the
  repeat above); the others of its batch commit; its caller gets its exception (after
  the COMMIT, so a refusal is never seen before the state it was decided on is durable:
  a bare operation's refusal is the one its careful repeat decided).
- A rerunnable operation may run more than once (only its last run's result and writes
  count); any other runs exactly once.
- If BEGIN or COMMIT fails, or an operation leaves the transaction unusable (a lost
  connection; SQLite rolling the whole transaction back on SQLITE_FULL or IOERR),
  every operation of the batch fails with `CommitFailed` (an `Unavailable` refusal,
  code `store_unavailable`: 503) and none is acknowledged; the writer throws the
  connection away and the next batch opens a fresh one.
- On one lane (SQLite), operations run one at a time in the order they were queued,
  each seeing the writes of those before it in its batch (serial execution). An
  operation whose caller waits for it always runs after that caller's earlier ones
  committed, on any number of lanes.
- `close()` accepts nothing more (`WriterClosed`), runs everything already accepted,
  then stops the threads. If a thread dies of something unexpected (an operation
  raising a BaseException such as SystemExit, a bug here), every operation it held
  fails with `WriterCrashed` and, if it was the last thread, every queued one too, so
  no caller hangs; the next `run` starts fresh threads.
- A caller that stops waiting (a cancelled coroutine, an interrupted thread) does not
  cancel its operation: once accepted it runs, and commits or not like the others.

Crash analysis (SIGKILL or power loss of the coordinator at each point; durability is
that of the database: SQLite WAL with synchronous=FULL, PostgreSQL with fsync on):
1. Before BEGIN (operations queued, or the thread idle): the queue is in memory and
   lost, but none of its callers has been answered (a reply needs `run` to return,
   which needs a COMMIT after the operation was queued), so nothing acknowledged is
   lost; clients see a broken connection and retry. (A PostgreSQL lane may hold a
   transaction begun by its last COMMIT: empty, PostgreSQL aborts it.)
2. Mid-batch (after BEGIN, some operations run): the transaction never committed.
   SQLite's WAL holds no commit frame for it (readers and recovery ignore frames
   without one); PostgreSQL aborts it. Nothing of the batch survives, and nothing of
   it was acknowledged: results are delivered only after COMMIT.
3. During COMMIT: the transaction is either durable (the commit record reached disk
   before the kill: the fsync, or PostgreSQL's WAL flush, completed) or absent, never
   half there (atomic commit). Either way no caller was answered yet: the outcome of
   a possibly-durable batch is unknown to its callers, as with any database that dies
   after the commit record is written and before the reply; clients retry with their
   own request ids where that matters. The same holds when "COMMIT; BEGIN" (PostgreSQL)
   fails after its COMMIT took effect (the connection lost before the answer): the
   batch is reported `CommitFailed`, its outcome unknown, never acknowledged.
4. After COMMIT, before or while the replies go out: the batch is durable; some
   callers may not have been answered. Rows may exist that nobody acknowledged, never
   the reverse.
Hence: every acknowledged write was committed by a COMMIT that returned before the
acknowledgement, and a returned COMMIT is on disk. `tests/integration/
test_writer_durability.py` checks it by SIGKILLing a process mid-stream.

The writer holds one connection of the engine's pool per lane for its life (opened by
each lane's first batch). It is not fork-safe: make it after forking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar, cast

from sqlalchemy.engine import Connection, Engine, RootTransaction

from csml.refusals import Unavailable
from csml.store.db import WRITE_OPTION, StoreCounters, counters, statement_kind

log = logging.getLogger("csml.store")

T = TypeVar("T")
WriteOp = Callable[[Connection], T]

MAX_BATCH_OPS = 256
PG_LANES = 4  # writer threads (connections) on PostgreSQL; SQLite has one write lock: 1
HELP_AFTER_SECONDS = 0.05  # PostgreSQL: a batch open this long with ops waiting gets help
MAX_BATCH_SECONDS = 0.005  # of the writer thread's CPU in one transaction, then it commits
FOLLOWER_WAIT_SECONDS = 0.001  # a batch holding an op with a follower waits this for it
BEGUN_IDLE_SECONDS = 1.0  # PostgreSQL: a lane idle this long rolls its begun transaction back


class CommitFailed(Unavailable):
    """The batch holding this write did not commit (BEGIN, COMMIT or the connection
    failed): nothing of it was acknowledged. `__cause__` is the database's error."""

    def __init__(self, why: str) -> None:
        super().__init__(
            "store_unavailable", f"the store could not commit this write ({why}); retry"
        )


class WriterClosed(Unavailable):
    """The writer was closed (the coordinator is stopping): the write was not accepted."""

    def __init__(self) -> None:
        super().__init__("store_unavailable", "the store is shutting down; retry")


class WriterCrashed(Unavailable):
    """The writer thread died while it held this write: its outcome is unknown."""

    def __init__(self) -> None:
        super().__init__("store_unavailable", "the store's writer stopped unexpectedly; retry")


class Rerunnable(Generic[T]):
    """`op`, marked as safe to run more than once: it has no effect outside its
    transaction that a repeat would change, so the writer may run it without a savepoint
    (see the module docstring). Pass it wherever a `WriteOp` goes."""

    __slots__ = ("op",)

    def __init__(self, op: WriteOp[T]) -> None:
        self.op = op

    def __call__(self, conn: Connection) -> T:
        return self.op(conn)


class _BatchBroken(Exception):
    """An operation left the transaction unusable: the whole batch is lost."""


class _Op:
    """One accepted operation and how to answer its caller."""

    __slots__ = ("error", "follower", "loop", "op", "rerunnable", "sent", "value", "waiter")

    def __init__(
        self,
        op: WriteOp[Any],
        waiter: Future[Any] | asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop | None,
        follower: bool = False,
    ) -> None:
        self.op = op
        self.follower = follower  # another op is expected right behind it (`queue_async`)
        self.waiter = waiter
        self.loop = loop  # None: a thread waits on a concurrent.futures.Future
        self.rerunnable = isinstance(op, Rerunnable)  # may run bare (module docstring)
        self.value: Any = None
        self.error: BaseException | None = None
        self.sent = False


_STOP = object()  # queued by close(): everything before it runs, then the thread ends


class Writer:
    """Runs write operations durably against one engine (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_ops: int = MAX_BATCH_OPS,
        max_batch_seconds: float = MAX_BATCH_SECONDS,
        lanes: int | None = None,
        help_after: float = HELP_AFTER_SECONDS,
    ) -> None:
        """`lanes` (PostgreSQL): writer threads, opened on demand; `help_after`: how long a
        batch of the primary lane may hold up queued ops before a helper lane takes them."""
        if max_batch_ops < 1:
            raise ValueError("max_batch_ops must be at least 1")
        sqlite = engine.dialect.name == "sqlite"
        lanes = (1 if sqlite else PG_LANES) if lanes is None else lanes
        if lanes < 1 or (sqlite and lanes != 1):
            raise ValueError("lanes must be at least 1, and 1 on SQLite (one write lock)")
        self.engine = engine
        self.max_batch_ops = max_batch_ops
        self.max_batch_seconds = max_batch_seconds
        self.lanes = lanes
        self.help_after = help_after
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _closed, _threads and enqueueing
        self._closed = False
        self._threads: set[threading.Thread] = set()
        self._idents: set[int] = set()  # the writer threads', for the reentrancy guard
        self._tally = counters(engine)
        # Lanes on demand (PostgreSQL, see the module docstring): the primary lane takes
        # from `_queue`; a helper lane waits for a token in `_helpers` (one per wake-up,
        # put there by the watchdog thread when `_stalled` says ops queued behind a batch
        # of the primary's that is open since `_busy_since`).
        self._primary: threading.Thread | None = None
        self._primary_lane: _Lane | None = None
        self._busy_since: float | None = None
        self._helpers: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stalled = threading.Event()
        self._closing = threading.Event()  # ends the watchdog's wait
        self._watchdog: threading.Thread | None = None
        # The loop's own look at what queues behind the primary lane (`_check_on`): its
        # timer, the batch it last timed and how long it then waits, and the batch it
        # confirmed a stall of (touched on that loop only; the lanes read them, a hint).
        self._check_loop: asyncio.AbstractEventLoop | None = None
        self._check_timer: asyncio.TimerHandle | None = None
        self._check_since: float | None = None
        self._check_after = help_after
        self._helped_since: float | None = None

    # -- callers ---------------------------------------------------------------------

    def run(self, op: WriteOp[T]) -> T:
        """Run `op` in a write transaction; return its result once committed."""
        waiter: Future[Any] = Future()
        self._accept(_Op(op, waiter, None))
        return cast(T, waiter.result())

    def run_many(self, ops: Sequence[WriteOp[T]]) -> list[T | Exception]:
        """Run `ops` as if each were `run`, but queued together, in order, so that they
        share a batch (one COMMIT when they fit in one); each answer, in `ops`' order, is
        its result or the `Exception` it raised (rolled back alone). Returns once every
        op's batch has committed."""
        waiters: list[Future[Any]] = []
        self._refuse_inside("run_many")
        for op in ops:
            waiter: Future[Any] = Future()
            self._accept(_Op(op, waiter, None))
            waiters.append(waiter)
        answers: list[T | Exception] = []
        for waiter in waiters:
            try:
                answers.append(cast(T, waiter.result()))
            except Exception as exc:
                answers.append(exc)
        return answers

    async def run_async(self, op: WriteOp[T]) -> T:
        """`run` for coroutines: the event loop keeps serving while `op` commits."""
        return await self.queue_async(op)

    def queue_async(self, op: WriteOp[T], *, follower: bool = False) -> asyncio.Future[T]:
        """(On an event loop.) Accept `op` now, in order, and return the future of its
        result, set once committed (as `run_async`'s): the caller may do something on the
        loop between the op's place in the queue and the wait (an op queued meanwhile by
        this loop runs after it, on one lane in its batch or a later one). `follower`:
        the caller expects another op right behind it (a claim it woke for this op's
        job): if the queue is empty when the batch would commit, the writer waits up to
        `FOLLOWER_WAIT_SECONDS` for one more op (the only wait for company)."""
        self._refuse_inside("run_async")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._accept(_Op(op, waiter, loop, follower))
        return waiter

    def close(self) -> None:
        """Stop accepting operations (those already accepted finish first)."""
        self._refuse_inside("close")
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)  # behind every accepted op: for the primary lane
                for _ in range(len(self._threads) - (self._primary is not None)):
                    self._helpers.put(_STOP)
                self._closing.set()
                self._stalled.set()  # the watchdog sees `_closed` and ends
            threads = list(self._threads)
            if self._watchdog is not None:
                threads.append(self._watchdog)
        for thread in threads:
            thread.join()

    @property
    def pending(self) -> int:
        """Operations accepted and not yet taken into a batch (approximate)."""
        return self._queue.qsize()

    def _refuse_inside(self, what: str) -> None:
        if threading.get_ident() in self._idents:
            raise RuntimeError(
                f"Writer.{what} called from inside a write operation: it would wait for "
                "itself; do the write in the same operation, or after run() returns"
            )

    def _accept(self, item: _Op) -> None:
        self._refuse_inside("run")
        with self._lock:
            if self._closed:
                raise WriterClosed()
            while len(self._threads) < self.lanes:  # the first op, or after a crash
                primary = self._primary is None
                thread = threading.Thread(
                    target=self._main, args=(primary,), name="csml-writer", daemon=True
                )
                if primary:
                    self._primary = thread
                self._threads.add(thread)
                thread.start()
            if self.lanes > 1 and self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="csml-writer-watch", daemon=True
                )
                self._watchdog.start()
            self._queue.put(item)
        if self.lanes > 1 and item.loop is not None and self._check_on(item.loop):
            return  # the loop's own timer times it: no watchdog wake-up
        if self._busy_since is not None and not self._stalled.is_set():
            self._stalled.set()  # it waits behind a batch: the watchdog times it

    def _check_on(self, loop: asyncio.AbstractEventLoop) -> bool:
        """(On `loop`, which queued an op.) Time what queues behind the primary lane's
        batch with a timer of this loop instead of waking the watchdog thread: at most
        one pending (`_check_timer`); a stall it has confirmed for the batch open now
        (`_helped_since`) gets a helper at once, as the watchdog gives one per op queued
        then. False for another loop than the first (the watchdog serves it)."""
        if self._check_loop is None or self._check_loop.is_closed():
            self._check_loop, self._check_timer = loop, None
        elif self._check_loop is not loop:
            return False
        since = self._busy_since
        if since is not None and since == self._helped_since:
            self._helpers.put(None)
        if self._check_timer is None:
            self._check_timer = loop.call_later(self.help_after, self._loop_check, loop)
        return True

    def _loop_times_it(self) -> bool:
        """(Any thread; a hint.) Whether a loop's timer looks at the queue soon."""
        loop = self._check_loop
        return self._check_timer is not None and loop is not None and not loop.is_closed()

    def _loop_check(self, loop: asyncio.AbstractEventLoop) -> None:
        """(The loop's timer.) The watchdog's timing (`_watch`), one `_look` per timer: a
        batch of the primary lane with ops still queued behind it is looked at when it has
        been open as long as `_look` said; once a helper lane was woken for it, the loop's
        next ops queued behind it get one at once (`_check_on`); while ops are queued at
        all, look again later; none: stop."""
        self._check_timer = None
        if self._closed or not self._queue.qsize():
            return
        since = self._busy_since
        delay = self.help_after
        if since is not None:
            if since != self._check_since:
                self._check_since, self._check_after = since, self.help_after
            after = self._look(since, self._check_after)
            if after is None:
                self._helped_since = since
            else:
                self._check_after = after
                delay = max(since + after - time.monotonic(), 0.0)
        self._check_timer = loop.call_later(delay, self._loop_check, loop)

    # -- the writer threads ------------------------------------------------------------

    def _main(self, primary: bool) -> None:
        ident = threading.get_ident()
        self._idents.add(ident)
        lane = _Lane(self.engine, self._tally)
        if primary:
            self._primary_lane = lane
        batch: list[_Op] = []
        clean = False
        try:
            stopping = False
            while not stopping:
                first = self._take(lane, primary)
                if first is _STOP:
                    break
                if first is None:  # a helper woken for ops another lane took meanwhile
                    continue
                batch = [cast(_Op, first)]
                if primary and self.lanes > 1:
                    self._busy_since = time.monotonic()
                    if (
                        self._queue.qsize()
                        and not self._loop_times_it()
                        and not self._stalled.is_set()
                    ):
                        self._stalled.set()  # queued before `_busy_since` was set
                stopping = self._run_batch(lane, batch)
                _deliver(batch)
                if primary:
                    self._busy_since = None
                batch = []
                if stopping and not primary:
                    self._queue.put(_STOP)  # the primary's: behind everything accepted
            clean = True
        except BaseException:
            log.exception("a writer thread of the store crashed; failing its operations")
        finally:
            lane.discard(broken=not clean)
            leftovers: list[_Op] = []
            with self._lock:
                self._threads.discard(threading.current_thread())
                self._idents.discard(ident)
                if primary:
                    self._primary = self._busy_since = None
                    if not self._closed:  # what queued behind it: the helpers take it
                        for _ in range(len(self._threads)):
                            self._helpers.put(None)
                if not self._threads:  # the last one: nobody would take what is queued
                    while True:
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if item is not _STOP:
                            leftovers.append(cast(_Op, item))
            stranded = [item for item in batch if not item.sent] + leftovers
            if stranded:
                for item in stranded:
                    item.error = WriterCrashed()
                _deliver(stranded)

    def _take(self, lane: _Lane, primary: bool) -> object:
        """The next batch's first op for this lane (or `_STOP`, or None: see
        `_help_wanted`). A PostgreSQL lane holding a begun, empty transaction (`_Lane.begun`)
        that waits `BEGUN_IDLE_SECONDS` for one rolls it back and then waits on, so that
        an idle coordinator holds no transaction open."""
        if lane.begun:
            try:
                return (
                    self._queue.get(timeout=BEGUN_IDLE_SECONDS)
                    if primary
                    else (self._help_wanted(BEGUN_IDLE_SECONDS))
                )
            except queue.Empty:
                lane.release()
        return self._queue.get() if primary else self._help_wanted()

    def _help_wanted(self, timeout: float | None = None) -> object:
        """(A helper lane.) Wait to be woken (`queue.Empty` after `timeout` seconds);
        then the first op waiting (None: there is none any more), or `_STOP`."""
        if self._helpers.get(timeout=timeout) is _STOP:
            return _STOP
        try:
            first = self._queue.get_nowait()
        except queue.Empty:
            return None
        if first is _STOP:  # the primary's (close): put back, after everything accepted
            self._queue.put(_STOP)
        return first

    def _watch(self) -> None:
        """(The watchdog thread, PostgreSQL.) Each time ops queue behind a batch of the
        primary lane (`_stalled`), time that batch by `_look` until it ends, nothing is
        queued any more or a helper lane was woken. Ends at `close`."""
        while True:
            self._stalled.wait()
            if self._closed:
                return
            self._stalled.clear()
            since, after = self._busy_since, self.help_after
            while since is not None:
                left = since + after - time.monotonic()
                if left > 0 and self._closing.wait(left):
                    return
                if self._busy_since != since or not self._queue.qsize():
                    break
                look = self._look(since, after)
                if look is None:
                    break
                after = look

    def _look(self, since: float, after: float) -> float | None:
        """The help policy, one decision for both its timers (the watchdog thread's
        `_watch` for ops queued by threads, an event loop's `_loop_check` for its own), at
        a batch of the primary lane open since `since` with ops queued behind it, due for
        help once open `after` seconds. Not due yet: `after` (look again then). Due and
        the lane waits for the server (`_server_turn`: a lock wait, a slow disk, which
        another lane can work around): wake a helper lane and return None (the stall is
        confirmed). Due but it is the lane's own turn (its Python: a busy machine's CPU or
        the GIL, which a helper would wait for as well): twice `after` (look again once the
        batch has been open that long)."""
        if time.monotonic() < since + after:
            return after
        if self._server_turn():
            self._helpers.put(None)
            return None
        return after * 2

    def _server_turn(self) -> bool:
        """Whether the primary lane waits for the server: a statement or COMMIT in
        progress on its connection (a lock wait, a slow disk), which another lane can
        work around, and no answer waiting on its socket (then it is the lane's turn for
        the GIL or a CPU to read it). True when that cannot be told. See
        `_Lane.waits_for_server`."""
        lane = self._primary_lane
        return True if lane is None else lane.waits_for_server()

    def _run_batch(self, lane: _Lane, batch: list[_Op]) -> bool:
        """Run `batch` (growing it from the queue) in one transaction and commit.

        Sets each operation's value or error; returns True if close() was seen. The
        first operation of a transaction runs without a savepoint (two statements
        fewer for a lone write): if it fails, the transaction, which holds nothing
        else, is rolled back and the next operation begins a new one. So do rerunnable
        operations after it while the transaction holds only those (`bare`); one of
        them failing sends the transaction back to `start` (see the module docstring)."""
        deadline = time.thread_time() + self.max_batch_seconds
        stop = False
        trans: RootTransaction | _Explicit | None = None
        savepoints: _Savepoints | None = None  # made when a transaction gets a second op
        start = 0  # batch[start:] are in the open transaction
        bare = False  # every op of the open transaction so far ran bare and may run again
        refused = False  # an op of this batch failed (the lane's next batch is careful)
        try:
            conn = lane.connection()
            done = 0
            while True:
                item = batch[done]
                if trans is None:
                    start = done
                    trans = lane.begin()
                    try:
                        item.value = item.op(conn)
                    except Exception as exc:
                        item.error = exc
                        refused = True
                        trans.rollback()
                        trans = None
                    if savepoints is not None:
                        savepoints.held = False  # a new transaction holds none
                    bare = trans is not None and item.rerunnable and not lane.careful
                elif bare and item.rerunnable:
                    assert trans is not None  # bare: a transaction is open
                    try:
                        item.value = item.op(conn)
                    except Exception:
                        # Undo the transaction and run it again the careful way: its
                        # ops, none answered yet, from `start`, this one included.
                        refused = lane.careful = True
                        bare = False
                        trans.rollback()
                        trans = None
                        for again in batch[start : done + 1]:
                            again.value = again.error = None
                        done = start
                        continue
                else:
                    bare = False
                    if savepoints is None:
                        savepoints = _Savepoints(conn, self._tally)
                    savepoints.run(conn, item)
                    if item.error is not None:
                        refused = True
                done += 1
                if done < len(batch):  # a repeat (above): the ops it undid run again
                    continue
                if len(batch) >= self.max_batch_ops or time.thread_time() >= deadline:
                    break
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    if not item.follower:
                        break
                    try:  # the op its caller expects next: wait a little for it
                        more = self._queue.get(timeout=FOLLOWER_WAIT_SECONDS)
                    except queue.Empty:
                        break
                if more is _STOP:
                    stop = True
                    break
                batch.append(cast(_Op, more))
            if savepoints is not None:
                savepoints.close()
            if trans is not None:
                trans.commit()
            if not refused:
                lane.careful = False
        except Exception as exc:
            why = "the transaction broke" if isinstance(exc, _BatchBroken) else type(exc).__name__
            cause = exc.__cause__ if isinstance(exc, _BatchBroken) else exc
            # The type only: a driver's message may quote the rows' values (user data).
            log.warning("a write batch of %d failed: %s", len(batch) - start, type(cause).__name__)
            for item in batch[start:]:
                failed = CommitFailed(why)
                failed.__cause__ = cause
                item.error = failed
            lane.discard()
        return stop


class _Lane:
    """A writer thread's connection: opened for its first batch, thrown away when broken.

    The watchdog thread asks `waits_for_server` while the lane's thread may be inside
    libpq on that connection with the GIL released (psycopg reads answers that way), and
    libpq allows no two threads to use one `PGconn` at once. So the watchdog never calls
    the driver: the lane's own thread notes, when it opens the connection, psycopg's
    connection lock (held through every statement, COMMIT and ROLLBACK) and the socket's
    descriptor, and the watchdog only tests that lock and polls that descriptor (`poll`:
    no `select` limit on descriptor numbers, which a coordinator with many sockets
    open passes)."""

    def __init__(self, engine: Engine, tally: StoreCounters) -> None:
        self.engine = engine
        self.tally = tally
        self.explicit = engine.dialect.name == "postgresql"  # BEGIN/COMMIT sent here
        self.conn: Connection | None = None
        self.cursor: Any = None  # (explicit) the DB-API cursor BEGIN and COMMIT go on
        self.begun = False  # (explicit) a BEGIN was sent and no statement since
        self.careful = False  # its last batch had a failing op: no bare ops (see Writer)
        # Noted by the lane's thread for the watchdog's (None / -1: no connection, or
        # not psycopg 3, and then the watchdog cannot tell).
        self.busy: Any = None  # psycopg's `Connection.lock`: held while the server works
        self.socket = -1

    def connection(self) -> Connection:
        if self.conn is None:
            conn = self.engine.connect().execution_options(**{WRITE_OPTION: True})
            dbapi = conn.connection.dbapi_connection
            if self.explicit:
                # The driver in autocommit: it sends no BEGIN of its own (a round trip
                # before the first statement); `begin` and `_Explicit` send them, the
                # COMMIT and the next BEGIN in one. SQLAlchemy's transaction is begun once
                # (nothing is sent) and stays open for the connection's life.
                conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.begin()
                assert dbapi is not None
                self.cursor = dbapi.cursor()
                self.begun = False
            lock = getattr(dbapi, "lock", None)
            pgconn = getattr(dbapi, "pgconn", None)
            if lock is not None and pgconn is not None and callable(getattr(lock, "locked", 0)):
                self.socket = int(pgconn.socket)  # in the lane's thread: the driver is idle
                self.busy = lock
            self.conn = conn
        return self.conn

    def begin(self) -> RootTransaction | _Explicit:
        """Open the batch's transaction on `connection()`: on SQLite SQLAlchemy's (BEGIN
        IMMEDIATE); on PostgreSQL an explicit one, begun already by the lane's last
        COMMIT or ROLLBACK (`_Explicit`), else by a BEGIN now."""
        conn = self.connection()
        if not self.explicit:
            return conn.begin()
        if not self.begun:
            self.send("BEGIN")
        self.begun = False
        return _Explicit(self)

    def send(self, sql: str) -> None:
        """(explicit) Send transaction control on the lane's cursor, one round trip (the
        simple query protocol: "COMMIT; BEGIN" is one message and one answer). Not
        counted as statements (the driver's BEGIN and COMMIT never were); errors are
        wrapped as SQLAlchemy's (a lost connection invalidates it)."""
        conn = self.conn
        assert conn is not None
        try:
            self.cursor.execute(sql)
        except BaseException as exc:
            conn._handle_dbapi_exception(exc, sql, (), self.cursor, None)

    def release(self) -> None:
        """(explicit, idle) Roll back the begun, empty transaction. A failure drops the
        connection (the next batch opens a fresh one)."""
        self.begun = False
        try:
            self.send("ROLLBACK")
        except Exception as exc:
            log.debug("rolling back the writer's idle transaction: %s", type(exc).__name__)
            self.discard()

    def waits_for_server(self) -> bool:
        """(Any thread.) Whether a statement or COMMIT is in progress on this lane's
        connection with no answer yet on its socket: the lane waits for the server, not
        for its own turn to run. True when that cannot be told. A hint only: the lane
        may move on meanwhile; if it drops its connection just now, the descriptor polled
        may be closed (then True) or another file's (then a wrong hint, nothing more)."""
        busy, fd = self.busy, self.socket
        if busy is None or fd < 0:
            return True
        if not busy.locked():
            return False  # between statements: the lane's own Python
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            events = poller.poll(0)
        except (OSError, ValueError, AttributeError):  # no poll() here, or a bad descriptor
            return True
        return not events or any(e & select.POLLNVAL for _, e in events)

    def discard(self, broken: bool = True) -> None:
        """Drop the connection (rolling back whatever it holds); the next batch opens one.

        A broken one is closed for good (`invalidate`), a sound one goes back to the pool."""
        conn, self.conn = self.conn, None
        self.busy, self.socket = None, -1  # before closing: the watchdog stops looking
        self.cursor, self.begun = None, False
        if conn is None:
            return
        # Closing is all that is left to do, so errors here are only logged.
        try:
            if broken:
                conn.invalidate()  # the pool closes the DB-API connection, never reuses it
            conn.close()
        except Exception as exc:
            log.debug("closing the writer's broken connection: %s", exc)


class _Explicit:
    """(PostgreSQL) The batch's transaction, begun and ended by statements the lane
    sends itself (the driver is in autocommit, see `_Lane.connection`). Its end begins
    the lane's next transaction in the same round trip ("COMMIT; BEGIN", "ROLLBACK;
    BEGIN"): a BEGIN takes no snapshot and no lock (READ COMMITTED takes a snapshot per
    statement; timestamps are the coordinator's, not the server's `now()`), so the next
    batch starts with its first statement; a lane idle `BEGUN_IDLE_SECONDS` rolls it
    back (`_Lane.release`).

    `commit` returns only once the server answered the COMMIT (the simple query's
    answer is read to its end); a transaction that is not INTRANS (an op swallowed an
    error: PostgreSQL would answer its COMMIT with a silent ROLLBACK) is not committed
    but raises, failing the batch (`CommitFailed`)."""

    __slots__ = ("lane",)

    def __init__(self, lane: _Lane) -> None:
        self.lane = lane

    def commit(self) -> None:
        lane = self.lane
        conn = lane.conn
        assert conn is not None
        dbapi = conn.connection.dbapi_connection
        status = getattr(getattr(dbapi, "info", None), "transaction_status", None)
        if status is not None and getattr(status, "name", "") != "INTRANS":
            raise _BatchBroken() from RuntimeError(f"transaction status {status.name} at COMMIT")
        lane.send("COMMIT; BEGIN")
        lane.begun = True
        lane.tally.write_commits += 1

    def rollback(self) -> None:
        lane = self.lane
        lane.send("ROLLBACK; BEGIN")
        lane.begun = True


class _Savepoints:
    """One savepoint per operation, its statements sent straight to the DB-API cursor
    (same connection, same transaction): `conn.begin_nested()` costs ~80 µs of CPU per
    op, this ~5 µs. They are counted in the engine's `StoreCounters` like the others
    (in all, and by kind: "SAVEPOINT", "RELEASE", "ROLLBACK").

    An operation's savepoint is released only when the next one is set (or by the
    COMMIT): on PostgreSQL "RELEASE; SAVEPOINT" then go in one round trip, so an op
    costs one round trip more than its own statements, not two."""

    def __init__(self, conn: Connection, tally: StoreCounters) -> None:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        self.cursor: Any = dbapi.cursor()
        self.tally = tally
        self.one_trip = conn.dialect.name == "postgresql"  # pysqlite: one statement a call
        self.held = False  # the previous op's savepoint is still set

    def _send(self, *statements: str) -> None:
        if self.one_trip and len(statements) > 1:
            self.cursor.execute("; ".join(statements))
        else:
            for statement in statements:
                self.cursor.execute(statement)
        tally = self.tally
        tally.statements += len(statements)
        for statement in statements:  # by kind too: the kinds sum to the statements
            kind = statement_kind(statement)
            tally.by_kind[kind] = tally.by_kind.get(kind, 0) + 1

    def run(self, conn: Connection, item: _Op) -> None:
        """Run one operation in its own savepoint; raise _BatchBroken if the batch is lost."""
        self._send(*(("RELEASE SAVEPOINT csml_op",) if self.held else ()), "SAVEPOINT csml_op")
        self.held = True
        try:
            item.value = item.op(conn)
        except Exception as exc:
            item.error = exc
            try:
                self._send("ROLLBACK TO SAVEPOINT csml_op")  # the savepoint stays set
            except Exception as broken:
                raise _BatchBroken() from broken
            if not _usable(conn):
                raise _BatchBroken() from exc

    def close(self) -> None:
        self.cursor.close()


def _usable(conn: Connection) -> bool:
    """Whether the batch's transaction is still open and healthy after an error."""
    if conn.invalidated or not conn.in_transaction():
        return False
    dbapi = conn.connection.dbapi_connection
    if isinstance(dbapi, sqlite3.Connection):
        # SQLite rolls the whole transaction back by itself on some errors (FULL, IOERR,
        # NOMEM, BUSY); the statements after would run outside any transaction.
        return dbapi.in_transaction
    status = getattr(getattr(dbapi, "info", None), "transaction_status", None)
    if status is not None:  # psycopg 3: INERROR after a failed ROLLBACK TO SAVEPOINT
        return getattr(status, "name", "") == "INTRANS"
    return True


def _deliver(batch: list[_Op]) -> None:
    """Answer every caller of `batch` (threads now; each event loop with one call)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Op]] = {}
    for item in batch:
        if item.loop is None:
            waiter = cast(Future[Any], item.waiter)
            if item.error is None:
                waiter.set_result(item.value)
            else:
                waiter.set_exception(item.error)
            item.sent = True
        else:
            by_loop.setdefault(item.loop, []).append(item)
    for loop, items in by_loop.items():
        for item in items:
            item.sent = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_settle, items)


def _settle(items: list[_Op]) -> None:
    """In the caller's event loop: resolve the futures still waited on."""
    for item in items:
        waiter = cast(asyncio.Future[Any], item.waiter)
        if waiter.done():  # its coroutine was cancelled
            continue
        if item.error is None:
            waiter.set_result(item.value)
        else:
            waiter.set_exception(item.error)
