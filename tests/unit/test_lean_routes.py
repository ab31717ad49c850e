"""A `lean` route answers exactly as FastAPI's own handler answers the same route.

The same endpoint is served twice in one app, once marked `lean` and once not, and every
request (valid, invalid fields, malformed or empty JSON, another content type, no
token) must get the same status, body and headers from both. A route whose shape the
lean handler does not cover is refused when the app is built.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, Field

from csml.coordinator.auth import AuthFirstRoute, bearer, from_headers, lean
from csml.coordinator.errors import install_handlers


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
    async def with_query(request: Request, me: Caller, limit: int = Query(1)) -> Out:
        raise AssertionError("never called")

    router = APIRouter(route_class=AuthFirstRoute)
    with pytest.raises(TypeError, match="a lean route takes"):
        router.get("/q", response_model=Out)(with_query)
