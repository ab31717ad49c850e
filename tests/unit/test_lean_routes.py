"""A `lean` route answers exactly as FastAPI's own handler answers the same route, and
the coordinator's hot dispatch (`HotRoutes`) exactly as its full stack does.

The same endpoint is served twice in one app, once marked `lean` and once not, and every
request (valid, invalid fields, malformed or empty JSON, another content type, no
token) must get the same status, body and headers from both. A route whose shape the
lean handler does not cover is refused when the app is built.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Cookie, Depends, FastAPI, Request
from pydantic import BaseModel, Field

from csml.apps.echo import app as echo_app
from csml.coordinator.auth import LEAN, AuthFirstRoute, bearer, from_headers, lean
from csml.coordinator.errors import install_handlers
from csml.coordinator.middleware import HotRoutes
from tests.unit.inproc import InProcessCoordinator

Headers = dict[str, str]


class Body(BaseModel):
    n: int = Field(ge=1)
    tags: list[str] = Field([], max_length=2)


class Out(BaseModel):
    n: int
    who: str
    item: str
    tags: list[str]


@from_headers
async def caller(request: Request) -> str:
    return bearer(request)[:4]


Caller = Annotated[str, Depends(caller)]


async def _answer(item_id: str, body: Body, me: str) -> Out:
    return Out(n=body.n, who=me, item=item_id, tags=body.tags)


@lean
async def lean_echo(item_id: str, body: Body, request: Request, me: Caller) -> Out:
    return await _answer(item_id, body, me)


async def plain_echo(item_id: str, body: Body, request: Request, me: Caller) -> Out:
    return await _answer(item_id, body, me)


def _app() -> FastAPI:
    app = FastAPI()
    install_handlers(app)
    router = APIRouter(route_class=AuthFirstRoute)
    router.post("/lean/{item_id}", response_model=Out)(lean_echo)
    router.post("/plain/{item_id}", response_model=Out)(plain_echo)
    app.include_router(router)
    return app


def _post(path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.post(path, content=body, headers=headers)

    return asyncio.run(post())


CASES: list[tuple[dict[str, str], bytes]] = [
    ({"content-type": "application/json"}, b'{"n": 3, "tags": ["a"]}'),
    ({"content-type": "application/json; charset=utf-8"}, b'{"n": 1}'),
    ({"content-type": "application/json"}, b'{"n": 0}'),
    ({"content-type": "application/json"}, b'{"n": "x", "tags": ["a", "b", "c"]}'),
    ({"content-type": "application/json"}, b"[1, 2]"),
    ({"content-type": "application/json"}, b'{"n": 1'),
    ({"content-type": "application/json"}, b""),
    ({"content-type": "text/plain"}, b'{"n": 2}'),
    ({}, b'{"n": 2}'),
    # Read by pydantic-core's parser, or by json.loads what it refuses (`json_body`):
    # every body answers as FastAPI's json.loads reads it.
    ({"content-type": "application/json"}, b'{"n": 2, "n": 5, "tags": ["\\u00e9\xc3\xa9"]}'),
    ({"content-type": "application/json"}, b'{"n": 2, "x": "\\ud800"}'),  # a lone surrogate
    ({"content-type": "application/json"}, b'{"n": 2, "x": ' + b"[" * 300 + b"]" * 300 + b"}"),
    ({"content-type": "application/json"}, '{"n": 4, "tags": ["u"]}'.encode("utf-16")),
    ({"content-type": "application/json"}, b'\xef\xbb\xbf{"n": 2}'),  # a UTF-8 BOM
    ({"content-type": "application/json"}, b'{"n": NaN}'),
    ({"content-type": "application/json"}, b'{"n": 123456789012345678901234567890}'),
    ({"content-type": "application/json"}, b'{"n": 1e400}'),
    ({"content-type": "application/json"}, b'{"n": 01}'),
    ({"content-type": "application/json"}, b'{"n": 2, "tags": ["\x01"]}'),
    ({"content-type": "application/json"}, b'{"n": 2} x'),
    ({"content-type": "application/json"}, b'{"n": 2, "tags": ["\xff"]}'),
]


@pytest.mark.parametrize(("headers", "body"), CASES)
@pytest.mark.parametrize("token", ["tok-abcdef", None])
def test_a_lean_route_answers_as_fastapi_does(
    headers: dict[str, str], body: bytes, token: str | None
) -> None:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    lean_answer, plain_answer = (
        _post(f"/{kind}/item-7", body, {**headers, **auth}) for kind in ("lean", "plain")
    )
    assert lean_answer.status_code == plain_answer.status_code
    assert lean_answer.json() == plain_answer.json()
    for name in ("content-type", "www-authenticate"):
        assert lean_answer.headers.get(name) == plain_answer.headers.get(name)


def test_a_valid_request_reaches_the_endpoint() -> None:
    r = _post(
        "/lean/item-7",
        b'{"n": 3}',
        {"Authorization": "Bearer tok-abcdef", "content-type": "application/json"},
    )
    assert r.status_code == 200
    assert r.json() == {"n": 3, "who": "tok-", "item": "item-7", "tags": []}


def test_a_route_with_more_than_the_lean_shape_is_refused() -> None:
    @lean
    async def with_cookie(request: Request, me: Caller, limit: int = Cookie(1)) -> Out:
        raise AssertionError("never called")

    router = APIRouter(route_class=AuthFirstRoute)
    with pytest.raises(TypeError, match="a lean route takes"):
        router.get("/q", response_model=Out)(with_cookie)


# -- the coordinator's own hot routes: `HotRoutes` answers as the full stack does --------


def _hot(coordinator: InProcessCoordinator) -> HotRoutes:
    coordinator.http.get("/healthz")  # builds the stack
    stack = coordinator.app.middleware_stack
    assert isinstance(stack, HotRoutes)
    return stack


def _both(
    coordinator: InProcessCoordinator, hot: HotRoutes, path: str, body: bytes, headers: Headers
) -> tuple[httpx.Response, httpx.Response, int]:
    """The same request answered with the hot dispatch on, then off; and how many times
    the hot dispatch served it."""
    served = 0
    inner = hot.inner

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        nonlocal served
        served += 1
        await inner(scope, receive, send)

    answers = []
    for enabled in (True, False):
        hot.enabled, hot.inner = enabled, counted
        try:
            answers.append(coordinator.http.post(path, content=body, headers=headers))
        finally:
            hot.enabled, hot.inner = True, inner
    return answers[0], answers[1], served


def _same(fast: httpx.Response, full: httpx.Response, *, exact: bool) -> None:
    assert fast.status_code == full.status_code, (fast.text, full.text)
    for name in ("content-type", "www-authenticate", "retry-after", "connection"):
        assert fast.headers.get(name) == full.headers.get(name), name
    if exact:
        assert fast.json() == full.json()
    else:  # a new job, a new lease: the same shape
        assert fast.json().keys() == full.json().keys()


JSON = {"content-type": "application/json"}
HOT_CASES: list[tuple[str, bytes, dict[str, str], bool]] = [
    # (route, body, headers, exact): exact unless the answer names something new
    ("claim", b'{"max_jobs": 1, "wait": 0}', JSON, False),
    ("claim", b'{"max_jobs": 0, "wait": 0}', JSON, True),
    ("claim", b'{"max_jobs": "many"}', JSON, True),
    ("claim", b'{"max_jobs": 1', JSON, True),
    ("claim", b"", JSON, True),
    ("claim", b'{"max_jobs": 1, "wait": 0}', {"content-type": "text/plain"}, True),
    ("claim", b'{"max_jobs": 1, "wait": 0, "pad": "' + b"x" * (5 << 20) + b'"}', JSON, True),
    ("heartbeat", b'{"running": []}', JSON, True),
    ("heartbeat", b'{"running": [{"job_id": 3}]}', JSON, True),
    ("complete", b'{"completions": []}', JSON, True),
    (
        "complete",
        b'{"completions": [{"job_id": "nope", "lease_id": "x", "state": "ok"}]}',
        JSON,
        True,
    ),
    (
        "complete",
        b'{"completions": [{"job_id": "nope", "lease_id": "x", "state": "succeeded"}]}',
        JSON,
        True,
    ),
    ("submit", b'{"app": "echo", "operation": "echo", "params": {"i": 1}}', JSON, False),
    ("submit", b'{"app": "echo", "operation": "nope", "params": {}}', JSON, True),
    ("submit", b'{"app": "echo"', JSON, True),
    ("submit", b"[]", JSON, True),
    ("submit", b'{"app": "echo", "params": {"x": "' + b"y" * (1 << 21) + b'"}}', JSON, True),
    ("submit", b"--b\r\n\r\n", {"content-type": "multipart/form-data; boundary=b"}, True),
]


@pytest.mark.parametrize(("route", "body", "headers", "exact"), HOT_CASES)
@pytest.mark.parametrize("who", ["valid", "none", "wrong", "other worker"])
def test_the_hot_dispatch_answers_as_the_full_stack_does(
    coordinator: InProcessCoordinator,
    route: str,
    body: bytes,
    headers: dict[str, str],
    exact: bool,
    who: str,
) -> None:
    hot = _hot(coordinator)
    user = coordinator.new_user()
    worker = coordinator.worker(echo_app)
    other = coordinator.worker(echo_app)
    for _ in range(2):  # a job for each valid claim
        user.submit("echo", "echo", params={"i": 0})
    worker_id = other.id if who == "other worker" else worker.id
    path = "/v1/jobs" if route == "submit" else f"/v1/workers/{worker_id}/{route}"
    token = {
        "valid": user.token if route == "submit" else worker.registered.worker_token,
        "other worker": user.token if route == "submit" else worker.registered.worker_token,
        "wrong": "not-a-token",
        "none": None,
    }[who]
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    fast, full, served = _both(coordinator, hot, path, body, {**headers, **auth})
    assert served == 1  # the first went through the hot dispatch, the second did not
    _same(fast, full, exact=exact or fast.status_code >= 400)


def test_the_hot_dispatch_observes_the_same_metrics(coordinator: InProcessCoordinator) -> None:
    hot = _hot(coordinator)
    worker = coordinator.worker(echo_app)
    headers = {**JSON, "Authorization": f"Bearer {worker.registered.worker_token}"}
    claim = b'{"max_jobs": 1, "wait": 0}'
    _both(coordinator, hot, f"/v1/workers/{worker.id}/claim", claim, headers)
    _both(coordinator, hot, f"/v1/workers/{worker.id}/claim", b"{", headers)
    text = coordinator.http.get("/metrics").text
    for status in ("200", "422"):
        label = f'method="POST",route="/v1/workers/{{worker_id}}/claim",status="{status}"'
        counts = [
            x
            for x in text.splitlines()
            if x.startswith("csml_http_request_duration_seconds_count{") and label in x
        ]
        assert counts and counts[0].endswith(" 2.0"), counts  # one through each path


def test_every_lean_route_is_hot_and_others_are_not(coordinator: InProcessCoordinator) -> None:
    hot = _hot(coordinator)
    templates = {(m, ctx.path_format) for ctx, _ in hot.routes for m in ctx.methods}
    assert templates == {
        ("POST", "/v1/jobs"),
        ("POST", "/v1/jobs/batch"),
        ("GET", "/v1/jobs/{job_id}"),
        ("GET", "/v1/jobs/events"),
        ("POST", "/v1/workers/{worker_id}/claim"),
        ("POST", "/v1/workers/{worker_id}/heartbeat"),
        ("POST", "/v1/workers/{worker_id}/complete"),
        ("GET", "/v1/jobs/{job_id}/outputs/{name}"),
        ("GET", "/v1/workers/{worker_id}/jobs/{job_id}/inputs/{name}"),
        ("PUT", "/v1/workers/{worker_id}/jobs/{job_id}/outputs/{name}"),
    }

    def scope(method: str, path: str) -> dict[str, Any]:
        return {"type": "http", "method": method, "path": path, "root_path": ""}

    for method, path in [
        ("POST", "/v1/workers/w1/claim"),
        ("POST", "/v1/jobs/batch"),
        ("GET", "/v1/jobs/events"),
        ("GET", "/v1/jobs/j1"),
        ("GET", "/v1/jobs/j1/outputs/x"),
        ("GET", "/v1/workers/w1/jobs/j1/inputs/x"),
        ("PUT", "/v1/workers/w1/jobs/j1/outputs/x"),
    ]:
        assert hot._match(scope(method, path)) is not None, (method, path)
    events = hot._match(scope("GET", "/v1/jobs/events"))
    assert events is not None and events[0].path_format == "/v1/jobs/events"  # no job id
    for method, path in [
        ("GET", "/v1/workers/w1/claim"),
        ("POST", "/v1/workers/w1/claim/"),
        ("POST", "/v1/workers/w1/jobs/j1/complete"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/j1/outputs"),
        ("POST", "/v1/jobs/j1/outputs/x"),
        ("DELETE", "/v1/jobs/j1"),
    ]:
        assert hot._match(scope(method, path)) is None, (method, path)


def test_a_route_the_router_tries_first_keeps_its_requests() -> None:
    """A lean route shadowed by an earlier route of the same method and path is not
    dispatched past it: the router's choice stands."""
    first = APIRouter(route_class=AuthFirstRoute)

    @first.post("/lean/special")
    async def special() -> dict[str, str]:
        return {"who": "special"}

    app = FastAPI()
    install_handlers(app)
    app.include_router(first)
    lean_router = APIRouter(route_class=AuthFirstRoute)
    lean_router.post("/lean/{item_id}", response_model=Out)(lean_echo)
    app.include_router(lean_router)
    hot = HotRoutes(app.build_middleware_stack(), app, LEAN)
    assert len(hot.routes) == 1 and hot.routes[0][1]  # the earlier route is a shadow
    special_scope = {"type": "http", "method": "POST", "path": "/lean/special", "root_path": ""}
    other_scope = {**special_scope, "path": "/lean/other"}
    assert hot._match(special_scope) is None
    assert hot._match(other_scope) is not None
