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
`csml.store.workers` on a plain connection (no ORM session on this path).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from csml import ids
from csml.coordinator.errors import unauthorized
from csml.coordinator.state import Core, core
from csml.coordinator.worker_tokens import CACHE as WORKER_TOKENS
from csml.store import identities, workers
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


class AuthFirstRoute(APIRoute):
    """A route that runs its header checks before FastAPI reads its body parameter.

    Routers use it as their `route_class`; FastAPI builds every included copy of a
    route from `get_route_handler`, so the order holds however the router is included.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks = list(dict.fromkeys(_header_checks(self.dependant)))
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
    with c.engine.connect() as conn:
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
    with c.engine.connect() as conn:
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
    with core(request).engine.connect() as conn:
        found = workers.worker_by_token(conn, token_hash)
    if found is None:
        raise unauthorized("unknown worker token; register again with a join token")
    if found.revoked_at is not None:
        raise unauthorized("this worker's join token was revoked")
    if found.worker.stopped_at is not None:
        raise unauthorized("this worker has left; register again")
    WORKER_TOKENS.put(token_hash, found.worker)
    return found.worker
