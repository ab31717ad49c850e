"""Wake long-polls when something they wait for happens, here or on another coordinator.

Waiters subscribe to a key (`app:<name>` for claims, `job:<id>` for clients).
`notify(key)` wakes this process's waiters at once; on PostgreSQL it also
relays the key with NOTIFY (see `csml.store.relay`), so coordinators sharing the
database wake theirs within milliseconds. On SQLite everything stays in this
process. Long-polls still re-check the store every `recheck_seconds`, a
safety net for a lost notification (e.g. while the LISTEN connection was down).

An `app:` key means one more job to claim, so it wakes one idle claimer (the
longest waiting), not all of them: with 16 idle workers, waking all made 16
claim transactions per job, 15 of them for nothing. The woken claimer takes
at once, without first probing the queue: it was woken for a job. One that then finds
nothing for it (someone else claimed the job, or the job is not for it: a placement
requirement, a contributed worker's filters) probes, and if nothing waits for it,
`pass_on` wakes the next idle claimer after it, so a job never sits queued while a
claimer that could take it waits (each idle claimer is tried at most once per wake).

Feeds: a key `<topic>/<item>` (see `feed_key`) also adds `item` to the pending set
of every `Feed` following `topic` (e.g. `owner:<identity>/<job id>`: that job of
that identity changed). A feed coalesces (an item pending twice is read once) and
is bounded: past `FEED_MAX_PENDING` items, or when the relay may have lost
notifications, it is marked `resync` (its reader re-reads everything) instead of
growing. An item announced with `ENDING_MARK` (`owner_change(..., ending=True)`: a
completion, cancel or reap, which may have ended the job) also sets the feed's
`urgent` event, as a resync does; its reader answers those at once and may let the
other changes (submitted, running, progress) settle first.
A key may be notified with a view of its item's final state (`notify(key, view)`: the
ended job its coordinator just committed, which changes no more), delivered to this
process's feeds and, on PostgreSQL, relayed with the key when the relay may carry it
(a plain job's row of bounded size, `csml.store.relay.view_text`; decoded on the other
coordinators only for a feed following its topic): the feed keeps it with its item
(`take_views`), so the reader need not read the item again. News of the item pending
before it is older (the item had not reached its final state), so the view stands for
it; news without a view arriving after it (e.g. a progress whose notification was
delivered late), or a resync, drops it: the reader then reads the item, as it would
have without a view.
Marks (`mark(key)`): how many times an `app:` or `keys:` key was delivered here, and
how many times notifications may have been lost; equal marks before and after tell a
claim that no job was announced meanwhile (see `csml.coordinator.queue`). A batch of
jobs is announced with `notify(key, times=n)`: n wake-ups, n marks.
Interest-filtered relaying (since session 12): an owner feed's key
(`owner:<id>/<job>`) is relayed on the channel of its topic's bucket (`feed_bucket`:
crc32 of the topic, one of `FEED_BUCKETS`), and this process's relay LISTENs on a bucket
only while a feed here follows a topic of it (and `UNLISTEN_AFTER_SECONDS` after): with N
coordinators, the others' owner keys for clients streaming elsewhere are not received at
all. The other keys (`app:`, `keys:`, `job:` but a completion's, `erased:`) still go to
every coordinator: marks, the lease memo's watcher and the identity cache's listener
need them. A feed
that follows a topic whose bucket is not yet listened to may miss a key sent before the
LISTEN takes effect: when it has (`Feed.heard` is set then), the feed gets a resync (its
reader re-reads the store, after that LISTEN). A listener or watcher whose prefix could
match an owner key makes the relay listen on every bucket (none does today).
A completion's `job:` key goes on its owner's bucket too (`notify(key, topic=)`): the
only ones elsewhere that need it are that owner's long-polls on the job, which
subscribe with the topic (`subscribe(key, topic)`, then `await heard(topic)` before
reading the store), and no lease memo (`csml.coordinator.lease_memo`) needs it: the lease's
holder completed the job and beats it no more. Cancels, reaps and requeues that are not
a completion still announce `job:` keys to every coordinator.
Hang-ups: a long request's handler waits on an event that `watch_hang_up` also sets
when its client disconnects (one task per request, no polling).
Watchers (`watch(prefix, callback)`) are called at once, in the thread that delivers
(the notifying one; the relay's, on the loop), for every key with that prefix, and with
None when notifications may have been lost: for caches that a change must invalidate
before anyone can read them again (the queue's lease memo).
Listeners (`listen(prefix, callback)`) see every key with that prefix delivered
here, local or relayed, and None when notifications may have been lost.

The relay (`csml.store.relay`) runs on the event loop (since session 15; a thread of its
own before): a packet of other coordinators' keys is read there and handed over in one
call (`_deliver_many`), with no hop. A key nobody here follows is dropped: marks and
watchers are done, and waiters are woken only for keys with a listener, a subscribed
waiter (for a wake-one key, one not woken already: since session 13) or a following
feed (`_wanted`). Delivery from another thread (a writer's, the thread pool's) does the
same there and wakes the loop (`call_soon_threadsafe`) only for keys someone follows,
once per call. With N coordinators each hears the others' keys, most of them for jobs
whose clients wait elsewhere, so this is what keeps a coordinator's cost per job from
growing with N. Dropping is safe because
a key is notified after the commit it announces: whoever subscribes or follows after
the drop checks the store after that commit (the subscribe-before-checking rule).
Sending costs the others too (each relayed transaction is a packet read by every other
coordinator): an owner's change that ends no job (submitted, running, progress) is
published as deferrable, and waits on its way out up to
`csml.store.relay.DEFER_SECONDS` for a key that may not wait; event streams let such
changes settle for longer than that anyway. So is a job's `app:` wake-up that went to
a claimer here waiting in `wait` (it takes the job at once; the other coordinators'
claimers are still told, for when it cannot).

Early: `notify_early(app_key)` wakes a claimer waiting here for a job whose write is in
a one-lane writer's queue but not yet committed (SQLite, no relay): its claim's write
queues behind the job's and sees it, usually in the same transaction; nothing is
answered before that commit. If the job's write fails, `withdraw` keeps that claimer's
finding nothing from waking another (`pass_on`).

Hand-over: a request that woke someone (a claimer for the job it queued, a client's
stream or long-poll for the job it ended) calls `await hand_over()` before answering,
so the woken coroutines run their next step (take the job, push the result) before
this request's own response is built and written: the response goes to a caller that
is not waiting on the job's path (the SDK that just submitted, the worker that just
completed). The notifier keeps the waiters and urgent feeds it woke that have not run
yet (a waiter runs when its `wait()` returns, a feed when it is taken; leaving forgets
either); `hand_over` yields to the loop until none is left, at most
`HAND_OVER_YIELDS` times, so a woken one that does not run soon (a stream stalled on a
slow client) costs a request a few loop turns, never a wait. Only a waiter woken inside
`wait` is kept: one subscribed but busy elsewhere (a claim whose write is committing,
the usual case under load) runs its next step only when that ends, whatever a request
yields meanwhile, so handing over to it would cost every request `HAND_OVER_YIELDS`
loop turns for nothing (it was ~17 loop turns per job in bench (a)).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from csml.store.relay import PgRelay

log = logging.getLogger("csml.coordinator.notify")

WAKE_ONE_PREFIX = "app:"  # one job queued: one claimer to wake
MARKED_PREFIXES = ("app:", "keys:")  # keys whose deliveries are counted (`Notifier.mark`)
LOCAL_RECHECK_SECONDS = 0.5
RELAYED_RECHECK_SECONDS = 5.0
FEED_SEPARATOR = "/"
FEED_MAX_PENDING = 10_000
ENDING_MARK = "!"  # after a feed item: a change that may have ended the job (never in an id)
OWNER_PREFIX = "owner:"  # the topics of identities' job changes (`owner_feed`)
HAND_OVER_YIELDS = 8  # loop turns a request gives the coroutines it woke, at most
FEED_BUCKETS = 128  # relay channels the owner feeds' keys are spread over (`feed_bucket`)
HEAR_SECONDS = 2.0  # how long `heard` waits for the relay to listen on a bucket, at most


def watch_hang_up(
    receive: Callable[[], Awaitable[Mapping[str, Any]]], event: asyncio.Event
) -> asyncio.Task[None]:
    """(On the loop.) A task that ends when the client of a long request (a long-poll,
    an event stream) hangs up, and then sets `event`, the one its handler waits on.
    `receive` is the request's ASGI receive, its body already read: the next message is
    the disconnect. One task per request instead of a `Request.is_disconnected` poll per
    wake-up (each a cancel scope and a loop turn); the caller cancels it when done."""

    async def hung_up() -> None:
        with suppress(Exception):  # the connection's receive failed: gone as well
            while (await receive())["type"] != "http.disconnect":
                pass
        event.set()

    return asyncio.ensure_future(hung_up())


@contextmanager
def watching_hang_up(
    receive: Callable[[], Awaitable[Mapping[str, Any]]], event: asyncio.Event
) -> Iterator[asyncio.Task[None]]:
    """`watch_hang_up` for the duration of a block (the task is cancelled after it)."""
    task = watch_hang_up(receive, event)
    try:
        yield task
    finally:
        task.cancel()


def feed_key(topic: str, item: str) -> str:
    """The key that tells `topic`'s feeds about `item` (neither may hold the separator)."""
    return f"{topic}{FEED_SEPARATOR}{item}"


def app_key(app: str) -> str:
    """The key that wakes workers waiting for jobs of `app`."""
    return f"app:{app}"


def keys_key(app: str) -> str:
    """The key announcing a job of `app` with a placement requirement (no one waits on it:
    it moves `mark(keys_key(app))`, see `Notifier.mark`)."""
    return f"keys:{app}"


def job_key(job_id: str) -> str:
    """The key that wakes long-polls waiting on one job."""
    return f"job:{job_id}"


def feed_bucket(topic: str) -> int | None:
    """The relay bucket of a topic's keys (the same on every coordinator), or None: its
    keys go to every coordinator. Only owner feeds have one (see the module)."""
    if not topic.startswith(OWNER_PREFIX):
        return None
    return zlib.crc32(topic.encode()) % FEED_BUCKETS


def _owner_key(key: str) -> tuple[str, str] | None:
    """(topic, item) of an owner feed's key (`owner_change`), or None for any other key."""
    if not key.startswith(OWNER_PREFIX):
        return None
    topic, sep, item = key.rpartition(FEED_SEPARATOR)
    return (topic, item) if sep else None


def _key_bucket(key: str) -> int | None:
    """`feed_bucket` of the topic of an owner feed's key (None for any other key)."""
    owned = _owner_key(key)
    return feed_bucket(owned[0]) if owned is not None else None


def owner_feed(owner_id: str) -> str:
    """The notifier topic on which an identity's job changes are announced (item: job id)."""
    return f"{OWNER_PREFIX}{owner_id}"


def owner_change(owner_id: str, job_id: str, *, ending: bool = False) -> str:
    """The key announcing that this job of this owner changed (state, progress, result);
    `ending`: the change may have ended it (followers' `Feed.urgent`)."""
    return feed_key(owner_feed(owner_id), job_id + ENDING_MARK if ending else job_id)


def owner_topics(keys: list[str]) -> dict[str, str]:
    """By job id, the owner topic of each owner change among `keys` (`owner_change`)."""
    topics: dict[str, str] = {}
    for key in keys:
        if (owned := _owner_key(key)) is not None:
            topic, item = owned
            topics[item.removesuffix(ENDING_MARK)] = topic
    return topics


def _decoded(text: str) -> object:
    """A relayed view (`csml.store.relay.view_of`), or None if it cannot be read."""
    from csml.store.relay import view_of  # only ever called by the relay: psycopg is there

    try:
        return view_of(text)
    except ValueError:
        log.warning("a relayed job view could not be read; the job will be loaded")
        return None


class Feed:
    """Items announced on a topic since the reader last took them (read on the loop)."""

    def __init__(self, unrun: dict[object, None] | None = None) -> None:
        self.event = asyncio.Event()  # something is pending
        # Every key of its topic reaches this process (the relay LISTENs on its bucket,
        # or there is no relay); until then it may miss some, and gets a resync once set.
        self.heard = asyncio.Event()
        self.urgent = asyncio.Event()  # an item that may have ended its job, or a resync
        self.pending: set[str] = set()
        self.ending: set[str] = set()  # pending items announced with ENDING_MARK
        self.views: dict[str, object] = {}  # pending items whose newest news came with one
        self.resync = False
        self._unrun = unrun  # the notifier's woken-and-not-run set (see `hand_over`)

    def add(self, item: str | None, view: object | None = None) -> None:
        if item is None or len(self.pending) >= FEED_MAX_PENDING:
            self.resync = True
            self.pending.clear()
            self.ending.clear()
            self.views.clear()
            self.urgent.set()
        elif not self.resync:
            if item.endswith(ENDING_MARK):
                item = item[: -len(ENDING_MARK)]
                self.ending.add(item)
                self.urgent.set()
            if view is not None:  # a final state: newer than anything pending
                self.views[item] = view
            else:  # maybe older than a view pending, but then the reader reads the item
                self.views.pop(item, None)
            self.pending.add(item)
        self.event.set()

    def take(self) -> tuple[set[str], bool]:
        """The pending items and whether to re-read everything; empties the feed."""
        items, resync, _ = self.take_views()
        return items, resync

    def take_views(self, ending_only: bool = False) -> tuple[set[str], bool, dict[str, object]]:
        """`take`, and the views that came with some of the items (see the module).
        `ending_only`: only the items announced with `ENDING_MARK` since the last take
        (the others are dropped: a reader that wants ends only never reads them)."""
        items, resync, views = self.pending, self.resync, self.views
        if ending_only:
            items = items & self.ending
        self.pending, self.ending, self.resync, self.views = set(), set(), False, {}
        if self._unrun is not None:
            self._unrun.pop(self, None)
        self.event.clear()
        self.urgent.clear()
        return items, resync, views


class Notifier:
    def __init__(self, engine: Engine | None = None) -> None:
        """With a PostgreSQL `engine`, wake-ups are relayed between coordinators."""
        # Per key, the waiters in subscription order (a dict as an ordered set).
        self._waiters: defaultdict[str, dict[asyncio.Event, None]] = defaultdict(dict)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine = engine
        self._relay: PgRelay | None = None
        self._feeds: defaultdict[str, dict[Feed, None]] = defaultdict(dict)
        self._listeners: list[tuple[str, Callable[[str | None], None]]] = []
        self._watchers: list[tuple[str, Callable[[str | None], None]]] = []
        # Waiters (events) and urgent feeds woken here that have not run yet (on the loop).
        self._unrun: dict[object, None] = {}
        # Deliveries of marked keys, and of None (see `mark`).
        self._marks: dict[str, int] = {}
        self._lost = 0
        self._marks_lock = threading.Lock()
        self._waiting: set[asyncio.Event] = set()  # waiters inside `wait` (on the loop)
        self.hops = 0  # deliveries from other threads that woke the loop (for /metrics)
        # Relayed packets with keys someone here follows, handed to the waiters and feeds
        # (on the loop: the relay runs there since session 15, no hop), for tests.
        self.relayed_deliveries = 0
        # Of those, relayed packets whose keys were all wake-one keys and woke no claimer
        # (for /metrics: `_wanted` lets through only a race's worth of them).
        self.idle_hops = 0
        # Claimers woken by a wake-one key, by where the key came from (here, or relayed
        # from another coordinator), and those of them that found nothing (`pass_on`).
        # For /metrics: the claims a job's wake-up cost that took nothing.
        self.claim_wakes = {"local": 0, "relayed": 0}
        self.claim_wakes_empty = {"local": 0, "relayed": 0}
        self._woken_by: dict[asyncio.Event, str] = {}  # a woken claimer's key's origin
        # Claimers woken early for a job whose write then failed (`withdraw`): their
        # finding nothing passes nothing on.
        self._withdrawn: set[asyncio.Event] = set()
        # Feeds following each relay bucket (on the loop), those of them not yet `heard`,
        # and whether every bucket is wanted (a listener or watcher of owner keys).
        self._bucket_feeds: dict[int, int] = {}
        self._unheard: defaultdict[int, dict[Feed, None]] = defaultdict(dict)
        self._hearing: defaultdict[int, list[asyncio.Future[None]]] = defaultdict(list)
        self._all_buckets = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the event loop; on PostgreSQL, start relaying (until the loop closes)."""
        self._loop = loop
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if self._engine is not None and self._engine.dialect.name == "postgresql":
            try:
                from csml.store.relay import PgRelay
            except ImportError as exc:  # another driver than psycopg 3
                log.warning("coordinators will not wake each other: %s", exc)
                return
            self._relay = PgRelay(
                self._engine, self._deliver_many, loop, heard=self._heard_from_relay
            )
            wanted = range(FEED_BUCKETS) if self._all_buckets else list(self._bucket_feeds)
            for bucket in wanted:
                self._relay.want(bucket)

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
    def subscribe(self, key: str, topic: str | None = None) -> Iterator[asyncio.Event]:
        """An event set by `notify(key)`; subscribe before checking, to miss nothing.
        `topic`: the owner feed whose bucket `key` may be relayed on (`notify(...,
        topic=)`: a job's completion); `await heard(topic)` before checking, or a key
        relayed before the relay listens there may be missed."""
        event = asyncio.Event()
        self._waiters[key][event] = None
        bucket = self._want(topic) if topic is not None else None
        try:
            yield event
        finally:
            if bucket is not None:
                self._unwant(bucket)
            self._unrun.pop(event, None)
            self._woken_by.pop(event, None)
            self._withdrawn.discard(event)
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.pop(event, None)
                if not waiters:
                    del self._waiters[key]

    @contextmanager
    def follow(self, topic: str) -> Iterator[Feed]:
        """A feed of the items announced on `topic` (keys `feed_key(topic, item)`). With a
        relay, keys of other coordinators may be missed until `feed.heard` is set; the
        feed then gets a resync (see the module)."""
        feed = Feed(self._unrun)
        self._feeds[topic][feed] = None
        bucket = self._want(topic, feed)
        try:
            yield feed
        finally:
            if bucket is not None:
                self._unwant(bucket, feed)
            self._unrun.pop(feed, None)
            feeds = self._feeds.get(topic)
            if feeds is not None:
                feeds.pop(feed, None)
                if not feeds:
                    del self._feeds[topic]

    async def heard(self, topic: str, timeout: float = HEAR_SECONDS) -> None:
        """(On the loop.) Return once every key relayed on `topic`'s bucket reaches this
        process (the relay listens there; at once without a relay, for a topic without
        a bucket, or while the relay is not listening at all: its reconnection wakes
        every waiter), or after `timeout` seconds (then a key may be missed, and a
        waiter sees its change at its next re-check). Call it after `subscribe(key,
        topic)` (which asks the relay to listen) and before checking the store."""
        relay = self._relay
        bucket = feed_bucket(topic) if relay is not None else None
        if (
            bucket is None
            or relay is None
            or self._loop is None
            or relay.listens_on(bucket)
            or not relay.listening.is_set()
        ):
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._hearing[bucket].append(future)
        try:
            with suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await future
        finally:
            hearing = self._hearing.get(bucket)
            if hearing is not None and future in hearing:
                hearing.remove(future)
                if not hearing:
                    del self._hearing[bucket]

    def _want(self, topic: str, feed: Feed | None = None) -> int | None:
        """(On the loop.) Have the relay listen on `topic`'s bucket (for `feed`, heard at
        once if it does already, else once it does, with a resync). Returns the bucket
        (None: no relay, or the topic's keys go to every coordinator: heard at once)."""
        relay = self._relay
        bucket = feed_bucket(topic) if relay is not None else None
        if bucket is None or relay is None:
            if feed is not None:
                feed.heard.set()
            return None
        count = self._bucket_feeds.get(bucket, 0)
        self._bucket_feeds[bucket] = count + 1
        if count == 0:
            relay.want(bucket)
        if feed is not None:
            if relay.listens_on(bucket):
                feed.heard.set()
            else:
                self._unheard[bucket][feed] = None
        return bucket

    def _unwant(self, bucket: int, feed: Feed | None = None) -> None:
        """(On the loop.) One fewer feed or waiter needs `bucket` (see `_want`)."""
        unheard = self._unheard.get(bucket)
        if unheard is not None and feed is not None:
            unheard.pop(feed, None)
            if not unheard:
                del self._unheard[bucket]
        count = self._bucket_feeds.pop(bucket, 1) - 1
        if count > 0:
            self._bucket_feeds[bucket] = count
        elif self._relay is not None and not self._all_buckets:
            self._relay.unwant(bucket)

    def listen(self, prefix: str, callback: Callable[[str | None], None]) -> None:
        """Call `callback(key)` on the event loop for every key starting with `prefix`
        delivered here (local or relayed), and `callback(None)` when some may be lost."""
        self._listeners.append((prefix, callback))
        self._hear_everything_of(prefix)

    def watch(self, prefix: str, callback: Callable[[str | None], None]) -> None:
        """Call `callback(key)` at once, in the delivering thread (any), for every key
        starting with `prefix` delivered here (local or relayed), and `callback(None)`
        when some may be lost. The callback must be quick and thread-safe."""
        self._watchers.append((prefix, callback))
        self._hear_everything_of(prefix)

    def _hear_everything_of(self, prefix: str) -> None:
        """A listener or watcher of `prefix` must see every key it matches: if owner keys
        may match, the relay listens on every bucket from now on."""
        if self._all_buckets or not (
            prefix.startswith(OWNER_PREFIX) or OWNER_PREFIX.startswith(prefix)
        ):
            return
        self._all_buckets = True
        if self._relay is not None:
            for bucket in range(FEED_BUCKETS):
                self._relay.want(bucket)

    def _heard_from_relay(self, buckets: set[int]) -> None:
        """(The relay, on the loop.) LISTEN on `buckets` took effect: the feeds
        that followed them before get `heard` and a resync."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _running_loop() is loop:
            self._on_heard(buckets)
            return
        with suppress(RuntimeError):  # closed meanwhile
            loop.call_soon_threadsafe(self._on_heard, buckets)

    def _on_heard(self, buckets: set[int]) -> None:
        for bucket in buckets:
            for feed in self._unheard.pop(bucket, {}):
                feed.add(None)  # it may have missed a key sent before the LISTEN: re-read
                feed.heard.set()
            for future in self._hearing.pop(bucket, []):
                if not future.done():
                    future.set_result(None)

    @property
    def reliable(self) -> bool:
        """Whether every key notified by any coordinator reaches this one (None is
        delivered when that stops being so): on SQLite (one coordinator per database),
        and on PostgreSQL while the relay LISTENs (never before `bind`)."""
        if self._relay is not None:
            return self._relay.listening.is_set()
        return self._engine is None or self._engine.dialect.name == "sqlite"

    def mark(self, key: str) -> tuple[int, int]:
        """How many times a key of `MARKED_PREFIXES` was delivered here (local or relayed),
        and how many times notifications may have been lost. Taken before a read or
        write of the queue: equal marks later mean no such key was announced since, so
        nothing it announces was committed after that read or write began (a key is
        announced after its commit) unless its announcement is still on its way (and a
        waiter subscribed meanwhile gets it)."""
        return self._marks.get(key, 0), self._lost

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `event`, then clear it; True if it was set."""
        self._waiting.add(event)
        try:
            # `asyncio.timeout`, not `wait_for`: no task made per wait, and a wake-up
            # resumes the waiter one loop turn after `set` (wait_for's task: three).
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting.discard(event)
            event.clear()
            self._unrun.pop(event, None)  # it runs now

    async def hand_over(self) -> None:
        """(On the loop.) Let the waiters and urgent feeds this process woke run first:
        yield until each has run, at most `HAND_OVER_YIELDS` loop turns. Call it after a
        notification, before answering a caller that is not waiting for it."""
        for _ in range(HAND_OVER_YIELDS):
            if not self._unrun:
                return
            await asyncio.sleep(0)

    def pass_on(self, key: str, event: asyncio.Event) -> bool:
        """(On the loop.) The waiter `event` of a wake-one `key` was woken and found
        nothing for it: wake the first idle waiter subscribed after it (those before it
        were busy when it was chosen, so they look at the queue after the job was
        queued). True if one was woken."""
        origin = self._woken_by.pop(event, None)
        if origin is not None:
            self.claim_wakes_empty[origin] += 1
        if event in self._withdrawn:  # woken early for a job that was not queued after all
            self._withdrawn.discard(event)
            return False
        waiters = self._waiters.get(key)
        if not waiters:
            return False
        after = False
        for other in waiters:
            if other is event:
                after = True
            elif after and not other.is_set():
                self._woke(other)
                if origin is not None:
                    self._woken_by[other] = origin
                    self.claim_wakes[origin] += 1
                other.set()
                return True
        return False

    def notify_early(self, key: str) -> asyncio.Event | None:
        """(On the loop.) `notify` a wake-one `key` before the commit it announces, when
        that commit's op is already in a single-lane writer's queue (SQLite) and a claimer
        of the key waits in `wait` here: woken now, its claim's write queues behind that
        op and so sees its row, and with luck shares its COMMIT (one transaction for the
        job's submission and its claim, instead of two, on a one-at-a-time job's path).
        Only without a relay (nothing leaves this process before the commit). Returns the
        waiter woken (None: nothing done; then `notify` after the commit, as usual). If
        the write fails, `withdraw` it: its claim then finds nothing and passes nothing on.
        The marks move as for `notify` (before the commit: a claim or probe that starts
        meanwhile and finds the queue empty may trust that until the next announcement,
        but the job's one wake-up went to a claimer that takes it or passes it on)."""
        idle = self._early_waiter(key)
        if idle is None:
            return None
        self._count_and_watch(key, 1)
        self._wake(key)
        return idle

    def claimer_waits(self, key: str) -> bool:
        """(On the loop.) Whether `notify_early(key)` would wake a claimer now."""
        return self._early_waiter(key) is not None

    def _early_waiter(self, key: str) -> asyncio.Event | None:
        if self._relay is not None or self._loop is None or not key.startswith(WAKE_ONE_PREFIX):
            return None
        waiters = self._waiters.get(key)
        if not waiters:
            return None
        idle = next((e for e in waiters if not e.is_set()), None)
        if idle is None or idle not in self._waiting:
            return None  # the one `notify` would wake is busy: it would not take now
        return idle

    def withdraw(self, key: str, event: asyncio.Event) -> None:
        """(On the loop.) The write `notify_early(key)` woke `event` for failed: its claim's
        finding nothing is no reason to wake another claimer (`pass_on` does nothing)."""
        if event in self._waiters.get(key, ()):  # else it is gone already: nothing to do
            self._withdrawn.add(event)  # forgotten by `pass_on` or when it unsubscribes

    def notify(
        self, key: str, view: object | None = None, *, times: int = 1, topic: str | None = None
    ) -> None:
        """Wake `key`'s waiters here and on the other coordinators, as for `times`
        notifications (a wake-one key: `times` waiters); `view` (of a feed key's item, in
        its final state: see the module) goes to this process's feeds only. `topic`: an
        owner feed whose bucket a key that is not a feed's is relayed on (a completion's
        `job:` key: see the module), so only the coordinators following that owner or
        waiting with `subscribe(key, topic)` get it. Safe from any thread."""
        waiting = self._deliver(key, times, view=view)
        if self._relay is not None:
            # What may wait a little for company on its way to the other coordinators: a
            # feed item's change that ends nothing (submitted, running, progress: their
            # streams let those settle for longer anyway, `api_events`), and a job's
            # wake-up that a claimer waiting here took (it takes the job now; the others'
            # claimers are told all the same, in case it cannot).
            deferrable = key.startswith(OWNER_PREFIX) and not key.endswith(ENDING_MARK)
            bucket = _key_bucket(key) if topic is None else feed_bucket(topic)
            for i in range(times):
                self._relay.publish(
                    key, deferrable=deferrable or i < waiting, view=view, bucket=bucket
                )

    def _deliver(self, key: str | None, times: int = 1, view: object | None = None) -> int:
        """Wake local waiters of `key` (None: every waiter), as for `times` notifications.
        Safe from any thread. Returns how many of a wake-one key's wake-ups went to
        waiters inside `wait` (only known on the loop's thread: 0 elsewhere)."""
        self._count_and_watch(key, times)
        loop = self._loop
        if loop is None or loop.is_closed():
            return 0
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return self._wake(key, times, view)
        elif self._wanted(key):
            self.hops += 1  # a race with another thread may lose one: a count for metrics
            with suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._wake, key, times, view)
        return 0

    def _deliver_many(
        self, keys: list[tuple[str | None, int]], views: Mapping[str, str] | None = None
    ) -> None:
        """`_deliver` of several (key, times) at once (the relay's, with one packet of
        notifications, on the loop; any thread): marks and watchers at once, then the
        keys someone here follows (see `_wanted`) to their waiters, from another thread
        than the loop's in one hop. `views`:
        by key, the relayed JSON of an ended job's view, decoded only for a key a feed
        here follows (one that cannot be decoded is left out: the feed loads the job)."""
        wanted: list[tuple[str | None, int, object]] = []
        for key, times in keys:
            self._count_and_watch(key, times)
            if self._wanted(key):
                view = None
                if views and key is not None and key in views:
                    view = _decoded(views[key])
                wanted.append((key, times, view))
        loop = self._loop
        if not wanted or loop is None or loop.is_closed():
            return
        self.relayed_deliveries += 1
        if _running_loop() is loop:  # the relay, on the loop since session 15: no hop
            self._wake_many(wanted)
            return
        self.hops += 1
        with suppress(RuntimeError):  # closed meanwhile
            loop.call_soon_threadsafe(self._wake_many, wanted)

    def _count_and_watch(self, key: str | None, times: int) -> None:
        """The part of a delivery done at once, in the delivering thread: marks, watchers."""
        if key is None or key.startswith(MARKED_PREFIXES):
            with self._marks_lock:
                if key is None:
                    self._lost += 1
                else:
                    self._marks[key] = self._marks.get(key, 0) + times
        for prefix, callback in self._watchers:
            if key is None or key.startswith(prefix):
                try:
                    callback(key)
                except Exception:  # a watcher's bug must not stop wake-ups
                    log.exception("notification watcher failed on %r", key)

    def _wanted(self, key: str | None) -> bool:
        """(Any thread.) Whether waking the loop for `key` can do anything: a listener of
        its prefix, a waiter subscribed to it, or a feed following its topic. A key nobody
        follows when it arrives is dropped there (its marks and watchers are done): one
        who subscribes or follows later reads the store after that, and every key is
        notified after the commit it announces, so that read sees what it announces (the
        rule that makes subscribing before checking miss nothing). A wake-one key whose
        waiters here are all woken already (set: each of them claims once it runs, and
        that claim begins after this key's commit) is dropped too: `_wake` would wake
        none of them (with 4 coordinators about half of the loop hops were those, see
        `idle_hops`). Reads the loop's dicts without a lock: a membership test is atomic
        under the GIL, and a walk of waiters that the loop changes meanwhile counts as
        wanted."""
        if key is None:
            return True
        for prefix, _ in self._listeners:
            if key.startswith(prefix):
                return True
        waiters = self._waiters.get(key)
        if waiters:
            if not key.startswith(WAKE_ONE_PREFIX):
                return True
            try:
                return not all(event.is_set() for event in waiters)
            except RuntimeError:  # the loop changed the waiters meanwhile
                return True
        topic, sep, _ = key.rpartition(FEED_SEPARATOR)
        return bool(sep) and topic in self._feeds

    def _woke(self, event: asyncio.Event) -> None:
        """(On the loop.) `event` is being set: if its waiter is inside `wait`, it runs
        its next step at the loop's next turn, and `hand_over` lets it (see the module);
        one busy elsewhere does not run sooner for a request's yielding."""
        if event in self._waiting:
            self._unrun[event] = None

    def _wake_many(self, keys: list[tuple[str | None, int, object]]) -> None:
        woken = self.claim_wakes["relayed"]
        useful = False  # a key that is not a wake-one key: a feed's, a long-poll's, ...
        for key, times, view in keys:
            useful = useful or key is None or not key.startswith(WAKE_ONE_PREFIX)
            self._wake(key, times, view, relayed=True)
        if not useful and self.claim_wakes["relayed"] == woken:
            self.idle_hops += 1

    def _wake(
        self,
        key: str | None,
        times: int = 1,
        view: object | None = None,
        *,
        relayed: bool = False,
    ) -> int:
        """(On the loop.) Deliver `key` (`relayed`: from another coordinator); returns how
        many of a wake-one key's wake-ups went to waiters inside `wait` (not busy in a
        request's other steps)."""
        for prefix, callback in self._listeners:
            if key is None or key.startswith(prefix):
                try:
                    callback(key)
                except Exception:  # a listener's bug must not stop wake-ups
                    log.exception("notification listener failed on %r", key)
        if key is None:
            for group in self._waiters.values():
                for event in group:
                    event.set()
            for feeds in self._feeds.values():
                for feed in feeds:
                    feed.add(None)
            return 0
        topic, sep, item = key.rpartition(FEED_SEPARATOR)
        if sep and topic in self._feeds:
            for feed in self._feeds[topic]:
                feed.add(item, view)
                if feed.urgent.is_set():
                    self._unrun[feed] = None
        waiters = self._waiters.get(key)
        if not waiters:
            return 0
        if not key.startswith(WAKE_ONE_PREFIX):
            for event in waiters:
                if not event.is_set():
                    self._woke(event)
                event.set()
            return 0
        idle = [e for e in waiters if not e.is_set()][:times]
        origin = "relayed" if relayed else "local"
        for event in idle:
            self._woke(event)
            self._woken_by[event] = origin
            event.set()
        self.claim_wakes[origin] += len(idle)
        return sum(e in self._waiting for e in idle)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
