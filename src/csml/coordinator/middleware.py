"""Pure-ASGI middleware of the coordinator: request-body limits and request latency.

Invariants of `BodyLimits`:
- No request body is read past its limit. A `Content-Length` over the limit is
  refused before the first byte is read; otherwise the bytes of the
  `http.request` messages are counted as they arrive (chunked or not) and the
  request is refused the moment the count passes the limit.
- A refusal is a 413 JSON error (`body_too_large`) naming the limit in bytes and
  the setting that sets it; whatever the route then answers is replaced by it.
- Any response that starts before the body was read to its end carries
  `Connection: close`, so the server never reads the rest (a 401 from
  authentication before the body, a 413, a 422 on a form part's headers).
- The limit is that of the route, chosen when the route first reads its body
  (routing has happened by then): uploads have their own (`UPLOAD_ROUTES`), a
  batch submission its own (`MAX_BATCH_BODY_BYTES`, or less with a smaller
  `max_request_bytes`),
  a job spec sent as JSON its own, a worker's JSON its own; every other body
  gets `max_json_bytes`. Routes never read a body before authenticating (see
  `csml.coordinator.auth.authenticate_before_body`).

`ObserveLatency` records each HTTP request's time to its response headers by
method, route template and status (`csml_http_request_duration_seconds`), as the former
`@app.middleware("http")` did, without its extra task and memory stream.

`HotRoutes` serves the `lean` hot routes in front of all of that, in one layer that
does what those layers (and Starlette's and FastAPI's own) do for such a request;
`tests/unit/test_lean_routes.py` and `tests/unit/test_hot_front.py` pin that it
answers as the full stack does.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csml.coordinator.errors import ApiError
from csml.schemas.batches import MAX_BATCH_BODY_BYTES

try:  # FastAPI's included-router contexts (0.165): without them, no hot dispatch
    from fastapi.routing import (
        _FASTAPI_EFFECTIVE_ROUTE_CONTEXT_KEY,
        _FASTAPI_SCOPE_KEY,
        _effective_route_context_var,
        _EffectiveRouteContext,
        _iter_routes_with_context,
    )

    ROUTE_CONTEXTS = True
except ImportError:  # pragma: no cover - another FastAPI: every request takes the full stack
    ROUTE_CONTEXTS = False

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from csml.coordinator.config import Settings

SUBMISSION = "submission"
OUTPUT = "output"
BATCH = "batch"
# Routes whose body is a stream of files: (method, route template) -> kind.
UPLOAD_ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/v1/jobs"): SUBMISSION,
    ("POST", "/v1/models"): SUBMISSION,
    ("POST", "/v1/jobs/batch"): BATCH,
    ("PUT", "/v1/workers/{worker_id}/jobs/{job_id}/outputs/{name}"): OUTPUT,
}
WORKER_PREFIX = "/v1/workers"
# Room for the multipart framing and the spec part on top of the files' own limit.
FORM_OVERHEAD = 1 << 20


@dataclass(frozen=True)
class BodyLimit:
    size: int
    what: str
    setting: str


def limit_for(settings: Settings, method: str, template: str, content_type: str) -> BodyLimit:
    """The body limit of a request to the route `template`."""
    kind = UPLOAD_ROUTES.get((method, template))
    if kind == OUTPUT:
        return BodyLimit(settings.max_output_bytes, "an output file", "CSML_MAX_OUTPUT_BYTES")
    if kind == BATCH:
        return BodyLimit(
            min(settings.max_request_bytes, MAX_BATCH_BODY_BYTES),
            "a batch submission",
            "CSML_MAX_REQUEST_BYTES",
        )
    if kind == SUBMISSION:
        if content_type.startswith("multipart/"):
            return BodyLimit(
                settings.max_request_bytes + settings.max_spec_bytes + FORM_OVERHEAD,
                "a multipart submission",
                "CSML_MAX_REQUEST_BYTES",
            )
        return BodyLimit(settings.max_spec_bytes, "a job spec", "CSML_MAX_SPEC_BYTES")
    if template.startswith(WORKER_PREFIX):
        return BodyLimit(
            settings.max_worker_json_bytes, "a worker's JSON body", "CSML_MAX_WORKER_JSON_BYTES"
        )
    return BodyLimit(settings.max_json_bytes, "a JSON body", "CSML_MAX_JSON_BYTES")


class BodyTooLarge(ApiError):
    def __init__(self, limit: BodyLimit) -> None:
        super().__init__(
            413,
            "body_too_large",
            f"the request body is over {limit.size} bytes, the limit of {limit.what} "
            f"on this coordinator ({limit.setting}); send less",
            field="body",
            headers={"Connection": "close"},
        )


def _content_length(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


# The headers a `_Guard` reads (ASGI header names are lower-case bytes).
_GUARDED = (b"content-type", b"content-length", b"transfer-encoding")


def _guarded_headers(scope: Scope) -> dict[bytes, str]:
    """The first value of each `_GUARDED` header, as `Headers.get` gives it, from one pass
    over the scope's headers (not a `Headers` walk per name)."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _GUARDED and name not in found:
            found[name] = value.decode("latin-1")
    return found


class _Guard:
    """One request: counts its body against its limit, and watches the response."""

    def __init__(self, settings: Settings, scope: Scope, receive: Receive, send: Send) -> None:
        self.settings = settings
        self.scope = scope
        self._receive = receive
        self._send = send
        headers = _guarded_headers(scope)
        self.content_type = headers.get(b"content-type", "")
        self.declared = _content_length(headers.get(b"content-length"))
        chunked = "chunked" in headers.get(b"transfer-encoding", "").lower()
        self.body_left = chunked or (self.declared or 0) > 0
        self.limit: BodyLimit | None = None
        self.received = 0
        self.refused: BodyTooLarge | None = None
        self.started = False
        self.swallow = False

    def _limit(self) -> BodyLimit:
        if self.limit is None:
            route = self.scope.get("route")
            template = getattr(route, "path", None) or self.scope.get("path", "")
            self.limit = limit_for(self.settings, self.scope["method"], template, self.content_type)
        return self.limit

    def _refuse(self, limit: BodyLimit) -> BodyTooLarge:
        self.refused = BodyTooLarge(limit)
        return self.refused

    async def receive(self) -> Message:
        if self.refused is not None:
            raise self.refused
        limit = self._limit()
        if self.declared is not None and self.declared > limit.size:
            raise self._refuse(limit)
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.body_left = False
            if self.received > limit.size:
                raise self._refuse(limit)
        elif message["type"] == "http.disconnect":
            self.body_left = False
        return message

    async def send(self, message: Message) -> None:
        if self.swallow:
            return
        if message["type"] == "http.response.start":
            self.started = True
            if self.refused is not None and message["status"] != 413:
                # The route turned the refusal into something else (e.g. "cannot parse").
                self.swallow = True
                await self.respond(self.refused)
                return
            if self.body_left:
                MutableHeaders(scope=message)["connection"] = "close"
        await self._send(message)

    async def respond(self, error: ApiError) -> None:
        response = error.response()
        if self.body_left:
            response.headers["connection"] = "close"
        await response(self.scope, self._receive, self._send)


class BodyLimits:
    """Bounds every request body while it streams (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = _Guard(self.settings, scope, receive, send)
        try:
            await self.app(scope, guard.receive, guard.send)
        except BodyTooLarge:
            if guard.started:
                raise
        if guard.refused is not None and not guard.started:
            await guard.respond(guard.refused)


class ObserveLatency:
    """Observes each request's time to its response headers, by method, route and status."""

    def __init__(self, app: ASGIApp, latency: Histogram) -> None:
        self.app = app
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                template = getattr(route, "path", "unmatched")
                self.latency.labels(scope["method"], template, str(message["status"])).observe(
                    time.perf_counter() - start
                )
            await send(message)

        await self.app(scope, receive, observed)


class HotRoutes:
    """Serves the `lean` routes (`csml.coordinator.auth.lean`) in one pure-ASGI layer.

    In front of the application's stack: a request whose method and path are those
    of a lean route (and of no route the router tries before it) does not walk the
    router (FastAPI's included routers try every route of every router in order)
    nor the layers of the stack. `_serve` does here, in one frame, what those layers
    do for such a request, in their order:

    - the scope the router would have given (`router`, `route`, `endpoint`,
      `path_params`, FastAPI's effective route);
    - `BodyLimits`: the body is counted through the same `_Guard.receive` (the route's
      limit, refused past it); whatever the route answers after a refusal is replaced
      by the 413, and an answer that starts before the body was read to its end
      carries `Connection: close`;
    - the route's handler (its `lean` handler, built as FastAPI builds it for the
      route) called on a `Request`, as `request_response` calls it;
    - an exception it raises goes to the application's handler for its class (or, for
      an `HTTPException`, its status), as `ExceptionMiddleware` and
      `wrap_app_handling_exceptions` do (`csml.coordinator.errors`: the same JSON);
    - `ObserveLatency`: the request's time to its response headers, by method, route
      template and final status (observed when the response is handed to the server,
      just before its headers go out);
    - an exception with no handler (a crash) gets the 500 JSON of the application's
      `Exception` handler (which logs it) if no response started, then is raised
      again, as `ServerErrorMiddleware` does: the server logs it and goes on.

    The response is sent with the server's own `send`: no wrapper per message (an
    event stream's chunks go straight out). This holds only while the application's
    user middleware are `ObserveLatency` and `BodyLimits` (each optional, in that
    order); with any other middleware, a `root_path`, a non-HTTP scope, FastAPI's
    telemetry, an application-wide body limit, or a FastAPI without included-router
    contexts (it reads FastAPI 0.165's `_EffectiveRouteContext`; `test_lean_routes`
    then fails) every request takes the full stack. The routes stay in the app, so
    OpenAPI is unchanged, and the full stack serves them as before when asked
    (`enabled`). `inner` is what serves a matched request (`_serve`).
    """

    def __init__(self, app: ASGIApp, application: FastAPI, lean: Iterable[object]) -> None:
        self.app = app
        self.router = application.router
        marked = set(map(id, lean))
        self.routes: list[tuple[_EffectiveRouteContext, list[Any]]] = []
        self.handlers: dict[int, Callable[[Request], Awaitable[Response]]] = {}
        earlier: list[Any] = []
        routes = _iter_routes_with_context(application.router.routes) if ROUTE_CONTEXTS else []
        for route, context in routes:
            if (
                context is not None
                and isinstance(route, APIRoute)
                and id(route.endpoint) in marked
                and context.app is not None
                and context.path_regex is not None
            ):
                shadows = [r for r in earlier if _may_shadow(r, context)]
                self.routes.append((context, shadows))
                self.handlers[id(context)] = _handler_of(route, context)
            earlier.append(context if context is not None else route)
        handlers: dict[Any, Any] = {}
        self.error_handler: Any = None
        for key, value in application.exception_handlers.items():
            if key in (500, Exception):
                self.error_handler = value
            else:
                handlers[key] = value
        # The same tables `ExceptionMiddleware` builds (its defaults, then the app's).
        tables = ExceptionMiddleware(app, handlers=handlers, debug=application.debug)
        self.exception_handlers: dict[Any, Any] = dict(tables._exception_handlers)
        self.status_handlers: dict[int, Any] = dict(tables._status_handlers)
        self.settings: Settings | None = None
        self.latency: Histogram | None = None
        # The histogram's child per (method, template, status): a few dozen, kept.
        self.observers: dict[tuple[str, str, int], Histogram] = {}
        layers: list[Any] = [m.cls for m in application.user_middleware]
        for cls, _, kwargs in application.user_middleware:
            if cls is BodyLimits:
                self.settings = kwargs["settings"]
            elif cls is ObserveLatency:
                self.latency = kwargs["latency"]
        known = layers in ([], [BodyLimits], [ObserveLatency], [ObserveLatency, BodyLimits])
        self.inner: ASGIApp = self._serve
        self.enabled = (
            bool(self.routes) and known and getattr(application, "max_body_size", None) is None
        )

    def _match(self, scope: Scope) -> tuple[_EffectiveRouteContext, dict[str, Any]] | None:
        if (
            not self.enabled
            or scope["type"] != "http"
            or scope.get("root_path")
            or "fastapi.telemetry" in scope
        ):
            return None
        method = scope["method"]
        path = scope["path"]
        for context, shadows in self.routes:
            if method not in context.methods:
                continue
            found = context.path_regex.match(path)
            if found is None:
                continue
            for shadow in shadows:
                if shadow.matches(scope)[0] is Match.FULL:
                    return None
            params = found.groupdict()
            for key, value in params.items():
                params[key] = context.param_convertors[key].convert(value)
            return context, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self._match(scope)
        if matched is None:
            await self.app(scope, receive, send)
            return
        context, params = matched
        scope["router"] = self.router
        scope["endpoint"] = context.endpoint
        scope["path_params"] = {**scope.get("path_params", {}), **params}
        scope.setdefault(_FASTAPI_SCOPE_KEY, {})[_FASTAPI_EFFECTIVE_ROUTE_CONTEXT_KEY] = context
        scope["route"] = context.original_route
        await self.inner(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One matched request, as the stack's layers would serve it (see the class)."""
        start = time.perf_counter()
        context = scope[_FASTAPI_SCOPE_KEY][_FASTAPI_EFFECTIVE_ROUTE_CONTEXT_KEY]
        guard = None
        if self.settings is not None:
            guard = _Guard(self.settings, scope, receive, send)
            receive = guard.receive
        request = Request(scope, receive, send)
        started = False
        try:
            try:
                response = await self.handlers[id(context)](request)
            except Exception as exc:
                response = await self._handled(request, exc)
            if guard is not None:
                if guard.refused is not None and response.status_code != 413:
                    response = guard.refused.response()  # the route turned it into another
                if guard.body_left:
                    response.headers["connection"] = "close"
            if self.latency is not None:
                template = getattr(scope.get("route"), "path", "unmatched")
                key = (scope["method"], template, response.status_code)
                observer = self.observers.get(key)
                if observer is None:
                    observer = self.observers[key] = self.latency.labels(
                        key[0], template, str(key[2])
                    )
                observer.observe(time.perf_counter() - start)
            started = True  # its headers go out first
            await response(scope, receive, send)
        except Exception as exc:
            if started:
                if self._handler_for(exc) is not None:
                    raise RuntimeError(
                        "Caught handled exception, but response already started."
                    ) from exc
                raise
            if self.error_handler is not None:
                answer = await self.error_handler(Request(scope), exc)
                await answer(scope, receive, send)
            raise

    def _handler_for(self, exc: Exception) -> Any:
        handler = None
        if isinstance(exc, HTTPException):
            handler = self.status_handlers.get(exc.status_code)
        if handler is None:
            for cls in type(exc).__mro__:
                if cls in self.exception_handlers:
                    return self.exception_handlers[cls]
        return handler

    async def _handled(self, request: Request, exc: Exception) -> Response:
        """The application's answer to `exc` (raised again when it has no handler)."""
        handler = self._handler_for(exc)
        if handler is None:
            raise exc
        if is_async_callable(handler):
            response = await handler(request, exc)
        else:
            response = await run_in_threadpool(handler, request, exc)
        exc.__traceback__ = None  # as Starlette: a reused exception keeps no traceback
        if not isinstance(response, Response):
            raise exc
        return response


def _handler_of(route: APIRoute, context: _EffectiveRouteContext) -> Any:
    """The route's request handler, built as FastAPI builds it for `context`."""
    token = _effective_route_context_var.set(context)
    try:
        return route.get_route_handler()
    finally:
        _effective_route_context_var.reset(token)


def _segments(path: str) -> list[str]:
    return path.strip("/").split("/")


def _may_shadow(earlier: Any, lean: _EffectiveRouteContext) -> bool:
    """Whether `earlier` (tried first by the router) might match a path that `lean` matches."""
    if not isinstance(earlier, _EffectiveRouteContext | Route) or not isinstance(
        getattr(earlier, "original_route", earlier), Route
    ):
        return True  # a mount, a websocket route, anything else: checked per request
    if earlier.methods and not (set(earlier.methods) & set(lean.methods)):
        return False
    if any(c.regex != "[^/]+" for c in earlier.param_convertors.values()):
        return True
    mine, theirs = _segments(lean.path_format), _segments(earlier.path_format)
    if len(mine) != len(theirs):
        return False
    return all(
        a == b or a.startswith("{") or b.startswith("{") for a, b in zip(mine, theirs, strict=True)
    )
