"""Hand-over: a request that woke someone lets the woken coroutines run their next step
before it answers (a claimer takes the job, a stream pushes the result), and never waits
on one that does not run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from csml.coordinator import notify
from csml.coordinator.notify import Notifier, app_key, job_key


async def _answer_after_notify(n: Notifier, key: str, order: list[str]) -> None:
    n.notify(key)
    await n.hand_over()
    order.append("answered")


def test_a_woken_claimer_runs_before_the_notifying_request_answers() -> None:
    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        order: list[str] = []
        with n.subscribe(app_key("echo")) as event:

            async def claimer() -> None:
                if await n.wait(event, 5):
                    order.append("claimed")

            task = asyncio.create_task(claimer())
            await asyncio.sleep(0)  # it waits now
            await _answer_after_notify(n, app_key("echo"), order)
            await task
        assert order == ["claimed", "answered"]

    asyncio.run(run())


def test_a_stream_pushes_an_ending_change_before_the_notifying_request_answers() -> None:
    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        order: list[str] = []
        with n.follow(notify.owner_feed("a")) as feed:

            async def stream() -> None:
                await feed.urgent.wait()
                items, _ = feed.take()
                order.append(f"pushed {sorted(items)}")

            task = asyncio.create_task(stream())
            await asyncio.sleep(0)
            await _answer_after_notify(n, notify.owner_change("a", "j1", ending=True), order)
            await task
        assert order == ["pushed ['j1']", "answered"]

    asyncio.run(run())


def test_hand_over_is_bounded_when_the_woken_does_not_run() -> None:
    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        turns = 0

        async def count() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count())
        # Subscribed but not waiting (e.g. busy elsewhere), and a stream never taking.
        with n.subscribe(job_key("j")), n.follow(notify.owner_feed("a")):
            n.notify(job_key("j"))
            n.notify(notify.owner_change("a", "j", ending=True))
            await asyncio.sleep(0)
            before = turns
            await n.hand_over()
            assert turns - before <= notify.HAND_OVER_YIELDS + 1
            await n.hand_over()  # still not run: bounded again, never a wait
        await n.hand_over()  # both left: nothing to hand over, no turn given
        counter.cancel()

    asyncio.run(run())


def test_nothing_woken_means_no_turn_given() -> None:
    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        ran = False

        async def other() -> None:
            nonlocal ran
            ran = True

        task = asyncio.create_task(other())
        n.notify(app_key("nobody-waits"))
        n.notify(notify.owner_change("a", "j", ending=True))  # no stream follows it
        await n.hand_over()
        assert not ran  # hand_over returned without yielding to the loop
        await task

    asyncio.run(run())


def test_claim_wakes_are_counted_by_origin_and_those_that_took_nothing() -> None:
    """/metrics counts the claimers a job's wake-up woke, here or relayed, and those that
    found nothing (`pass_on`); a wake passed on counts again for the one woken next."""

    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        key = app_key("echo")
        with n.subscribe(key) as first, n.subscribe(key) as second:
            n.notify(key)  # local: wakes the first
            assert first.is_set() and not second.is_set()
            n._wake_many([(key, 1, None)])  # as the relay's packet: wakes the second
            assert second.is_set()
            assert n.claim_wakes == {"local": 1, "relayed": 1}
            assert n.claim_wakes_empty == {"local": 0, "relayed": 0}
            first.clear()
            second.clear()
            assert n.pass_on(key, first)  # nothing for the first: the second's turn
            assert second.is_set()
            assert n.claim_wakes == {"local": 2, "relayed": 1}
            assert n.claim_wakes_empty == {"local": 1, "relayed": 0}
            assert not n.pass_on(key, second)  # nobody after it
            assert n.claim_wakes_empty == {"local": 2, "relayed": 0}

    asyncio.run(run())


def test_a_woken_waiter_busy_elsewhere_gets_no_turn() -> None:
    """A claimer subscribed but not inside `wait` (its claim's write is committing) runs
    its next step only when that ends: the request that woke it yields nothing to it
    (it used to yield `HAND_OVER_YIELDS` loop turns, at every submission and completion
    while a claim was busy), for a wake-one key, a long-poll's key and a passed-on wake."""

    async def run() -> None:
        n = Notifier()
        n.bind(asyncio.get_running_loop())
        ran: list[str] = []

        async def other(name: str) -> None:
            ran.append(name)

        claim_key = app_key("echo")
        with (
            n.subscribe(claim_key) as busy,
            n.subscribe(claim_key) as next_busy,
            n.subscribe(job_key("j")) as poll,
        ):
            wakes: list[tuple[str, Callable[[], object]]] = [
                ("claim", lambda: n.notify(claim_key)),
                ("long-poll", lambda: n.notify(job_key("j"))),
                ("passed on", lambda: n.pass_on(claim_key, busy)),
            ]
            for name, notify_it in wakes:
                task = asyncio.create_task(other(name))
                notify_it()
                await n.hand_over()
                assert ran == [], name  # hand_over returned without yielding to the loop
                await task
                ran.clear()
            assert busy.is_set() and next_busy.is_set() and poll.is_set()

    asyncio.run(run())
