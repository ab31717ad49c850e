"""Wake long-polls when something they wait for happens, here or on another coordinator.

Waiters subscribe to a key (`app:<name>` for claims, `job:<id>` for clients).
`notify(key)` wakes this process's waiters at once; on PostgreSQL it also
relays the key with NOTIFY (see `notify_pg`), so coordinators sharing the
database wake theirs within milliseconds. On SQLite everything stays in this
process. Long-polls still re-check the store every `recheck_seconds`, a
safety net for a lost notification (e.g. while the LISTEN connection was down).

An `app:` key means one more job to claim, so it wakes one idle claimer (the
longest waiting), not all of them: with 16 idle workers, waking all made 16
claim transactions per job, 15 of them for nothing. A woken claimer that finds
nothing lost no job: someone else claimed it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from csml.coordinator.notify_pg import PgRelay

log = logging.getLogger("csml.coordinator.notify")

WAKE_ONE_PREFIX = "app:"  # one job queued: one claimer to wake
LOCAL_RECHECK_SECONDS = 0.5
RELAYED_RECHECK_SECONDS = 5.0


class Notifier:
    def __init__(self, engine: Engine | None = None) -> None:
        """With a PostgreSQL `engine`, wake-ups are relayed between coordinators."""
        # Per key, the waiters in subscription order (a dict as an ordered set).
        self._waiters: defaultdict[str, dict[asyncio.Event, None]] = defaultdict(dict)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine = engine
        self._relay: PgRelay | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the event loop; on PostgreSQL, start relaying (until the loop closes)."""
        self._loop = loop
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if self._engine is not None and self._engine.dialect.name == "postgresql":
            try:
                from csml.coordinator.notify_pg import PgRelay
            except ImportError as exc:  # another driver than psycopg 3
                log.warning("coordinators will not wake each other: %s", exc)
                return
            self._relay = PgRelay(self._engine, self._deliver, alive=lambda: not loop.is_closed())

    def close(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay = None

    @property
    def relay(self) -> PgRelay | None:
        return self._relay

    @property
    def recheck_seconds(self) -> float:
        """How often a long-poll should re-check the store while no wake-up comes."""
        if self._relay is not None and self._relay.listening.is_set():
            return RELAYED_RECHECK_SECONDS
        return LOCAL_RECHECK_SECONDS

    @contextmanager
    def subscribe(self, key: str) -> Iterator[asyncio.Event]:
        """An event set by `notify(key)`; subscribe before checking, to miss nothing."""
        event = asyncio.Event()
        self._waiters[key][event] = None
        try:
            yield event
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.pop(event, None)
                if not waiters:
                    del self._waiters[key]

    @staticmethod
    async def wait(event: asyncio.Event, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `event`, then clear it; True if it was set."""
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            event.clear()

    def notify(self, key: str) -> None:
        """Wake `key`'s waiters here and on the other coordinators. Safe from any thread."""
        self._deliver(key)
        if self._relay is not None:
            self._relay.publish(key)

    def _deliver(self, key: str | None, times: int = 1) -> None:
        """Wake local waiters of `key` (None: every waiter), as for `times` notifications.
        Safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake(key, times)
        else:
            with suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._wake, key, times)

    def _wake(self, key: str | None, times: int = 1) -> None:
        if key is None:
            for group in self._waiters.values():
                for event in group:
                    event.set()
            return
        waiters = self._waiters.get(key)
        if not waiters:
            return
        if key.startswith(WAKE_ONE_PREFIX):
            idle = [e for e in waiters if not e.is_set()][:times]
        else:
            idle = list(waiters)
        for event in idle:
            event.set()
