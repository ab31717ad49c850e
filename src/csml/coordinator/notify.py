"""Wake long-polls in this process when something they wait for happens.

Other coordinators sharing the database are not told; long-polls therefore
also re-check the store on a short interval.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Notifier:
    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @contextmanager
    def subscribe(self, key: str) -> Iterator[asyncio.Event]:
        """An event set by `notify(key)`; subscribe before checking, to miss nothing."""
        event = asyncio.Event()
        self._waiters[key].add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(event)
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
        """Safe to call from any thread."""
        if self._loop is None or self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wake(key)
        else:
            self._loop.call_soon_threadsafe(self._wake, key)

    def _wake(self, key: str) -> None:
        for event in self._waiters.get(key, ()):
            event.set()
