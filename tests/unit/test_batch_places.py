"""`csml.client.batch._Places`: the items in flight of `Client.map`, and the one wake-up
per batch request of the submitting loop (not one per ended item)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from csml.client.batch import _Places


class _CountingCondition:
    """A `threading.Condition` that counts its notifications (the wake-ups it sends)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.notified = 0

    def __enter__(self) -> bool:
        return self._cond.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._cond.__exit__(*exc)

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        return self._cond.wait_for(predicate, timeout)

    def notify(self, n: int = 1) -> None:
        self.notified += 1
        self._cond.notify(n)


def test_the_loop_is_woken_once_when_the_places_it_waits_for_are_free() -> None:
    places = _Places(4)
    counting = _CountingCondition()
    places._cond = counting  # type: ignore[assignment]
    assert places.take(1, 4, None) == 4  # every place in flight
    taken: list[int] = []
    waiting = threading.Thread(target=lambda: taken.append(places.take(3, 4, 60.0)))
    waiting.start()
    while places._need != 3:  # the loop waits for 3 places
        threading.Event().wait(0.001)
    places.give()
    places.give()
    assert counting.notified == 0  # 1 and 2 free: not enough to send, nobody woken
    places.give()
    waiting.join(60)
    assert taken == [3]
    assert counting.notified == 1  # one wake-up for three ended items
    places.give()  # nobody waits: no wake-up
    assert counting.notified == 1
    assert places.take(0, 4, 0.0) == 1


def test_a_wait_that_times_out_takes_what_is_free() -> None:
    places = _Places(3)
    assert places.take(1, 3, None) == 3
    places.give()
    assert places.take(2, 3, 0.01) == 1  # 2 wanted, 1 came before the time ran out
    assert places.take(1, 3, 0.0) == 0


def test_giving_back_more_places_than_were_taken_raises() -> None:
    places = _Places(2)
    assert places.take(1, 1, None) == 1
    places.give()
    with pytest.raises(ValueError):
        places.give()
