"""Live updates of the caller's jobs as server-sent events (`GET /v1/jobs/events`).

Pushed, not polled: every change of a job (submitted, running, progress, ended,
cancelled, requeued) is announced on its owner's notifier feed after its commit
(`notify.owner_change`), here at once and from the other coordinators through the
PostgreSQL relay. The stream follows that feed from before its first snapshot (so
nothing is missed), loads only the jobs announced (one statement per wake-up, however
many changed, outside any read transaction) and sends those that differ from what it
sent, all of a wake-up's events in one write. A job whose end this coordinator
committed comes with its ended view (a plain job's one-statement end returns it, the
same row a load gives: `Notifier.notify(key, view)`): the stream sends that without
loading it; an end committed on another coordinator arrives through the relay with that
view when it could travel (`csml.store.relay.view_text`), else as a key, and is loaded.
A change that may have ended a job (completed, cancelled, reaped: `Feed.urgent`) is
answered at once; others (submitted, running, progress) wait up to `SETTLE_SECONDS`
for more, so that a job that ends meanwhile costs one load and one event instead of
three (its intermediate states coalesce, as any changes pending together do). Its reads
are short indexed statements run on the event loop (no thread-pool hop). It re-reads the whole
snapshot only when the feed may have lost announcements (relay reconnect, overflow)
and, with queue positions asked (the page's default), every
`POSITIONS_RECHECK_SECONDS` while one of the caller's jobs waits in a queue (other
identities' claims move it up without announcing it to this caller); otherwise an
idle stream only sends a keep-alive comment every `KEEPALIVE_SECONDS`. Browsers read it
with `fetch()`, which can send the token in the Authorization header; EventSource
cannot, and the token never goes into a URL.

Asked with `ended_only=true` (as the SDK's result stream does: it only waits for
ends), the stream follows only the changes that may have ended a job (`Feed.urgent`:
completed, failed, cancelled, reaped): a submitted, running or progressed job is
neither loaded nor sent, and does not wake the stream. The snapshot is as without it.

Asked with `inline_outputs=N` (as `csml batch` does), a `job` event of a job that
succeeded carries its outputs of at most N bytes in base64, so the client needs no
download request for them (`csml.coordinator.inline_outputs`: bounds, what is left out);
they go out once with that event and are never kept with the stream's views.

Each stream ends after `STREAM_SECONDS`; clients reconnect (and get a fresh
snapshot). This bounds how long a coordinator waits for streams when it stops.

At most `MAX_STREAMS_PER_IDENTITY` streams per identity are open on one
coordinator process: a slot is taken (or refused, 429) in one step under a lock
when the stream is opened, and given back exactly once when its response ends,
however it ends (finished, client gone, never started). The count is per process:
with several coordinators serving one store, an identity can hold up to
`MAX_STREAMS_PER_IDENTITY` streams on each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, NamedTuple

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from csml.coordinator.auth import AuthFirstRoute, current_identity, lean
from csml.coordinator.inline_outputs import Budget, outputs_of, with_view
from csml.coordinator.notify import owner_feed, watching_hang_up
from csml.coordinator.state import Core, core
from csml.coordinator.views import job_views
from csml.refusals import RateLimited
from csml.schemas import ErrorBody, JobState
from csml.schemas import Job as JobView
from csml.schemas.workers import INLINE_MAX_BYTES
from csml.store.jobs import JobRow
from csml.store.tables import Identity

router = APIRouter(prefix="/v1", route_class=AuthFirstRoute)
Me = Annotated[Identity, Depends(current_identity)]

STREAM_SECONDS = 20.0
KEEPALIVE_SECONDS = 10.0
POSITIONS_RECHECK_SECONDS = 2.0
SETTLE_SECONDS = 0.25  # how long changes that end no job may wait for more
MAX_SENT = 2000  # views remembered per stream to send only changes (older: sent again)
MAX_STREAMS_PER_IDENTITY = 4


class StreamSlots:
    """Open streams per identity in this process, counted atomically."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, identity_id: str) -> Callable[[], None] | None:
        """A slot (call it to give it back; calling it again does nothing), or None."""
        with self._lock:
            if self._open[identity_id] >= self.limit:
                return None
            self._open[identity_id] += 1
        given_back = threading.Event()

        def release() -> None:
            with self._lock:
                if given_back.is_set():
                    return
                given_back.set()
                self._open[identity_id] -= 1
                if self._open[identity_id] <= 0:
                    del self._open[identity_id]

        return release


_slots = StreamSlots(MAX_STREAMS_PER_IDENTITY)


class _SlotResponse(StreamingResponse):
    """A stream that gives its slot back when it ends, or when it is dropped unsent."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release
        weakref.finalize(self, release)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class Sent(NamedTuple):
    """A job's view as this stream writes it: its state and its JSON (pydantic-core's
    encoding of the wire model, as a GET of the job answers it), made once per view."""

    state: str
    text: str


def _texts(views: Sequence[JobView]) -> dict[str, Sent]:
    """Each view's `Sent`, by job id (one pydantic-core encoding each, no dict between:
    model_dump + json.dumps cost ~5x as much, on the path of every result pushed)."""
    return {v.id: Sent(v.state.value, v.model_dump_json()) for v in views}


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _job_event(text: str) -> bytes:
    """A `job` event of a view's JSON (`Sent.text`)."""
    return b"event: job\ndata: " + text.encode() + b"\n\n"


def _snapshot_event(sent: dict[str, Sent]) -> bytes:
    """The `snapshot` event of these views (newest first, as `_snapshot` lists them)."""
    jobs = ",".join(s.text for s in sent.values())
    return f'event: snapshot\ndata: {{"jobs":[{jobs}]}}\n\n'.encode()


def _snapshot(c: Core, owner_id: str, limit: int, positions: bool) -> dict[str, Sent]:
    jobs = c.queue.list_jobs(owner_id, state=None, app=None, limit=limit)
    return _texts(job_views(c.queue, jobs, positions=positions))


def _changed(
    c: Core,
    owner_id: str,
    job_ids: set[str],
    positions: bool,
    known: dict[str, JobRow] | None = None,
    inline: int = 0,
    extra: dict[str, dict[str, str]] | None = None,
) -> dict[str, Sent]:
    """The views of the changed jobs (`Sent`, by job id): those `known` as they are (handed
    over with their announcement), the others loaded (one statement for all of them);
    with `inline` (and `extra` to fill), the small outputs of those that succeeded, by
    job id (`csml.coordinator.inline_outputs`)."""
    known = known or {}
    unknown = job_ids - known.keys()
    jobs = c.queue.changed_jobs(owner_id, unknown) if unknown else []
    jobs = sorted([*jobs, *known.values()], key=lambda j: j.seq)
    views = job_views(c.queue, jobs, positions=positions)
    if inline and extra is not None:
        budget = Budget()
        for job in jobs:
            if got := outputs_of(c.blobs, job, inline, budget, c.queue.file_content):
                extra[job.id] = got
    return _texts(views)


def _known(views: dict[str, object], owner_id: str, gone: set[str]) -> dict[str, JobRow]:
    """The announced views this stream may send as they are: the owner's own plain jobs
    (a pipeline's step stands for its pipeline, which must be loaded), none it already
    announced gone (an ended job changes no more, but may be erased: that news may have
    come first)."""
    return {
        i: v
        for i, v in views.items()
        if isinstance(v, JobRow)
        and v.owner_id == owner_id
        and v.parent_seq is None
        and i == v.id
        and i not in gone
    }


async def _stream(
    request: Request,
    c: Core,
    owner_id: str,
    limit: int,
    positions: bool,
    inline: int,
    ended_only: bool = False,
) -> AsyncIterator[bytes]:
    with (
        c.notifier.follow(owner_feed(owner_id)) as feed,  # before the snapshot: miss nothing
        watching_hang_up(request.receive, feed.event) as hung_up,  # ends the wait below
    ):
        sent = _snapshot(c, owner_id, limit, positions)
        erased: set[str] = set()  # announced gone by this stream
        yield _snapshot_event(sent)
        deadline = time.monotonic() + STREAM_SECONDS
        while (remaining := deadline - time.monotonic()) > 0:
            queued = positions and any(j.state == JobState.queued.value for j in sent.values())
            pause = min(remaining, POSITIONS_RECHECK_SECONDS if queued else KEEPALIVE_SECONDS)
            # `asyncio.timeout`, not `wait_for`: no task made per wait (one per job here).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await (feed.urgent if ended_only else feed.event).wait()
            settle = min(SETTLE_SECONDS, deadline - time.monotonic())
            if not ended_only and feed.event.is_set() and not feed.urgent.is_set() and settle > 0:
                with contextlib.suppress(TimeoutError):  # no job ended: let changes settle
                    async with asyncio.timeout(settle):
                        await feed.urgent.wait()
            if hung_up.done():
                return
            items, resync, views = feed.take_views(ending_only=ended_only)
            extra: dict[str, dict[str, str]] = {}  # sent once, never kept in `sent`
            if resync or (queued and not items):
                now = _snapshot(c, owner_id, limit, positions)
                changed = [(i, j) for i, j in now.items() if sent.get(i) != j]
                gone = sent.keys() - now.keys()
                sent = now
            elif items:
                now = _changed(
                    c,
                    owner_id,
                    items,
                    positions,
                    _known(views, owner_id, erased),
                    inline=inline,
                    extra=extra,
                )
                changed = [(i, j) for i, j in now.items() if sent.get(i) != j]
                gone = {i for i in items if i in sent and i not in now}
                for i in gone:
                    del sent[i]
                sent.update(now)
                while len(sent) > max(MAX_SENT, limit):
                    del sent[next(iter(sent))]
            else:
                changed, gone = [], set()
            erased |= gone
            # One write for all of a wake-up's events (the same bytes as one write each:
            # a reader parses events out of the byte stream, never out of writes).
            events = [  # oldest first
                _job_event(with_view(job.text, extra[i]) if i in extra else job.text)
                for i, job in reversed(changed)
            ]
            events += [_event("gone", {"id": i}) for i in gone]
            yield b"".join(events) if events else b": idle\n\n"
        yield _event("reconnect", {"after_ms": 0})


@router.get(
    "/jobs/events",
    tags=["jobs"],
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        **{code: {"model": ErrorBody} for code in (401, 429)},
    },
)
@lean
async def job_events(
    request: Request,
    me: Me,
    limit: int = Query(100, ge=1, le=500, description="Newest jobs in the snapshot."),
    positions: bool = Query(
        True, description="Include queue positions (the SDK, which shows none, says false)."
    ),
    inline_outputs: int = Query(
        0,
        ge=0,
        le=INLINE_MAX_BYTES,
        description="With a `job` event of a job that succeeded, its outputs of at most "
        'this many bytes in base64 (`"inline_outputs": {name: base64}`); 0: none.',
    ),
    ended_only: bool = Query(
        False,
        description="Only `job` events of changes that may have ended a job (completed, "
        "failed, cancelled, put back by the reaper), for a client that waits for results: "
        "none for submitted, running or progress. The snapshot is the same.",
    ),
) -> StreamingResponse:
    """Server-sent events of your jobs: `snapshot` (`{"jobs": [...]}`, newest first) at once,
    then `job` (a job) as soon as one changes or appears (pushed), `gone` (`{"id"}`) when one
    is erased, and `reconnect` when the stream ends (after about 20 s; open it again)."""
    release = _slots.take(me.id)  # counted as it is checked: no two opens see one slot
    if release is None:
        raise RateLimited(
            "too_many_streams",
            f"at most {MAX_STREAMS_PER_IDENTITY} event streams per identity are open at once "
            "(on this coordinator); close one, or retry when one ends",
            retry_after=int(STREAM_SECONDS),
        )
    return _SlotResponse(
        release,
        _stream(request, core(request), me.id, limit, positions, inline_outputs, ended_only),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
