"""A clock that tests set instead of sleeping.

The coordinator reads the time only through `csml.store.tables.utcnow`; `clock_set()`
makes it read a `SetClock`, which moves only when a test advances it, for the
duration of a `with` block (in this process: coordinators started as processes keep
the real clock).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from csml.store.tables import set_clock


class SetClock:
    """A clock that moves only when told to; starts at the real time."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@contextmanager
def clock_set() -> Iterator[SetClock]:
    clock = SetClock()
    previous = set_clock(clock)
    try:
        yield clock
    finally:
        set_clock(previous)
