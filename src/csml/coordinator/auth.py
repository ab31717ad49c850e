"""Bearer-token authentication for identities and workers.

Tokens are looked up by their SHA-256; the store never holds a token itself.

Authentication comes before the body: FastAPI reads and parses a route's body
parameter before it runs the route's dependencies, so `AuthFirstRoute` (the
route class of every API router) runs a route's header checks (`from_headers`)
first, and refuses a missing or invalid token before a byte of the body is
read. Each check's answer is kept for the request, so the dependency that asks
again gets it without a second look-up. A worker token's answer is also kept
across requests for a short while (`csml.coordinator.worker_tokens`: at most
its TTL stale, forgotten at once on leave and revoke through this coordinator).
A check may be a coroutine function: it
then runs on the event loop (no thread-pool hop), e.g. the identity check, which
answers from `Core.identities` (see `identity_cache`) and queries the store only
on a miss. Every look-up is one statement of `csml.store.identities` or
`csml.store.workers` on a `read_each` connection: no ORM session, no read transaction
(no `BEGIN`/`ROLLBACK` around the one statement).

The hot routes are marked `lean`: `AuthFirstRoute` then calls them through a handler
of its own that does only what their shape needs (same checks, same validation and
errors, same serialisation: see the class), not FastAPI's generic one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pydantic_core
from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, serialize_response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from csml import ids
from csml.coordinator.errors import unauthorized
from csml.coordinator.state import Core, core
from csml.coordinator.worker_tokens import CACHE as WORKER_TOKENS
from csml.store import identities, workers
from csml.store.db import read_each
from csml.store.identities import IdentityRow
from csml.store.workers import JoinTokenRow, WorkerRow

T = TypeVar("T")
_SCOPE_KEY = "csml.auth"
# The checks marked by `from_headers`: they read headers only, never the body.
HEADER_CHECKS: set[Callable[..., Any]] = set()


def from_headers(check: Callable[[Request], T]) -> Callable[[Request], T]:
    """Mark `check` as authentication from headers alone, answered once per request."""
    if inspect.iscoroutinefunction(check):
        return _from_headers_async(check)

    @functools.wraps(check)
    def once(request: Request) -> T:
        answers: dict[str, Any] = request.scope.setdefault(_SCOPE_KEY, {})
        key = check.__qualname__
        if key not in answers:
            answers[key] = check(request)
        return answers[key]  # type: ignore[no-any-return]

    HEADER_CHECKS.add(once)
    return once


def _from_headers_async(check: Callable[[Request], Any]) -> Callable[[Request], Any]:
    @functools.wraps(check)
    async def once(request: Request) -> Any:
        answers: dict[str, Any] = request.scope.setdefault(_SCOPE_KEY, {})
        key = check.__qualname__
        if key not in answers:
            answers[key] = await check(request)
        return answers[key]

    HEADER_CHECKS.add(once)
    return once


def _header_checks(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call in HEADER_CHECKS:
            yield sub.call
        yield from _header_checks(sub)


def lean(endpoint: T) -> T:
    """Mark a hot route's endpoint to be called without FastAPI's request machinery
    (see `AuthFirstRoute`); its route stays declared, documented and routed as before."""
    LEAN.add(endpoint)
    return endpoint


LEAN: set[Any] = set()


def json_body(raw: bytes) -> Any:
    """A lean route's JSON body, read as `json.loads` reads it: by pydantic-core's parser
    (a claim carrying photos' completions, ~112 KB of base64 each: ~5 CPU-µs per
    completion against ~41 for `json.loads`, which decodes the UTF-8 first), and by
    `json.loads` whatever that parser refuses (lone surrogate escapes, nesting deeper than
    its bound, a body in UTF-16 or UTF-32), so a body that reads reads the same and one
    that does not still raises ValueError."""
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=True)
    except ValueError:
        return json.loads(raw)


def _is_json(content_type: str) -> bool:
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


class AuthFirstRoute(APIRoute):
    """A route that runs its header checks before FastAPI reads its body parameter.

    Routers use it as their `route_class`; FastAPI builds every included copy of a
    route from `get_route_handler`, so the order holds however the router is included.

    An endpoint marked `lean` (the hot path: a worker's claim, heartbeat and batched
    complete, a job submission, a batch submission, a job's GET, the event stream) is
    called by a handler built here instead of FastAPI's generic one
    (`bench/request_cost.py` measured FastAPI's own share at 250-500 µs of CPU per
    request, most of it solving dependencies and serialising). It does what FastAPI
    would for that route's shape and nothing else: the header checks (as
    dependencies: same functions, same per-request answers), the path parameters as
    strings, the query parameters validated by FastAPI's own `request_params_to_args`
    and the JSON body by the route's own body field (their errors, query first,
    raised together as the same `RequestValidationError`), the return value
    serialised by the route's response field. Anything else (a body that is not
    JSON, or does not parse) goes to FastAPI's handler, which answers as before. A
    route whose shape is more than that (header or cookie parameters, other
    dependencies, a sync endpoint) is refused when the app is built.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks = list(dict.fromkeys(_header_checks(self.dependant)))
        if self.endpoint in LEAN:
            return self._lean_handler(handler)
        if self.body_field is None or not checks:
            return handler  # without a body parameter, dependencies already come first

        async def authenticated(request: Request) -> Response:
            for check in checks:
                if inspect.iscoroutinefunction(check):
                    await check(request)
                else:
                    await run_in_threadpool(check, request)
            return await handler(request)

        return authenticated

    def _lean_handler(
        self, fallback: Callable[[Request], Coroutine[Any, Any, Response]]
    ) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        d = self.dependant
        shape = [d.header_params, d.cookie_params]
        dependencies = [(sub.name, sub.call) for sub in d.dependencies]
        # Whether each check is awaited or run in the pool: decided once, not per request.
        awaited = [inspect.iscoroutinefunction(call) for _, call in dependencies]
        if (
            any(shape)
            or len(d.body_params) > 1
            or (d.body_params and self.body_field is not d.body_params[0])  # embedded
            or not inspect.iscoroutinefunction(self.endpoint)
            or any(name is None or call not in HEADER_CHECKS for name, call in dependencies)
            or d.response_param_name
            or d.background_tasks_param_name
        ):
            raise TypeError(
                f"{self.path}: a lean route takes a request, header checks, "
                "path and query parameters and at most one JSON body"
            )
        fallback = _in_exit_stacks(fallback)
        endpoint = self.endpoint
        queries = list(d.query_params)
        body_field = self.body_field
        body_name = d.body_params[0].name if d.body_params else None
        paths = [p.name for p in d.path_params]
        request_name = d.request_param_name
        response_field = self.response_field
        status = self.status_code or 200

        async def handle(request: Request) -> Response:
            values: dict[str, Any] = {}
            for (name, call), is_async in zip(dependencies, awaited, strict=True):
                assert name is not None and call is not None
                if is_async:
                    values[name] = await call(request)
                else:
                    values[name] = await run_in_threadpool(call, request)
            raw: Any = None
            if body_field is not None and body_name is not None:
                if not _is_json(request.headers.get("content-type", "")):
                    return await fallback(request)
                try:
                    raw = json_body(await request.body())
                except ValueError:
                    return await fallback(request)  # its "JSON decode error", as before
                except ClientDisconnect as exc:  # gone before its body came: as FastAPI,
                    # a 400 nobody reads, not an unexpected error logged with its traceback
                    raise HTTPException(400, "There was an error parsing the body") from exc
            errors: list[Any] = []
            if queries:  # as FastAPI: the query's errors, then the body's, in one 422
                found, errors = request_params_to_args(queries, request.query_params)
                values.update(found)
            if body_field is not None and body_name is not None:
                body, wrong = body_field.validate(raw, values, loc=("body",))
                if wrong:
                    errors += wrong
                else:
                    values[body_name] = body
            if errors:
                raise RequestValidationError(errors, body=raw)
            for name in paths:
                values[name] = request.path_params[name]
            if request_name is not None:
                values[request_name] = request
            answer = await endpoint(**values)
            if isinstance(answer, Response):
                return answer
            content = await serialize_response(
                field=response_field, response_content=answer, dump_json=True
            )
            return Response(content, status_code=status, media_type="application/json")

        return handle


def _in_exit_stacks(
    handler: Callable[[Request], Coroutine[Any, Any, Response]],
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """FastAPI's handler with the exit stacks it expects in the scope (`request_response`
    and FastAPI's exit-stack middleware set them on the full stack; the coordinator's hot
    dispatch, `csml.coordinator.middleware.HotRoutes`, does not)."""

    async def handle(request: Request) -> Response:
        scope = request.scope
        if "fastapi_inner_astack" in scope:
            return await handler(request)
        async with contextlib.AsyncExitStack() as files:
            scope["fastapi_middleware_astack"] = files
            async with contextlib.AsyncExitStack() as request_stack:
                scope["fastapi_inner_astack"] = request_stack
                async with contextlib.AsyncExitStack() as function_stack:
                    scope["fastapi_function_astack"] = function_stack
                    return await handler(request)

    return handle


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized(
            "this call needs `Authorization: Bearer <token>`; "
            "create an identity with POST /v1/identities (or `csml id new`)"
        )
    return token.strip()


def identity_from(c: Core, token: str) -> IdentityRow:
    """The token's identity: remembered (`c.identities`) or looked up, then remembered."""
    token_hash = ids.hash_secret(token)
    found = c.identities.get(token_hash)
    if found is not None:
        return found
    with read_each(c.engine) as conn:
        found = identities.identity_by_token(conn, token_hash)
    if found is None:
        raise unauthorized("the token is not valid (unknown or erased identity)")
    c.identities.put(found)
    return found


@from_headers
async def current_identity(request: Request) -> IdentityRow:
    """The caller's identity; on the event loop when remembered, else one query off it."""
    c = core(request)
    token = bearer(request)
    found = c.identities.get(ids.hash_secret(token))
    if found is not None:
        return found
    return await run_in_threadpool(identity_from, c, token)


@from_headers
def current_join_token(request: Request) -> JoinTokenRow:
    c = core(request)
    token = bearer(request)
    with read_each(c.engine) as conn:
        found = workers.join_token_by_hash(conn, ids.hash_secret(token))
    if found is None or found.revoked_at is not None:
        raise unauthorized("the join token is not valid or was revoked; ask the operator for one")
    return found


@from_headers
def current_worker(request: Request) -> WorkerRow:
    """The calling worker; refused once its join token is revoked."""
    token_hash = ids.hash_secret(bearer(request))
    cached = WORKER_TOKENS.get(token_hash)
    if cached is not None:
        return cached
    with read_each(core(request).engine) as conn:
        found = workers.worker_by_token(conn, token_hash)
    if found is None:
        raise unauthorized("unknown worker token; register again with a join token")
    if found.revoked_at is not None:
        raise unauthorized("this worker's join token was revoked")
    if found.worker.stopped_at is not None:
        raise unauthorized("this worker has left; register again")
    WORKER_TOKENS.put(token_hash, found.worker)
    return found.worker
