"""Notifier feeds: items announced on a topic reach its followers coalesced, bounded, and
as a resync when notifications may have been lost; other topics never see them."""

from __future__ import annotations

import asyncio

from csml.coordinator import notify
from csml.coordinator.notify import Notifier, feed_key


def test_a_feed_gets_its_topics_items_coalesced() -> None:
    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        with n.follow("owner:a") as mine, n.follow("owner:b") as theirs:
            for item in ["j1", "j2", "j1"]:
                n.notify(feed_key("owner:a", item))
            assert mine.event.is_set() and not theirs.event.is_set()
            assert mine.take() == ({"j1", "j2"}, False)
            assert not mine.event.is_set()
            n._deliver(None)  # what the relay does after losing its connection
            assert mine.take() == (set(), True) and theirs.take() == (set(), True)

    asyncio.run(run())


def test_an_overflowing_feed_asks_for_a_resync() -> None:
    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        with n.follow("t") as feed:
            for i in range(notify.FEED_MAX_PENDING + 5):
                n.notify(feed_key("t", str(i)))
            items, resync = feed.take()
            assert resync and items == set()

    asyncio.run(run())


def test_listeners_see_their_prefix_and_losses() -> None:
    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        seen: list[str | None] = []
        n.listen("erased:", seen.append)
        n.notify("erased:x")
        n.notify("job:y")
        n._deliver(None)
        assert seen == ["erased:x", None]

    asyncio.run(run())


def test_a_change_that_may_end_a_job_is_urgent_and_coalesces_with_the_others() -> None:
    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        with n.follow(notify.owner_feed("a")) as feed:
            n.notify(notify.owner_change("a", "j1"))  # submitted, running, progress
            assert feed.event.is_set() and not feed.urgent.is_set()
            n.notify(notify.owner_change("a", "j1", ending=True))  # completed, cancelled
            assert feed.urgent.is_set()
            assert feed.take() == ({"j1"}, False)  # one item, without the mark
            assert not feed.urgent.is_set()
            n._deliver(None)  # a resync is urgent too
            assert feed.urgent.is_set() and feed.take() == (set(), True)

    asyncio.run(run())
