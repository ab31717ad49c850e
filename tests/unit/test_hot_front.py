"""The coordinator's hot dispatch (`HotRoutes`) answers as the full stack does on the
routes it took over last (a batch submission, a job's GET, the event stream), with
query parameters (a `lean` route validates them as FastAPI does), refusals (the same
JSON, the same `Retry-After`), body bounds (authentication before the body, the 413
after it) and a crash (a logged 500 JSON, raised again to the server, which goes on);
and it sends a response's messages with the server's own `send`, no wrapper between.

Each request is asked twice of one coordinator, once through the hot dispatch and once
with it off (the full FastAPI stack); both answers must agree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from pydantic import BaseModel, Field

from csml import refusals
from csml.apps.echo import app as echo_app
from csml.coordinator import api_events
from csml.coordinator.auth import AuthFirstRoute, bearer, from_headers, lean
from csml.coordinator.errors import install_handlers
from csml.coordinator.middleware import HotRoutes
from tests.asgi import Message, http_scope, receive_once
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import InProcessCoordinator

Headers = dict[str, str]
JSON = {"content-type": "application/json"}


# -- a lean route with query parameters answers as FastAPI's handler does -------------


class Item(BaseModel):
    n: int = Field(ge=1)


@from_headers
async def caller(request: Request) -> str:
    return bearer(request)[:4]


Caller = Annotated[str, Depends(caller)]


async def _answer(item_id: str, body: Item, me: str, limit: int, flag: bool, x: float) -> Any:
    if limit == 13:
        raise refusals.QueueFull("queue_full", "the queue is full; retry later", retry_after=7)
    return {"item": item_id, "n": body.n, "me": me, "limit": limit, "flag": flag, "x": x}


@lean
async def lean_query(
    item_id: str,
    body: Item,
    request: Request,
    me: Caller,
    limit: int = Query(10, ge=1, le=50),
    flag: bool = Query(False),
    x: float = Query(0.0, ge=0),
) -> Any:
    return await _answer(item_id, body, me, limit, flag, x)


async def plain_query(
    item_id: str,
    body: Item,
    request: Request,
    me: Caller,
    limit: int = Query(10, ge=1, le=50),
    flag: bool = Query(False),
    x: float = Query(0.0, ge=0),
) -> Any:
    return await _answer(item_id, body, me, limit, flag, x)


def _query_app() -> FastAPI:
    app = FastAPI()
    install_handlers(app)
    router = APIRouter(route_class=AuthFirstRoute)
    router.post("/lean/{item_id}")(lean_query)
    router.post("/plain/{item_id}")(plain_query)
    app.include_router(router)
    return app


QUERY_CASES = [
    ("", b'{"n": 2}'),
    ("limit=3&flag=true&x=1.5", b'{"n": 2}'),
    ("limit=0", b'{"n": 2}'),
    ("limit=abc&flag=maybe&x=-1", b'{"n": 0}'),  # every error, the query's first
    ("limit=51", b'{"n": 0}'),
    ("limit=13", b'{"n": 1}'),  # a refusal: 429 with Retry-After
    ("limit=2&limit=3", b'{"n": 1}'),
    ("limit=2", b'{"n": 1'),
    ("limit=2", b""),
]


@pytest.mark.parametrize(("query", "body"), QUERY_CASES)
@pytest.mark.parametrize("token", ["tok-abcdef", None])
def test_a_lean_route_validates_its_query_as_fastapi_does(
    query: str, body: bytes, token: str | None
) -> None:
    auth = {"Authorization": f"Bearer {token}"} if token else {}

    async def post(kind: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=_query_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.post(
                f"/{kind}/item-7?{query}", content=body, headers={**JSON, **auth}
            )

    lean_answer, plain_answer = (asyncio.run(post(kind)) for kind in ("lean", "plain"))
    assert lean_answer.status_code == plain_answer.status_code, lean_answer.text
    assert lean_answer.json() == plain_answer.json()
    for name in ("content-type", "www-authenticate", "retry-after"):
        assert lean_answer.headers.get(name) == plain_answer.headers.get(name), name


def test_a_lean_route_with_header_parameters_is_refused() -> None:
    @lean
    async def with_header(request: Request, me: Caller, x_thing: str = Header()) -> Any:
        raise AssertionError("never called")

    router = APIRouter(route_class=AuthFirstRoute)
    with pytest.raises(TypeError, match="a lean route takes"):
        router.get("/h")(with_header)


def test_a_lean_route_with_an_embedded_body_is_refused() -> None:
    @lean
    async def embedded(request: Request, me: Caller, item: Item = Body(embed=True)) -> Any:
        raise AssertionError("never called")

    router = APIRouter(route_class=AuthFirstRoute)
    with pytest.raises(TypeError, match="a lean route takes"):
        router.post("/e")(embedded)


# -- the coordinator's routes, hot and full ------------------------------------------


def _hot(coordinator: InProcessCoordinator) -> HotRoutes:
    coordinator.http.get("/healthz")  # builds the stack
    stack = coordinator.app.middleware_stack
    assert isinstance(stack, HotRoutes)
    return stack


async def _drive(
    app: Any,
    method: str,
    path: str,
    headers: Headers,
    body: bytes,
    query: str,
    receive: Any = None,
) -> tuple[list[Message], list[str], BaseException | None]:
    """One request as uvicorn sends it (ASGI spec 2.3): the messages sent, the name of the
    function that called `send` for each, and the exception the app raised, if any.
    `receive`: the client's side (default: `body` whole in one message)."""
    scope = http_scope(method, path, headers, body=body, query=query)
    receive = receive or receive_once(body)
    messages: list[Message] = []
    callers: list[str] = []

    async def send(message: Message) -> None:
        messages.append(message)
        callers.append(sys._getframe(1).f_code.co_name)

    try:
        await app(scope, receive, send)
    except Exception as exc:
        return messages, callers, exc
    return messages, callers, None


class Answer:
    def __init__(self, messages: list[Message], raised: BaseException | None) -> None:
        start = messages[0]
        assert start["type"] == "http.response.start"
        self.status: int = start["status"]
        self.headers = httpx.Headers([(k.decode(), v.decode()) for k, v in start["headers"]])
        self.body = b"".join(m.get("body", b"") for m in messages[1:])
        self.raised = raised

    def json(self) -> Any:
        return json.loads(self.body)


def _both(
    coordinator: InProcessCoordinator,
    method: str,
    path: str,
    headers: Headers,
    body: bytes = b"",
    query: str = "",
    receive: Any = None,
) -> tuple[Answer, Answer]:
    """The request through the hot dispatch (which must serve it), then the full stack."""
    hot = _hot(coordinator)
    inner = hot.inner
    served = 0

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        nonlocal served
        served += 1
        await inner(scope, receive, send)

    answers = []
    for enabled in (True, False):
        hot.enabled, hot.inner = enabled, counted
        try:
            messages, _, raised = coordinator.portal.call(
                _drive, coordinator.app, method, path, headers, body, query, receive
            )
        finally:
            hot.enabled, hot.inner = True, inner
        answers.append(Answer(messages, raised))
    assert served == 1, "the hot dispatch served the first, not the second"
    return answers[0], answers[1]


def _same(fast: Answer, full: Answer, *, exact: bool = True) -> None:
    assert fast.status == full.status, (fast.body, full.body)
    for name in ("content-type", "www-authenticate", "retry-after", "connection", "location"):
        assert fast.headers.get(name) == full.headers.get(name), name
    if exact:
        assert fast.body == full.body
    else:  # a new job: the same shape
        assert fast.json().keys() == full.json().keys()


def test_a_jobs_get_answers_as_the_full_stack_does(coordinator: InProcessCoordinator) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo", params={"i": 1})
    mine = {"Authorization": f"Bearer {user.token}"}
    path = f"/v1/jobs/{job.id}"
    for headers, query, status in [
        (mine, "", 200),
        (mine, "positions=true", 200),
        (mine, "wait=0&positions=false", 200),
        (mine, "wait=-1", 422),
        (mine, "wait=301&positions=maybe", 422),
        ({}, "", 401),
        ({"Authorization": "Bearer not-a-token"}, "wait=-1", 401),
    ]:
        fast, full = _both(coordinator, "GET", path, headers, query=query)
        assert fast.status == status, fast.body
        _same(fast, full)
    other = coordinator.new_user()
    fast, full = _both(coordinator, "GET", path, {"Authorization": f"Bearer {other.token}"})
    assert fast.status == 404
    _same(fast, full)


@pytest.mark.parametrize("who", ["valid", "none", "wrong"])
def test_a_batch_submission_answers_as_the_full_stack_does(
    make_coordinator: MakeCoordinator, who: str
) -> None:
    coordinator = make_coordinator(max_request_bytes=1 << 20)
    user = coordinator.new_user()
    token = {"valid": user.token, "none": None, "wrong": "not-a-token"}[who]
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    item = {"spec": {"app": "echo", "operation": "echo", "params": {"i": 1}}}
    bad = {"spec": {"app": "echo", "operation": "nope", "params": {}}}
    for body, exact in [
        (json.dumps({"items": [item, bad, item]}).encode(), False),
        (json.dumps({"items": [bad]}).encode(), True),
        (b'{"items": [', True),
        (b"[]", True),
        (b'{"items": [{"spec": {"params": "' + b"x" * (2 << 20) + b'"}}]}', True),
    ]:
        fast, full = _both(coordinator, "POST", "/v1/jobs/batch", {**JSON, **auth}, body)
        _same(fast, full, exact=exact or who != "valid")
        if who != "valid":
            assert fast.status == 401  # authentication before the body
        elif len(body) > 1 << 20:
            assert fast.status == 413 and fast.json()["error"]["code"] == "body_too_large"
    if who != "valid":  # a 401 before a body left unread closes the connection
        big = b"x" * (2 << 20)
        fast, full = _both(coordinator, "POST", "/v1/jobs/batch", {**JSON, **auth}, big)
        assert fast.status == 401 and fast.headers.get("connection") == "close"
        _same(fast, full)


def test_the_event_streams_refusals_are_the_same(coordinator: InProcessCoordinator) -> None:
    user = coordinator.new_user()
    me = {"Authorization": f"Bearer {user.token}"}
    identity = user.request("GET", "/v1/identities/me").json()["id"]
    for headers, query in [({}, ""), (me, "limit=0"), (me, "inline_outputs=-1&positions=x")]:
        fast, full = _both(coordinator, "GET", "/v1/jobs/events", headers, query=query)
        assert fast.status in (401, 422), fast.body
        _same(fast, full)
    taken = [api_events._slots.take(identity) for _ in range(api_events.MAX_STREAMS_PER_IDENTITY)]
    try:
        fast, full = _both(coordinator, "GET", "/v1/jobs/events", me)
    finally:
        for release in taken:
            assert release is not None
            release()
    assert fast.status == 429 and fast.headers["retry-after"] == "20"
    assert fast.json()["error"]["code"] == "too_many_streams"
    _same(fast, full)


def test_the_event_stream_goes_out_with_the_servers_send(
    coordinator: InProcessCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_events, "STREAM_SECONDS", 0.01)
    user = coordinator.new_user()
    user.submit("echo", "echo", params={"i": 1})
    me = {"Authorization": f"Bearer {user.token}"}
    hot = _hot(coordinator)
    answers, callers = [], []
    for enabled in (True, False):
        hot.enabled = enabled
        try:
            messages, called_by, raised = coordinator.portal.call(
                _drive, coordinator.app, "GET", "/v1/jobs/events", me, b"", ""
            )
        finally:
            hot.enabled = True
        assert raised is None
        answers.append(Answer(messages, raised))
        callers.append(called_by)
    fast, full = answers
    assert fast.status == full.status == 200
    for name in ("content-type", "cache-control", "x-accel-buffering", "connection"):
        assert fast.headers.get(name) == full.headers.get(name), name

    def events(body: bytes) -> list[str]:
        return [line for line in body.decode().splitlines() if line.startswith("event:")]

    assert events(fast.body)[0] == "event: snapshot" and events(fast.body)[-1] == (
        "event: reconnect"
    )
    assert events(fast.body) == events(full.body)
    # Hot: every message straight from the response to the server; full: through wrappers.
    assert set(callers[0]) == {"stream_response"}, callers[0]
    assert "stream_response" not in callers[1]


def test_a_crash_is_a_logged_500_on_both_paths(
    coordinator: InProcessCoordinator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = coordinator.worker(echo_app)
    headers = {**JSON, "Authorization": f"Bearer {worker.registered.worker_token}"}
    path = f"/v1/workers/{worker.id}/heartbeat"

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(coordinator.core.queue, "heartbeat_async", broken)
    with caplog.at_level(logging.ERROR, logger="csml.coordinator"):
        fast, full = _both(coordinator, "POST", path, headers, b'{"running": []}')
    _same(fast, full)
    assert fast.status == 500 and fast.json()["error"]["code"] == "internal_error"
    for answer in (fast, full):  # raised again to the server, which logs it and goes on
        assert isinstance(answer.raised, RuntimeError) and str(answer.raised) == "boom"
    logged = [r for r in caplog.records if r.getMessage() == "unexpected error"]
    assert len(logged) == 2
    monkeypatch.undo()
    fast, full = _both(coordinator, "POST", path, headers, b'{"running": []}')
    assert fast.status == full.status == 200


def test_a_client_gone_before_its_body_is_the_same_quiet_400_on_both_paths(
    coordinator: InProcessCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    # A worker stopped mid-request (`csml up` stopping everything): the server hands the
    # app a disconnect where the body should be. FastAPI answers 400 to nobody; the hot
    # dispatch did not catch it and logged an "unexpected error" with its traceback.
    worker = coordinator.worker(echo_app)
    headers = {**JSON, "Authorization": f"Bearer {worker.registered.worker_token}"}

    async def gone() -> Message:
        return {"type": "http.disconnect"}

    path = f"/v1/workers/{worker.id}/heartbeat"
    with caplog.at_level(logging.ERROR):
        fast, full = _both(coordinator, "POST", path, headers, b'{"running": []}', "", gone)
    _same(fast, full)
    assert fast.status == 400 and fast.raised is None and full.raised is None
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_refusal_is_the_same_json_on_both_paths(coordinator: InProcessCoordinator) -> None:
    worker = coordinator.worker(echo_app)
    headers = {**JSON, "Authorization": f"Bearer {worker.registered.worker_token}"}
    path = f"/v1/workers/{worker.id}/heartbeat"

    async def refused(*_: Any, **__: Any) -> Any:
        raise refusals.RateLimited("slow_down", "too many heartbeats", retry_after=3)

    coordinator.core.queue.heartbeat_async = refused  # type: ignore[method-assign]
    try:
        fast, full = _both(coordinator, "POST", path, headers, b'{"running": []}')
    finally:
        del coordinator.core.queue.heartbeat_async
    _same(fast, full)
    assert fast.status == 429 and fast.headers["retry-after"] == "3"
    assert fast.json() == {"error": {"code": "slow_down", "message": "too many heartbeats"}}


class _Other:
    """A middleware the hot dispatch knows nothing of."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def test_an_unknown_middleware_sends_every_request_through_the_full_stack(
    coordinator: InProcessCoordinator,
) -> None:
    """The hot dispatch does what `ObserveLatency` and `BodyLimits` do, nothing else: with
    another middleware in the app, it serves nothing (that middleware must see them)."""
    app = _query_app()
    assert HotRoutes(app.build_middleware_stack(), app, [lean_query]).enabled
    app.add_middleware(_Other)
    assert not HotRoutes(app.build_middleware_stack(), app, [lean_query]).enabled
    assert _hot(coordinator).enabled  # the coordinator's own two are known


def test_the_byte_routes_answer_as_the_full_stack_does(coordinator: InProcessCoordinator) -> None:
    """A job's files (the worker's input download and output upload, the owner's output
    download) are hot routes: each answer, files kept in the database or on disk, ranges,
    refusals and a wrong lease alike, is the full stack's."""
    user = coordinator.new_user()
    other = coordinator.new_user()
    worker = coordinator.worker(echo_app)
    small, large = b"s" * 1000, bytes(range(256)) * 1200  # in the database; a file
    jobs = [user.submit("echo", "echo", files={"data": data}) for data in (small, large)]
    taken = worker.claim(2)
    assert [j.id for j in taken] == [j.id for j in jobs]
    wh = {"Authorization": f"Bearer {worker.registered.worker_token}"}
    for job, data in zip(taken, (small, large), strict=True):
        path = f"/v1/workers/{worker.id}/jobs/{job.id}/inputs/data"
        for headers, query, status in [
            (wh, f"lease_id={job.lease_id}", 200),
            ({**wh, "Range": "bytes=2-9"}, f"lease_id={job.lease_id}", 206),
            (wh, "lease_id=wrong", 409),
            (wh, "", 422),
            ({}, f"lease_id={job.lease_id}", 401),
        ]:
            fast, full = _both(coordinator, "GET", path, headers, query=query)
            assert fast.status == status, fast.body
            _same(fast, full)
            assert fast.headers.get("etag") == full.headers.get("etag")
        fast, _ = _both(coordinator, "GET", path, wh, query=f"lease_id={job.lease_id}")
        assert fast.body == data
    job = taken[0]
    put = f"/v1/workers/{worker.id}/jobs/{job.id}/outputs/data"
    lease = f"lease_id={job.lease_id}"
    octets = {**wh, "content-type": "application/octet-stream"}
    for headers, query, status in [
        (octets, lease, 204),
        (octets, "", 422),
        (octets, "lease_id=wrong", 409),
        ({"content-type": "application/octet-stream"}, lease, 401),
    ]:
        fast, full = _both(coordinator, "PUT", put, headers, b"out" * 100, query=query)
        assert fast.status == status, fast.body
        _same(fast, full)
    done = worker.post(
        "/complete",
        {
            "completions": [
                {"job_id": job.id, "lease_id": job.lease_id, "state": "succeeded", "result": {}}
            ]
        },
    )
    assert done.status_code == 200, done.text
    get = f"/v1/jobs/{job.id}/outputs/data"
    mine = {"Authorization": f"Bearer {user.token}"}
    for headers, status in [
        (mine, 200),
        ({**mine, "Range": "bytes=0-4"}, 206),
        ({"Authorization": f"Bearer {other.token}"}, 404),
        ({}, 401),
    ]:
        fast, full = _both(coordinator, "GET", get, headers)
        assert fast.status == status, fast.body
        _same(fast, full)
    fast, _ = _both(coordinator, "GET", get, mine)
    assert fast.body == b"out" * 100
    fast, full = _both(coordinator, "GET", f"/v1/jobs/{job.id}/outputs/nope", mine)
    assert fast.status == 404
    _same(fast, full)
