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


def test_a_view_stays_with_its_item_unless_news_without_one_follows() -> None:
    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        with n.follow("t") as feed, n.follow("u") as other:
            n.notify(feed_key("t", "a") + notify.ENDING_MARK, "view-a")  # an end, with its view
            n.notify(feed_key("t", "b"))  # news without a view
            n.notify(feed_key("t", "b"), "view-b")  # a final state: newer than b's news
            n.notify(feed_key("t", "c"), "view-c1")
            n.notify(feed_key("t", "c"), "view-c2")  # a newer view replaces it
            n.notify(feed_key("t", "d"), "view-d")
            n.notify(feed_key("t", "d"))  # newer news without a view: read d
            n.notify(feed_key("u", "x"), "view-x")
            assert feed.urgent.is_set()
            items, resync, views = feed.take_views()
            assert (items, resync) == ({"a", "b", "c", "d"}, False)
            assert views == {"a": "view-a", "b": "view-b", "c": "view-c2"}
            assert feed.take_views() == (set(), False, {})
            n.notify(feed_key("t", "a"), "again")
            n._deliver(None)  # a resync drops the views with the items
            assert feed.take_views() == (set(), True, {})
            assert other.take_views() == (set(), True, {})  # the resync reached it after x

    asyncio.run(run())


def record_hops(n: Notifier) -> list[list[tuple[str | None, int, object]]]:
    """The packets of relayed keys that hop to `n`'s loop (`_wake_many`), as they come."""
    hops: list[list[tuple[str | None, int, object]]] = []
    wake_many = n._wake_many

    def spy(keys: list[tuple[str | None, int, object]]) -> None:
        hops.append(list(keys))
        wake_many(keys)

    n._wake_many = spy  # type: ignore[method-assign]
    return hops


def test_a_relayed_packet_wakes_the_loop_once_and_only_for_followed_keys() -> None:
    """What the relay hands over from its thread: marks and watchers for every key, one
    hop to the loop for the keys someone here follows, nothing for the others."""

    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        watched: list[str | None] = []
        n.watch("job:", watched.append)
        hops = record_hops(n)
        packet: list[tuple[str | None, int]] = [
            ("app:echo", 2),  # a claimer waits here
            ("app:other", 1),  # nobody claims it here: counted only
            ("job:elsewhere", 1),  # no long-poll here: the watcher only
            (feed_key("owner:a", "j1"), 1),  # followed here
            (feed_key("owner:b", "j2"), 1),  # nobody follows owner:b here
        ]
        with n.subscribe("app:echo") as claimer, n.follow("owner:a") as feed:
            await asyncio.to_thread(n._deliver_many, packet)
            await asyncio.sleep(0)
            assert hops == [[("app:echo", 2, None), (feed_key("owner:a", "j1"), 1, None)]]
            assert claimer.is_set() and feed.take() == ({"j1"}, False)
            assert watched == ["job:elsewhere"]
            assert n.mark("app:other") == (1, 0) and n.mark("app:echo") == (2, 0)
            hops.clear()
            await asyncio.to_thread(n._deliver_many, [("job:elsewhere", 1)])
            await asyncio.sleep(0)
            assert hops == []  # nothing followed: the loop is not woken
            await asyncio.to_thread(n._deliver_many, [(None, 1)])  # lost: always delivered
            await asyncio.sleep(0)
            assert hops == [[(None, 1, None)]] and feed.take() == (set(), True)

    asyncio.run(run())


class _Outbox:
    """Stands for the PostgreSQL relay: records what `notify` publishes."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bool]] = []

    def publish(
        self, key: str, *, deferrable: bool = False, view: object = None, bucket: int | None = None
    ) -> None:
        self.published.append((key, deferrable))

    def close(self) -> None:
        pass


def test_what_may_wait_on_its_way_to_the_other_coordinators() -> None:
    """Deferrable: an owner's change that ends nothing, and a job's wake-up taken by a
    claimer waiting here; not: an ending change, a job key, a wake-up no claimer here
    waited for (nor one that went to a subscriber busy outside `wait`)."""

    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        out = _Outbox()
        n._relay = out  # type: ignore[assignment]
        n.notify("owner:a/j1")
        n.notify("owner:a/j1" + notify.ENDING_MARK)
        n.notify("job:j1")
        n.notify("app:echo")  # nobody here
        with n.subscribe("app:echo") as busy:
            n.notify("app:echo")  # subscribed, but not inside wait(): not sure to take it
            assert busy.is_set()
            busy.clear()
            with n.subscribe("app:echo") as other:
                waits = [asyncio.ensure_future(n.wait(e, 5)) for e in (busy, other)]
                await asyncio.sleep(0)
                n.notify("app:echo", times=3)  # two waiting claimers, one wake-up left over
                assert await asyncio.gather(*waits) == [True, True]
        assert out.published == [
            ("owner:a/j1", True),
            ("owner:a/j1!", False),
            ("job:j1", False),
            ("app:echo", False),
            ("app:echo", False),
            ("app:echo", True),
            ("app:echo", True),
            ("app:echo", False),
        ]

    asyncio.run(run())


def test_a_relayed_job_wake_up_skips_the_loop_when_every_claimer_here_is_woken() -> None:
    """A relayed `app:` key whose claimers here are all woken already (each claims once
    it runs, after the key's commit) would wake none of them: it is counted (marks) but
    costs the loop no hop. Once one of them waits again, the next key hops and wakes it.
    Before, every relayed key with a claimer subscribed here woke the loop."""

    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        hops = record_hops(n)
        with n.subscribe("app:echo") as first, n.subscribe("app:echo") as second:
            first.set()
            second.set()  # both woken, neither has run yet
            await asyncio.to_thread(n._deliver_many, [("app:echo", 1)])
            await asyncio.sleep(0)
            assert hops == [] and n.hops == 0
            assert n.mark("app:echo") == (1, 0)  # counted all the same
            second.clear()  # it ran, found nothing, and waits again
            await asyncio.to_thread(n._deliver_many, [("app:echo", 1)])
            await asyncio.sleep(0)
            assert hops == [[("app:echo", 1, None)]] and second.is_set()
            assert n.idle_hops == 0

    asyncio.run(run())
