"""Relay wake-ups between coordinators sharing a PostgreSQL database (LISTEN/NOTIFY).

It runs on the coordinator's event loop (since session 15; before, a thread of its
own), on a connection of its own taken out of the engine's pool (so it uses the same URL
and connect arguments; opened, and its first LISTENs sent, in a worker thread), in
autocommit mode: it LISTENs on `csml_wake` and hands each key to the local notifier, and
it sends the keys this coordinator publishes, batched, with `pg_notify` on the same
connection. A payload is `<origin> <key> <count>` (a key can be published several times
per batch: one wake per queued job); a coordinator ignores its own. PostgreSQL delivers a
session's own notifications to it as well: sending on the listening connection, they
come back in the answer to the `pg_notify` itself and cost no read of their own.

On the loop, the connection is driven through libpq's asynchronous calls (psycopg's
`pq` layer: `send_query_params`, `consume_input`, `get_result`, `notifies`) from a
reader on its socket (`loop.add_reader`): one statement in flight at a time, the next
queued behind it, nothing ever blocks the loop. A key published on the loop is held and
a timer sends it; one published from another thread hops to the loop once
(`call_soon_threadsafe`, counted in `pokes`). Packets from other coordinators are read
and delivered to the notifier on the loop, with no hop. With a thread, every publish
woke the thread (a pipe), every packet woke it and then the loop, and the GIL changed
hands each time: in `bench/coordinators.py` the relay thread took 0.10 -> 0.39 CPU-ms
per job from 1 to 4 coordinators, most of it wake-ups.
If the connection drops, it reconnects with backoff and then wakes every local waiter,
since notifications sent meanwhile are lost (and the keys it held are dropped, as a
failed send drops them: the long-polls re-check).

Cost per coordinator grows with the others' notifications (each transaction of
`pg_notify` is a packet to every listener, a read on its event loop), so both
ends batch. The sender waits up to `LINGER_SECONDS` after a key for more (a submit's
or a completion's keys are published a moment apart) and sends what it has in one
transaction; a key published as `deferrable` (the notifier's changes that end no job:
submitted, running, progress, which event streams let settle for longer anyway) waits
up to `DEFER_SECONDS` for a key that may not wait, and goes out with it. The relay
hands every notification of a packet to the notifier in one call (`deliver`), which
wakes this coordinator's waiters for the keys someone here follows and drops the
others (see `csml.coordinator.notify`).

An ended job's view (`publish(key, view=JobRow)`: the row a plain job's end returns)
goes with its key, as one more notification just before it in the same transaction,
`<origin> =<key> <JSON of the row>` (pydantic's `TypeAdapter(JobRow)`; never for a
confidential job, nor over `VIEW_MAX_CHARS`): the coordinators whose event streams
follow that owner send the job without loading it again (`view_of`, decoded only there).
A coordinator that does not know the form skips it (not three fields, or no count) and
loads the job as before; a view whose key did not come in the same packet is dropped.

Interest-filtered channels (since session 12): a key published with a `bucket`
(`publish(key, bucket=b)`: the notifier's owner feeds, `owner:<id>/<job>`, and a
completion's `job:` key, by the owner's topic hashed to one of
`csml.coordinator.notify.FEED_BUCKETS`) goes on the channel `csml_wake_<b>` instead,
with its view, and only the coordinators that LISTEN there receive it: those with a feed
following a topic of that bucket (`want(b)` / `unwant(b)`, counted by the notifier). With
N coordinators each one's client streams follow their own owners, so most of the other
coordinators' owner keys (a job's submitted, running and ended changes, the ended one
with its view) no longer reach it: no packet to read, parse and drop. The relay LISTENs
on a bucket when it is first wanted (at the loop's next turn, before keys held then),
and keeps listening `UNLISTEN_AFTER_SECONDS` after it is no longer wanted (a stream that
reconnects follows the same owner again). A key sent before a LISTEN took effect is not
received, so once the LISTEN has returned it calls `heard(buckets)`: the notifier then
tells the feeds that followed before it to re-read (`Feed.add(None)`, a resync), which
reads the store after every commit whose key could have been missed. On reconnect it
LISTENs on every wanted bucket before waking every local waiter (as before). Every
coordinator sharing a database must run this version: an older one listens on
`csml_wake` alone and would hear no owner keys of the newer ones (its streams would see
their jobs' changes only at their next re-read).

It lives in the store because it is SQL on a store connection (LISTEN and
`pg_notify`); `csml.coordinator.notify` decides what to wake and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from pydantic import TypeAdapter
from sqlalchemy.engine import Engine

from csml.store.jobs import JobRow

log = logging.getLogger("csml.coordinator.notify")

CHANNEL = "csml_wake"
MAX_BATCH = 500
LINGER_SECONDS = 0.001  # after a key, how long the sender waits for more to send with it
DEFER_SECONDS = 0.05  # how long a deferrable key may wait for one that is not
VIEW_MAX_CHARS = 4000  # an ended job's view relayed with its key, at most (NOTIFY: 8000 bytes)
VIEW_MARK = "="  # before the key of a view's notification
UNLISTEN_AFTER_SECONDS = 30.0  # a bucket no longer wanted is still listened to this long
_ROWS: TypeAdapter[JobRow] = TypeAdapter(JobRow)


def view_text(view: object) -> str | None:
    """The JSON relayed for a view published with its key, or None (not sent)."""
    if not isinstance(view, JobRow) or view.confidential is not None:
        return None
    text = _ROWS.dump_json(view).decode()
    return text if len(text) <= VIEW_MAX_CHARS else None


def bucket_channel(bucket: int) -> str:
    """The channel of a bucket's keys (a constant identifier: the prefix and a number)."""
    return f"{CHANNEL}_{int(bucket)}"


def view_of(text: str) -> JobRow:
    """The ended job a view's notification carried (`view_text`'s inverse)."""
    return _ROWS.validate_json(text)


class PgRelay:
    def __init__(
        self,
        engine: Engine,
        deliver: Callable[[list[tuple[str | None, int]], dict[str, str]], None],
        loop: asyncio.AbstractEventLoop,
        heard: Callable[[set[int]], None] = lambda buckets: None,
    ) -> None:
        """`deliver([(key, times), ...], views)` wakes local waiters as for `times`
        notifications of each `key` (None: every waiter), in order; `views` holds, by
        key, the JSON of an ended job's view that came with it (`view_of` decodes it). It
        is called on `loop` once per packet of notifications received. `heard(buckets)`
        is called (on `loop`) once LISTEN on those buckets' channels has taken effect (see
        the module). The relay runs on `loop` until `close()` or the loop closes."""
        self.origin = secrets.token_hex(8)
        self.listening = threading.Event()  # LISTEN is active: other coordinators reach us
        # Counts for /metrics, the benchmarks and tests (written on the loop):
        self.received = 0  # notifications (keys) from other coordinators
        self.packets = 0  # reads that brought other coordinators' notifications
        self.wakes = 0  # times the socket was readable with no statement of ours in flight
        self.sent = 0  # keys sent (a key published n times in one batch counts once)
        self.publishes = 0  # pg_notify transactions
        self.pokes = 0  # publishes from another thread than the loop's (hops to the loop)
        self._engine = engine
        self._deliver = deliver
        self._loop = loop
        self._heard = heard
        self._closed = False
        # Buckets wanted (`want` / `unwant`, any thread, under `_want_lock`), when each
        # unwanted one stopped being wanted, and those whose channel is LISTENed on (the
        # loop's; read by `listens_on` under the GIL).
        self._want_lock = threading.Lock()
        self._wanted: set[int] = set()
        self._unwanted_at: dict[int, float] = {}
        self._listened: frozenset[int] = frozenset()
        # The connection (None: connecting, or lost) and its statement in flight, if any:
        # one at a time, the next ones queued (`_statements`); each with what to call
        # on the loop once its answer has been read to its end.
        self._conn: psycopg.Connection[Any] | None = None
        self._fd = -1
        self._writing = False  # a statement not yet flushed: the loop waits to write
        self._inflight: Callable[[], None] | None = None
        self._statements: deque[tuple[bytes, list[bytes] | None, Callable[[], None]]] = deque()
        self._relisten_due = False  # a `_relisten` is scheduled, or a LISTEN in flight
        # Keys held to send in one transaction (see `_take`), their views and buckets,
        # and the timer that sends them.
        self._keys: Counter[str] = Counter()
        self._views: dict[str, object] = {}
        self._buckets: dict[str, int] = {}
        self._send_at = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._unlisten_timer: asyncio.TimerHandle | None = None
        self._delay = 0.2  # the next reconnection's backoff
        self._loop.call_soon_threadsafe(self._start)

    # -- any thread ---------------------------------------------------------------

    def publish(
        self, key: str, *, deferrable: bool = False, view: object = None, bucket: int | None = None
    ) -> None:
        """Queue `key` for the other coordinators (never blocks). `deferrable`: it may wait
        up to `DEFER_SECONDS` for company (it goes with the next key that may not).
        `view`: the ended job the key announces (a `JobRow`), relayed with it when it may
        be (`view_text`). `bucket`: sent on that bucket's channel (only the coordinators
        that want it hear it), else on `CHANNEL` (all of them). Safe from any thread (from
        another than the loop's, one hop to the loop)."""
        if _on(self._loop):
            self._take(key, deferrable, view, bucket)
        else:
            self.pokes += 1
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody to relay for
                self._loop.call_soon_threadsafe(self._take, key, deferrable, view, bucket)

    def want(self, bucket: int) -> None:
        """(Any thread.) Receive `bucket`'s keys from now on: its channel is LISTENed on
        at the loop's next turn, and then `heard({bucket})` is called."""
        with self._want_lock:
            self._unwanted_at.pop(bucket, None)
            if bucket in self._wanted:
                return
            self._wanted.add(bucket)
        self._schedule_relisten()

    def unwant(self, bucket: int) -> None:
        """(Any thread.) `bucket`'s keys are no longer needed here: its channel is
        UNLISTENed `UNLISTEN_AFTER_SECONDS` later, unless wanted again meanwhile."""
        with self._want_lock:
            if bucket in self._wanted:
                self._wanted.discard(bucket)
                self._unwanted_at[bucket] = time.monotonic()
        if _on(self._loop):
            self._arm_unlisten()
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._arm_unlisten)

    def listens_on(self, bucket: int) -> bool:
        """(Any thread.) Whether the LISTEN on `bucket`'s channel is in effect."""
        return self.listening.is_set() and bucket in self._listened

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend of the relay's connection (None: not connected)."""
        conn = self._conn
        return None if conn is None else conn.pgconn.backend_pid

    def close(self, timeout: float = 5.0) -> None:
        """Stop relaying and close the connection (on the loop: at once; from another
        thread: at the loop's next turn, waiting up to `timeout` for it)."""
        if _on(self._loop) or self._loop.is_closed():
            self._shut()
            return
        done = threading.Event()

        def shut() -> None:
            self._shut()
            done.set()

        try:
            self._loop.call_soon_threadsafe(shut)
        except RuntimeError:  # closed meanwhile
            self._shut()
            return
        done.wait(timeout)

    # -- on the loop ----------------------------------------------------------------

    def _schedule_relisten(self) -> None:
        if _on(self._loop):
            self._relisten_soon()
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._relisten_soon)

    def _relisten_soon(self) -> None:
        if not self._relisten_due and self._conn is not None:
            self._relisten_due = True
            self._loop.call_soon(self._relisten)

    def _arm_unlisten(self) -> None:
        """Look again once the oldest unwanted bucket is due to be UNLISTENed."""
        with self._want_lock:
            at = min(self._unwanted_at.values(), default=math.inf)
        if at == math.inf or self._closed:
            return
        if self._unlisten_timer is not None:
            self._unlisten_timer.cancel()
        delay = max(0.0, at + UNLISTEN_AFTER_SECONDS - time.monotonic())
        self._unlisten_timer = self._loop.call_later(delay, self._relisten_soon)

    def _start(self) -> None:
        if not self._closed:
            self._loop.create_task(self._connect())

    async def _connect(self) -> None:
        """Connect and LISTEN (in a thread: blocking), then serve on the loop; on a
        failure, try again after a backoff (0.2 s doubling to 5 s)."""
        while not self._closed:
            with self._want_lock:
                buckets = set(self._wanted)
            try:
                conn = await asyncio.to_thread(self._open, buckets)
            except TypeError as exc:
                log.warning("coordinators will not wake each other: %s", exc)
                return
            except (psycopg.Error, OSError) as exc:
                log.warning(
                    "relay connection failed (%s); retrying in %.1f s",
                    type(exc).__name__,
                    self._delay,
                )
                await asyncio.sleep(self._delay)
                self._delay = min(self._delay * 2, 5.0)
                continue
            if self._closed:
                _close(conn)
                return
            self._serve(conn, buckets)
            return

    def _open(self, buckets: set[int]) -> psycopg.Connection[Any]:
        """(A worker thread.) A connection of the engine's, detached from its pool, in
        autocommit mode, LISTENing on `CHANNEL` and on `buckets`' channels."""
        fairy = self._engine.raw_connection()
        fairy.detach()
        conn = fairy.dbapi_connection
        if not isinstance(conn, psycopg.Connection):
            fairy.close()
            raise TypeError("LISTEN/NOTIFY needs the psycopg (3) driver: postgresql+psycopg://")
        try:
            conn.rollback()  # the pool's ping may have begun a transaction
            conn.autocommit = True
            conn.execute("LISTEN " + CHANNEL)  # a constant identifier
            for bucket in sorted(buckets):
                conn.execute("LISTEN " + bucket_channel(bucket))  # ditto
        except BaseException:
            _close(conn)
            raise
        return conn

    def _serve(self, conn: psycopg.Connection[Any], buckets: set[int]) -> None:
        """Serve the connection on the loop from now on: its socket's reader takes the
        other coordinators' notifications and the answers to this relay's statements."""
        pgconn = conn.pgconn
        pgconn.nonblocking = 1
        self._conn = conn
        self._fd = pgconn.socket
        self._listened = frozenset(buckets)
        self.listening.set()
        self._delay = 0.2
        self._loop.add_reader(self._fd, self._readable)
        self._deliver([(None, 1)], {})  # anything sent while we were not listening
        if buckets:
            self._heard(buckets)
        with self._want_lock:
            changed = self._wanted != buckets or bool(self._unwanted_at)
        if changed:  # wanted or unwanted while connecting
            self._relisten_soon()
        self._arm_unlisten()
        if self._keys:
            self._arm(self._send_at)

    def _lost(self, exc: BaseException) -> None:
        """The connection failed: drop it and what was held (the other coordinators'
        long-polls re-check the store anyway), reconnect after a backoff, and then wake
        every local waiter (notifications sent meanwhile are lost)."""
        if not self._closed:
            log.warning(
                "relay connection lost (%s); reconnecting in %.1f s",
                type(exc).__name__,
                self._delay,
            )
        self._drop()
        if self._closed:
            return
        delay = self._delay
        self._delay = min(self._delay * 2, 5.0)
        self._loop.call_later(delay, self._start)

    def _drop(self) -> None:
        self.listening.clear()
        self._listened = frozenset()
        conn, self._conn = self._conn, None
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
                if self._writing:
                    self._loop.remove_writer(self._fd)
        self._fd, self._writing = -1, False
        self._inflight = None
        self._statements.clear()
        self._relisten_due = False
        self._keys, self._views, self._buckets = Counter(), {}, {}
        self._send_at = math.inf
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if conn is not None:
            _close(conn)

    def _shut(self) -> None:
        self._closed = True
        if self._unlisten_timer is not None:
            self._unlisten_timer.cancel()
        self._drop()

    def _take(self, key: str, deferrable: bool, view: object, bucket: int | None) -> None:
        """Hold `key` to send: a key that may not wait goes `LINGER_SECONDS` later with
        whatever came meanwhile; a deferrable one waits up to `DEFER_SECONDS` for one
        that may not."""
        if self._closed:
            return
        keys = self._keys
        keys[key] += 1
        if view is not None:
            self._views[key] = view
        if bucket is not None:
            self._buckets[key] = bucket
        if len(keys) >= MAX_BATCH:
            self._arm(0.0)
            return
        due = time.monotonic() + (DEFER_SECONDS if deferrable else LINGER_SECONDS)
        if due < self._send_at:
            self._send_at = due
            self._arm(due)

    def _arm(self, at: float) -> None:
        """Send what is held at `at` (`time.monotonic`; uvloop's `loop.time` is another
        clock, so the timer is set by delay)."""
        if self._conn is None:
            return  # held until connected (dropped if the connection fails)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(max(0.0, at - time.monotonic()), self._flush_keys)

    def _flush_keys(self) -> None:
        self._timer = None
        if not self._keys or self._conn is None:
            return
        keys, views, buckets = self._keys, self._views, self._buckets
        self._keys, self._views, self._buckets = Counter(), {}, {}
        self._send_at = math.inf
        # PostgreSQL folds identical payloads of one transaction: count repeats. The
        # arrays go in binary: as text, psycopg quoted and escaped every element with a
        # regular expression, an ended job's JSON view most of all (since session 13:
        # relay 0.23 -> 0.13 CPU-ms per job with one coordinator).
        channels: list[str] = []
        payloads: list[str] = []
        for k, n in sorted(keys.items()):
            channel = bucket_channel(buckets[k]) if k in buckets else CHANNEL
            text = view_text(views[k]) if k in views else None
            if text is not None:
                channels.append(channel)
                payloads.append(f"{self.origin} {VIEW_MARK}{k} {text}")
            channels.append(channel)
            payloads.append(f"{self.origin} {k} {n}")
        count = len(keys)

        def sent() -> None:
            self.publishes += 1
            self.sent += count

        self._statement(NOTIFY_SQL, [_text_array(channels), _text_array(payloads)], sent)

    def _relisten(self) -> None:
        """LISTEN on the buckets newly wanted (then `heard` them), UNLISTEN those unwanted
        for `UNLISTEN_AFTER_SECONDS`: one statement, sent before any key held now."""
        self._relisten_due = False
        if self._conn is None:
            return
        now = time.monotonic()
        with self._want_lock:
            wanted = set(self._wanted)
            stale = {b for b, at in self._unwanted_at.items() if now - at >= UNLISTEN_AFTER_SECONDS}
            for bucket in stale:
                del self._unwanted_at[bucket]
        new = wanted - self._listened
        gone = stale & self._listened
        self._arm_unlisten()
        if not new and not gone:
            return
        sql = "; ".join(
            ["LISTEN " + bucket_channel(b) for b in sorted(new)]  # constant identifiers
            + ["UNLISTEN " + bucket_channel(b) for b in sorted(gone)]
        )
        self._listened = frozenset(self._listened - gone)  # no longer relied on from now

        def done() -> None:
            self._listened = frozenset((self._listened | new) - gone)
            if new:
                self._heard(new)

        self._statement(sql.encode(), None, done)

    def _statement(self, sql: bytes, params: list[bytes] | None, done: Callable[[], None]) -> None:
        """Send `sql` (with binary `params`: two text arrays) once the one in flight is
        answered; `done()` runs once its answer has been read to its end."""
        self._statements.append((sql, params, done))
        if self._inflight is None:
            self._next()

    def _next(self) -> None:
        conn = self._conn
        if conn is None or not self._statements:
            return
        sql, params, done = self._statements.popleft()
        pgconn = conn.pgconn
        try:
            if params is None:
                pgconn.send_query(sql)
            else:
                pgconn.send_query_params(sql, params, (TEXT_ARRAY_OID,) * 2, (1, 1), 0)
            self._inflight = done
            self._flush()
        except (psycopg.Error, OSError) as exc:
            self._lost(exc)

    def _flush(self) -> None:
        """Push the statement's bytes out; if the socket is full, again when writable."""
        conn = self._conn
        if conn is None:
            return
        if conn.pgconn.flush() == 0:
            if self._writing:
                self._writing = False
                self._loop.remove_writer(self._fd)
        elif not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            self._flush()
        except (psycopg.Error, OSError) as exc:
            self._lost(exc)

    def _readable(self) -> None:
        """The socket has something: the answer to the statement in flight, other
        coordinators' notifications (their packets), or our own (with the answer)."""
        conn = self._conn
        if conn is None:
            return
        pgconn = conn.pgconn
        if self._inflight is None:  # not the answer to our statement: others' packets
            self.wakes += 1
        try:
            pgconn.consume_input()
            ended = False
            failed: str | None = None
            while self._inflight is not None and not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    ended = True
                    break
                if result.status == pq.ExecStatus.FATAL_ERROR:
                    failed = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"?").decode()
            payloads: list[str] = []
            while (note := pgconn.notifies()) is not None:
                payloads.append(note.extra.decode())
        except (psycopg.Error, OSError) as exc:
            self._lost(exc)
            return
        if payloads and self._received(payloads):
            self.packets += 1
        if failed is not None:
            log.warning("the relay's statement failed (SQLSTATE %s)", failed)
            self._lost(psycopg.OperationalError(failed))
            return
        if ended:
            done, self._inflight = self._inflight, None
            if done is not None:
                done()
            self._next()

    def _received(self, payloads: list[str]) -> bool:
        """Deliver the other coordinators' keys among `payloads`; whether there were any."""
        keys: list[tuple[str | None, int]] = []
        views: dict[str, str] = {}
        for payload in payloads:
            parts = payload.split(" ", 2)
            if len(parts) != 3 or parts[0] == self.origin:
                continue
            if parts[1].startswith(VIEW_MARK):
                views[parts[1][len(VIEW_MARK) :]] = parts[2]
            elif parts[2].isdigit():
                keys.append((parts[1], int(parts[2])))
        if not keys:
            return False
        self.received += len(keys)
        announced = {k for k, _ in keys}
        self._deliver(keys, {k: v for k, v in views.items() if k in announced})
        return True


NOTIFY_SQL = b"SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)"
TEXT_ARRAY_OID = 1009
_TEXT_ARRAY = Transformer().get_dumper(["text"], PyFormat.BINARY)  # psycopg's, for list[str]


def _text_array(items: list[str]) -> bytes:
    """A one-dimensional text[] of at least one item in PostgreSQL's binary format, as
    psycopg's own binary dumper writes it (what `%b` sent when the relay was a thread;
    an empty list has no element type: psycopg would dump it as text)."""
    assert items, "a batch of keys is never empty"
    return bytes(_TEXT_ARRAY.dump(items) or b"")


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the caller runs on `loop`'s thread (inside it)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _close(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error, OSError):
        conn.close()
