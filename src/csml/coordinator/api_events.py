"""Live updates of the caller's jobs as server-sent events (`GET /v1/jobs/events`).

The stream re-reads the caller's jobs from the store (so changes made through any
coordinator of the store show up) and sends only what changed. Browsers read it
with `fetch()`, which can send the token in the Authorization header; EventSource
cannot, and the token never goes into a URL.

Each stream ends after `STREAM_SECONDS`; clients reconnect (and get a fresh
snapshot). This bounds how long a coordinator waits for streams when it stops.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

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

_open: Counter[str] = Counter()
_open_lock = threading.Lock()


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _snapshot(c: Core, owner_id: str, limit: int) -> dict[str, dict[str, Any]]:
    jobs = c.queue.list_jobs(owner_id, state=None, app=None, limit=limit)
    return {v.id: v.model_dump(mode="json") for v in job_views(c.sessions, jobs)}


async def _stream(request: Request, c: Core, owner_id: str, limit: int) -> AsyncIterator[bytes]:
    with _open_lock:  # counted here: a stream that never starts never ends either
        _open[owner_id] += 1
    try:
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
    finally:
        with _open_lock:
            _open[owner_id] -= 1
            if _open[owner_id] <= 0:
                del _open[owner_id]


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
    with _open_lock:
        if _open[me.id] >= MAX_STREAMS_PER_IDENTITY:
            raise ApiError(
                429,
                "too_many_streams",
                f"at most {MAX_STREAMS_PER_IDENTITY} event streams per identity are open at once",
                headers={"Retry-After": str(int(STREAM_SECONDS))},
            )
    return StreamingResponse(
        _stream(request, core(request), me.id, limit),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
