"""Live updates of the caller's jobs as server-sent events (`GET /v1/jobs/events`).

The stream re-reads the caller's jobs from the store (so changes made through any
coordinator of the store show up) and sends only what changed. Browsers read it
with `fetch()`, which can send the token in the Authorization header; EventSource
cannot, and the token never goes into a URL.

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
import json
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from csml.coordinator.auth import current_identity
from csml.coordinator.errors import ApiError
from csml.coordinator.state import Core, core
from csml.coordinator.views import job_views
from csml.schemas import ErrorBody, JobState
from csml.store.tables import Identity

router = APIRouter(prefix="/v1")
Me = Annotated[Identity, Depends(current_identity)]

STREAM_SECONDS = 20.0
ACTIVE_INTERVAL = 0.5
IDLE_INTERVAL = 1.5
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


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _snapshot(c: Core, owner_id: str, limit: int) -> dict[str, dict[str, Any]]:
    jobs = c.queue.list_jobs(owner_id, state=None, app=None, limit=limit)
    return {v.id: v.model_dump(mode="json") for v in job_views(c.sessions, jobs)}


async def _stream(request: Request, c: Core, owner_id: str, limit: int) -> AsyncIterator[bytes]:
    sent = await run_in_threadpool(_snapshot, c, owner_id, limit)
    yield _event("snapshot", {"jobs": list(sent.values())})
    deadline = time.monotonic() + STREAM_SECONDS
    while time.monotonic() < deadline:
        active = any(not JobState(j["state"]).terminal for j in sent.values())
        await asyncio.sleep(ACTIVE_INTERVAL if active else IDLE_INTERVAL)
        if await request.is_disconnected():
            return
        now = await run_in_threadpool(_snapshot, c, owner_id, limit)
        changed = [j for i, j in now.items() if sent.get(i) != j]
        for job in reversed(changed):  # oldest first, so the newest ends on top
            yield _event("job", job)
        for gone in sent.keys() - now.keys():
            yield _event("gone", {"id": gone})
        if not changed and now.keys() == sent.keys():
            yield b": idle\n\n"
        sent = now
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
def job_events(
    request: Request,
    me: Me,
    limit: int = Query(100, ge=1, le=500, description="Newest jobs to follow."),
) -> StreamingResponse:
    """Server-sent events of your jobs: `snapshot` (`{"jobs": [...]}`, newest first) at once,
    then `job` (a job) whenever one changes or appears, `gone` (`{"id"}`) when one is erased,
    and `reconnect` when the stream ends (after about 20 s; open it again)."""
    release = _slots.take(me.id)  # counted as it is checked: no two opens see one slot
    if release is None:
        raise ApiError(
            429,
            "too_many_streams",
            f"at most {MAX_STREAMS_PER_IDENTITY} event streams per identity are open at once "
            "(on this coordinator); close one, or retry when one ends",
            headers={"Retry-After": str(int(STREAM_SECONDS))},
        )
    return _SlotResponse(
        release,
        _stream(request, core(request), me.id, limit),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
