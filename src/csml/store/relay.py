"""Relay wake-ups between coordinators sharing a PostgreSQL database (LISTEN/NOTIFY).

Two daemon threads, each on a connection of its own taken out of the engine's
pool (so it uses the same URL and connect arguments): one LISTENs on
`csml_wake` and hands each key to the local notifier; one sends the keys this
coordinator publishes, batched, with `pg_notify`. A payload is
`<origin> <key> <count>` (a key can be published several times per batch: one
wake per queued job); a coordinator ignores its own. If the LISTEN connection
drops, it reconnects with backoff and then wakes every local waiter, since
notifications sent meanwhile are lost.

Cost per coordinator grows with the others' notifications (each transaction of
`pg_notify` is a packet to every listener, a wake-up of its LISTEN thread), so both
ends batch. The sender waits up to `LINGER_SECONDS` after a key for more (a submit's
or a completion's keys are published a moment apart) and sends what it has in one
transaction; a key published as `deferrable` (the notifier's changes that end no job:
submitted, running, progress, which event streams let settle for longer anyway) waits
up to `DEFER_SECONDS` for a key that may not wait, and goes out with it. The listener
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

It lives in the store because it is SQL on the store's own connections (LISTEN and
`pg_notify`); `csml.coordinator.notify` decides what to wake and when.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
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
_ROWS: TypeAdapter[JobRow] = TypeAdapter(JobRow)


def view_text(view: object) -> str | None:
    """The JSON relayed for a view published with its key, or None (not sent)."""
    if not isinstance(view, JobRow) or view.confidential is not None:
        return None
    text = _ROWS.dump_json(view).decode()
    return text if len(text) <= VIEW_MAX_CHARS else None


def view_of(text: str) -> JobRow:
    """The ended job a view's notification carried (`view_text`'s inverse)."""
    return _ROWS.validate_json(text)


class PgRelay:
    def __init__(
        self,
        engine: Engine,
        deliver: Callable[[list[tuple[str | None, int]], dict[str, str]], None],
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        """`deliver([(key, times), ...], views)` wakes local waiters as for `times`
        notifications of each `key` (None: every waiter), in order; `views` holds, by
        key, the JSON of an ended job's view that came with it (`view_of` decodes it). It
        is called once per packet of notifications received. The threads end once
        `alive()` is false or `close()` is called."""
        self.origin = secrets.token_hex(8)
        self.listening = threading.Event()  # LISTEN is active: other coordinators reach us
        # Counts for /metrics, the benchmarks and tests (each written by one thread):
        self.received = 0  # notifications (keys) from other coordinators
        self.packets = 0  # reads of the LISTEN socket that brought notifications
        self.sent = 0  # keys sent (a key published n times in one batch counts once)
        self.publishes = 0  # pg_notify transactions
        self._engine = engine
        self._deliver = deliver
        self._alive = alive
        self._stop = threading.Event()
        self._outbox: queue.SimpleQueue[tuple[str, bool, object]] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._listen_loop, name="csml-pg-listen", daemon=True),
            threading.Thread(target=self._publish_loop, name="csml-pg-notify", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def publish(self, key: str, *, deferrable: bool = False, view: object = None) -> None:
        """Queue `key` for the other coordinators (never blocks). `deferrable`: it may wait
        up to `DEFER_SECONDS` for company (it goes with the next key that may not).
        `view`: the ended job the key announces (a `JobRow`), relayed with it when it may
        be (`view_text`)."""
        self._outbox.put((key, deferrable, view))

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

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

    # -- receiving ------------------------------------------------------------

    def _listen_loop(self) -> None:
        delay = 0.2
        while self._running():
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = self._connect()
                conn.execute("LISTEN " + CHANNEL)  # a constant identifier
                self.listening.set()
                delay = 0.2
                self._deliver([(None, 1)], {})  # anything sent while we were not listening
                while self._running():
                    # One packet's notifications at a time (`stop_after=1` returns after
                    # the first read from the socket, with all it brought), delivered
                    # together.
                    notes = conn.notifies(timeout=POLL_SECONDS, stop_after=1)
                    payloads = [note.payload for note in notes]
                    if payloads:
                        self.packets += 1
                        self._received(payloads)
            except TypeError as exc:
                log.warning("coordinators will not wake each other: %s", exc)
                return
            except (psycopg.Error, OSError) as exc:
                if self._running():
                    log.warning(
                        "LISTEN connection lost (%s); reconnecting in %.1f s",
                        type(exc).__name__,
                        delay,
                    )
            finally:
                self.listening.clear()
                if conn is not None:
                    _close(conn)
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def _received(self, payloads: list[str]) -> None:
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
        if keys:
            self.received += len(keys)
            announced = {k for k, _ in keys}
            self._deliver(keys, {k: v for k, v in views.items() if k in announced})

    # -- sending --------------------------------------------------------------

    def _publish_loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        keys: Counter[str] = Counter()  # held, to send in one transaction
        views: dict[str, object] = {}  # their views, if any
        send_by: float | None = None  # when the deferrable keys held must go out
        try:
            while self._running():
                wait = POLL_SECONDS if send_by is None else send_by - time.monotonic()
                try:
                    key, deferrable, view = self._outbox.get(timeout=max(0.0, wait))
                except queue.Empty:
                    if send_by is not None and time.monotonic() >= send_by:
                        conn = self._send(conn, keys, views)
                        keys, views, send_by = Counter(), {}, None
                    continue
                keys[key] += 1
                if view is not None:
                    views[key] = view
                if deferrable and len(keys) < MAX_BATCH:
                    if send_by is None:
                        send_by = time.monotonic() + DEFER_SECONDS
                    if time.monotonic() < send_by:
                        continue
                # A key that may not wait (or the deferred ones' time): a moment for
                # company, then everything held goes out together.
                until = time.monotonic() + LINGER_SECONDS
                while len(keys) < MAX_BATCH:
                    try:
                        more, _, more_view = self._outbox.get(
                            timeout=max(0.0, until - time.monotonic())
                        )
                    except queue.Empty:
                        break
                    keys[more] += 1
                    if more_view is not None:
                        views[more] = more_view
                conn = self._send(conn, keys, views)
                keys, views, send_by = Counter(), {}, None
        except TypeError:
            return  # said once by the listener
        finally:
            if conn is not None:
                _close(conn)

    def _send(
        self,
        conn: psycopg.Connection[Any] | None,
        keys: Counter[str],
        views: dict[str, object],
    ) -> psycopg.Connection[Any] | None:
        """Send `keys` (each after its view, if any may go) in one transaction; the
        connection to use next (None: reconnect)."""
        # PostgreSQL folds identical payloads of one transaction: count repeats.
        payloads = []
        for k, n in sorted(keys.items()):
            text = view_text(views[k]) if k in views else None
            if text is not None:
                payloads.append(f"{self.origin} {VIEW_MARK}{k} {text}")
            payloads.append(f"{self.origin} {k} {n}")
        try:
            if conn is None:
                conn = self._connect()
            conn.execute(
                "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (CHANNEL, payloads)
            )
            self.publishes += 1
            self.sent += len(keys)
            return conn
        except (psycopg.Error, OSError) as exc:
            # Dropped: the other coordinators' long-polls re-check the store anyway.
            log.warning("could not relay %d wake-ups (%s)", len(keys), type(exc).__name__)
            if conn is not None:
                _close(conn)
            self._stop.wait(0.5)
            return None


def _close(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error, OSError):
        conn.close()
