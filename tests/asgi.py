"""Requests as uvicorn hands them to an ASGI app, for tests and benchmarks that call the
coordinator's app directly, without sockets (tests/unit/test_hot_front.py,
test_claim_wake.py, test_batch_submit.py, bench/request_cost.py).

`http_scope` is the HTTP connection scope uvicorn builds (ASGI 3.0, HTTP spec 2.3):
header names lower-cased, every name and value bytes, a `content-length` for a body,
the `state` dict of the lifespan. `receive_once` is a client that sends its body in
one message, then neither sends more nor hangs up. Both cost what a dict literal
costs, so a benchmark timing whole requests measures the app, not this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

Message = dict[str, Any]
CLIENT = ("127.0.0.1", 1)
SERVER = ("127.0.0.1", 8600)


def http_scope(
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    *,
    body: bytes = b"",
    query: str = "",
    client: tuple[str, int] = CLIENT,
) -> dict[str, Any]:
    """The scope of one HTTP/1.1 request to `path` (no query in it: `query` is the
    part after `?`). `body`: only its length is used (a `content-length` header when
    there is one); what the app receives is `receive`'s."""
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if body:
        raw.append((b"content-length", str(len(body)).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": raw,
        "client": client,
        "server": SERVER,
        "state": {},
    }


def receive_once(body: bytes) -> Callable[[], Awaitable[Message]]:
    """A `receive` that gives `body` whole on its first call; later calls wait until the
    app cancels them (no `http.disconnect`: the client stays)."""
    given = False

    async def receive() -> Message:
        nonlocal given
        if given:
            await asyncio.Event().wait()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
