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
method, route template and status (`csml_http_request_seconds`), as the former
`@app.middleware("http")` did, without its extra task and memory stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csml.coordinator.errors import ApiError
from csml.schemas.batches import MAX_BATCH_BODY_BYTES

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


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


class _Guard:
    """One request: counts its body against its limit, and watches the response."""

    def __init__(self, settings: Settings, scope: Scope, receive: Receive, send: Send) -> None:
        self.settings = settings
        self.scope = scope
        self._receive = receive
        self._send = send
        headers = Headers(scope=scope)
        self.content_type = headers.get("content-type", "")
        self.declared = _content_length(headers)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
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
