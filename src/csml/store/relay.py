"""Relay wake-ups between coordinators sharing a PostgreSQL database (LISTEN/NOTIFY).

One daemon thread on a connection of its own taken out of the engine's pool (so it
uses the same URL and connect arguments), in autocommit mode: it LISTENs on
`csml_wake` and hands each key to the local notifier, and it sends the keys this
coordinator publishes, batched, with `pg_notify` on the same connection. A payload is
`<origin> <key> <count>` (a key can be published several times per batch: one
wake per queued job); a coordinator ignores its own. PostgreSQL delivers a session's
own notifications to it as well: sending on the listening connection, they come back
in the answer to the `pg_notify` itself and cost no wake-up of their own (on a
separate sending connection each of them woke the listener; with two coordinators
about half of all it heard). The thread polls the connection's socket and a pipe that
`publish` writes a byte to, only when the thread would otherwise sleep past the key's
send time (`_asleep_until`: a key published while the thread is awake, or lingering
with a send due sooner, waits for that turn; a submit's two keys and a completion's
three cost one wake-up of the thread, not one each: in `bench/coordinators.py` the
relay thread's voluntary context switches per job went 3.2 -> 2.2 with one coordinator,
5.8 -> 4.2 with two; with four each publish still finds the thread asleep).
If the connection drops, it reconnects with backoff and then wakes every local waiter,
since notifications sent meanwhile are lost (and the keys it held are dropped, as a
failed send drops them: the long-polls re-check).

Cost per coordinator grows with the others' notifications (each transaction of
`pg_notify` is a packet to every listener, a wake-up of its relay thread), so both
ends batch. The sender waits up to `LINGER_SECONDS` after a key for more (a submit's
or a completion's keys are published a moment apart) and sends what it has in one
transaction; a key published as `deferrable` (the notifier's changes that end no job:
submitted, running, progress, which event streams let settle for longer anyway) waits
up to `DEFER_SECONDS` for a key that may not wait, and goes out with it. The thread
hands every notification of a packet to the notifier in one call (`deliver`), which
wakes this coordinator's event loop once for the keys someone here follows and drops
the others (see `csml.coordinator.notify`).

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
with its view) no longer reach it: no packet to read, parse and drop. The thread LISTENs
on a bucket when it is first wanted (before sending, on its next turn: `want` pokes it),
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

import contextlib
import logging
import math
import os
import queue
import secrets
import select
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
from pydantic import TypeAdapter
from sqlalchemy.engine import Engine

from csml.store.jobs import JobRow

log = logging.getLogger("csml.coordinator.notify")

CHANNEL = "csml_wake"
MAX_BATCH = 500
LINGER_SECONDS = 0.001  # after a key, how long the sender waits for more to send with it
DEFER_SECONDS = 0.05  # how long a deferrable key may wait for one that is not
POLL_SECONDS = 1.0  # how often the threads check whether to stop
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
        alive: Callable[[], bool] = lambda: True,
        heard: Callable[[set[int]], None] = lambda buckets: None,
    ) -> None:
        """`deliver([(key, times), ...], views)` wakes local waiters as for `times`
        notifications of each `key` (None: every waiter), in order; `views` holds, by
        key, the JSON of an ended job's view that came with it (`view_of` decodes it). It
        is called once per packet of notifications received. `heard(buckets)` is called
        (in the thread) once LISTEN on those buckets' channels has taken effect (see the
        module). The thread ends once `alive()` is false or `close()` is called."""
        self.origin = secrets.token_hex(8)
        self.listening = threading.Event()  # LISTEN is active: other coordinators reach us
        # Counts for /metrics, the benchmarks and tests (written by the relay's thread):
        self.received = 0  # notifications (keys) from other coordinators
        self.packets = 0  # reads that brought other coordinators' notifications
        self.wakes = 0  # times the socket woke the thread (own notifications come without)
        self.sent = 0  # keys sent (a key published n times in one batch counts once)
        self.publishes = 0  # pg_notify transactions
        self.pokes = 0  # bytes `publish` wrote to the wake pipe (thread wake-ups asked for)
        self._engine = engine
        self._deliver = deliver
        self._alive = alive
        self._stop = threading.Event()
        self._heard = heard
        self._outbox: queue.SimpleQueue[tuple[str, bool, object, int | None]] = queue.SimpleQueue()
        # Buckets wanted (`want` / `unwant`, any thread, under `_want_lock`), when each
        # unwanted one stopped being wanted, and those whose channel the thread LISTENs on
        # (the thread's own; read by `listens_on` under the GIL).
        self._want_lock = threading.Lock()
        self._wanted: set[int] = set()
        self._unwanted_at: dict[int, float] = {}
        self._want_changed = False
        self._listened: frozenset[int] = frozenset()
        # Wakes the thread from its poll: a byte per `publish` (and `close`); closed by
        # the thread when it ends, under `_pipe_lock` (a write after that must not reach
        # whatever file reuses the descriptor).
        self._wake_r, self._wake_w = os.pipe()
        self._pipe_lock = threading.Lock()
        self._pipe_open = True
        # When the serving thread wakes by itself (its poll's timeout): set before it looks
        # at the outbox a last time and sleeps, -inf while it is awake (it looks at the
        # outbox before sleeping again) and outside `_serve` (nothing to wake it for).
        # `publish` puts its key first, then reads this (both under the GIL): a key the
        # thread's last look missed was published after that look began, so its reader
        # saw the new deadline and pokes if the key is due before it. A publisher that
        # pokes sets -inf first (the thread wakes after that write, and sets its next
        # deadline after it has looked again), so a burst pokes once.
        self._asleep_until = -math.inf
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._loop, name="csml-pg-relay", daemon=True)
        self._thread.start()

    def publish(
        self, key: str, *, deferrable: bool = False, view: object = None, bucket: int | None = None
    ) -> None:
        """Queue `key` for the other coordinators (never blocks). `deferrable`: it may wait
        up to `DEFER_SECONDS` for company (it goes with the next key that may not).
        `view`: the ended job the key announces (a `JobRow`), relayed with it when it may
        be (`view_text`). `bucket`: sent on that bucket's channel (only the coordinators
        that want it hear it), else on `CHANNEL` (all of them)."""
        self._outbox.put((key, deferrable, view, bucket))
        due = time.monotonic() + (DEFER_SECONDS if deferrable else LINGER_SECONDS)
        if due < self._asleep_until:
            # Awake from now on (before the poke: so never after its next deadline), so
            # the keys published until it runs need no poke of their own.
            self._asleep_until = -math.inf
            self._poke()

    def want(self, bucket: int) -> None:
        """(Any thread.) Receive `bucket`'s keys from now on: the thread LISTENs on its
        channel at its next turn (poked now) and then calls `heard({bucket})`."""
        with self._want_lock:
            self._unwanted_at.pop(bucket, None)
            if bucket in self._wanted:
                return
            self._wanted.add(bucket)
            self._want_changed = True
        self._asleep_until = -math.inf
        self._poke()

    def unwant(self, bucket: int) -> None:
        """(Any thread.) `bucket`'s keys are no longer needed here: its channel is
        UNLISTENed `UNLISTEN_AFTER_SECONDS` later, unless wanted again meanwhile."""
        with self._want_lock:
            if bucket in self._wanted:
                self._wanted.discard(bucket)
                self._unwanted_at[bucket] = time.monotonic()

    def listens_on(self, bucket: int) -> bool:
        """(Any thread.) Whether the LISTEN on `bucket`'s channel is in effect."""
        return self.listening.is_set() and bucket in self._listened

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._poke()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _poke(self) -> None:
        with self._pipe_lock:
            if self._pipe_open:
                self.pokes += 1
                with contextlib.suppress(BlockingIOError):  # full: it is woken anyway
                    os.write(self._wake_w, b"!")

    def _running(self) -> bool:
        return not self._stop.is_set() and self._alive()

    def _connect(self) -> psycopg.Connection[Any]:
        """A connection of the engine's, detached from its pool, in autocommit mode."""
        fairy = self._engine.raw_connection()
        fairy.detach()
        conn = fairy.dbapi_connection
        if not isinstance(conn, psycopg.Connection):
            fairy.close()
            raise TypeError("LISTEN/NOTIFY needs the psycopg (3) driver: postgresql+psycopg://")
        conn.rollback()  # the pool's ping may have begun a transaction
        conn.autocommit = True
        return conn

    # -- the thread -------------------------------------------------------------

    def _loop(self) -> None:
        """Connect, LISTEN, then serve both ends until stopped; reconnect with backoff."""
        delay = 0.2
        try:
            while self._running():
                conn: psycopg.Connection[Any] | None = None
                try:
                    conn = self._connect()
                    conn.execute("LISTEN " + CHANNEL)  # a constant identifier
                    with self._want_lock:
                        buckets = set(self._wanted)
                        self._want_changed = False
                    for bucket in sorted(buckets):
                        conn.execute("LISTEN " + bucket_channel(bucket))  # ditto
                    self._listened = frozenset(buckets)
                    self.listening.set()
                    delay = 0.2
                    self._deliver([(None, 1)], {})  # anything sent while we were not listening
                    if buckets:
                        self._heard(buckets)
                    self._serve(conn)
                except TypeError as exc:
                    log.warning("coordinators will not wake each other: %s", exc)
                    return
                except (psycopg.Error, OSError) as exc:
                    if self._running():
                        log.warning(
                            "relay connection lost (%s); reconnecting in %.1f s",
                            type(exc).__name__,
                            delay,
                        )
                finally:
                    self.listening.clear()
                    self._listened = frozenset()
                    if conn is not None:
                        _close(conn)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
        finally:
            with self._pipe_lock:
                self._pipe_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _serve(self, conn: psycopg.Connection[Any]) -> None:
        """One thread, one connection, both ends: poll the connection's socket (other
        coordinators' notifications) and the wake pipe (keys published here); read what
        came, and send what is due. The notifications of this coordinator's own
        `pg_notify` come back to its own session in the answer to that statement
        (PostgreSQL delivers a session's notifications to itself too): read there, they
        cost no wake-up of their own. Raises what the connection raises."""
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN)  # this thread's connection
        poller.register(self._wake_r, select.POLLIN)
        keys: Counter[str] = Counter()  # held, to send in one transaction
        views: dict[str, object] = {}  # their views, if any
        buckets: dict[str, int] = {}  # the bucket of each that has one
        send_at: float | None = None  # when what is held goes out
        while self._running():
            if self._want_changed or (self._unwanted_at and self._unlisten_due()):
                self._relisten(conn)
            now = time.monotonic()
            wait = POLL_SECONDS if send_at is None else max(0.0, send_at - now)
            self._asleep_until = now + wait
            if not self._outbox.empty():  # published before the line above: no poke came
                wait = 0.0
            try:
                ready = poller.poll(wait * 1000)
            finally:
                self._asleep_until = -math.inf
            if any(fd == self._wake_r for fd, _ in ready):
                with contextlib.suppress(OSError):
                    while os.read(self._wake_r, 4096):
                        pass
            if any(fd != self._wake_r for fd, _ in ready):
                self.wakes += 1
                self._read(conn)
            while True:  # take what was published
                try:
                    key, deferrable, view, bucket = self._outbox.get_nowait()
                except queue.Empty:
                    break
                keys[key] += 1
                if view is not None:
                    views[key] = view
                if bucket is not None:
                    buckets[key] = bucket
                now = time.monotonic()
                # A key that may not wait goes after a moment for company; deferrable
                # ones wait up to `DEFER_SECONDS` for one that may not.
                due = now + (DEFER_SECONDS if deferrable else LINGER_SECONDS)
                send_at = due if send_at is None else min(send_at, due)
            if keys and (len(keys) >= MAX_BATCH or time.monotonic() >= (send_at or 0.0)):
                self._send(conn, keys, views, buckets)
                keys, views, buckets, send_at = Counter(), {}, {}, None
                self._read(conn)  # what came with the answer: our own, and maybe others'

    def _unlisten_due(self) -> bool:
        with self._want_lock:
            at = min(self._unwanted_at.values(), default=math.inf)
        return at + UNLISTEN_AFTER_SECONDS <= time.monotonic()

    def _relisten(self, conn: psycopg.Connection[Any]) -> None:
        """LISTEN on the buckets newly wanted (then `heard` them), UNLISTEN those unwanted
        for `UNLISTEN_AFTER_SECONDS`. Raises what the connection raises."""
        now = time.monotonic()
        with self._want_lock:
            wanted = set(self._wanted)
            self._want_changed = False
            stale = {b for b, at in self._unwanted_at.items() if now - at >= UNLISTEN_AFTER_SECONDS}
            for bucket in stale:
                del self._unwanted_at[bucket]
        new = wanted - self._listened
        for bucket in sorted(new):
            conn.execute("LISTEN " + bucket_channel(bucket))  # a constant identifier
        for bucket in sorted(stale & self._listened):
            conn.execute("UNLISTEN " + bucket_channel(bucket))  # ditto
        self._listened = frozenset((self._listened | new) - stale)
        if new:
            self._heard(new)

    def _read(self, conn: psycopg.Connection[Any]) -> None:
        """Take the notifications already received or waiting on the socket (never
        blocks) and deliver the other coordinators' together."""
        payloads = [note.payload for note in conn.notifies(timeout=0.0)]
        if payloads and self._received(payloads):
            self.packets += 1

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

    def _send(
        self,
        conn: psycopg.Connection[Any],
        keys: Counter[str],
        views: dict[str, object],
        buckets: dict[str, int],
    ) -> None:
        """Send `keys` (each after its view, if any may go; each on its bucket's channel,
        if it has one) in one transaction. If the connection fails they are dropped (the
        other coordinators' long-polls re-check the store anyway) and the error goes up:
        the thread reconnects."""
        # PostgreSQL folds identical payloads of one transaction: count repeats. The
        # arrays go in binary (`%b`): as text, psycopg quoted and escaped every element
        # with a regular expression, an ended job's JSON view most of all (since
        # session 13: relay thread 0.23 -> 0.13 CPU-ms per job with one coordinator).
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
        try:
            conn.execute(
                "SELECT pg_notify(c, p) FROM unnest(%b::text[], %b::text[]) AS t(c, p)",
                (channels, payloads),
            )
        except (psycopg.Error, OSError) as exc:
            log.warning("could not relay %d wake-ups (%s)", len(keys), type(exc).__name__)
            raise
        self.publishes += 1
        self.sent += len(keys)


def _close(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error, OSError):
        conn.close()
