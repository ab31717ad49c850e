"""Typed errors carrying the server's message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class Answer(Protocol):
    """What `raise_for` reads of an answer: an `httpx.Response` or a `csml.link.LinkResponse`
    (whose `headers` are by lower-case name; httpx's are case-insensitive)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


class CsmlError(Exception):
    status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status if status is not None else self.status
        self.code = code
        self.field = field


class InvalidRequest(CsmlError):
    """400 or 422: the request was wrong; `field` names the part at fault."""


class Unauthorized(CsmlError):
    status = 401


class NotFound(CsmlError):
    status = 404


class Conflict(CsmlError):
    status = 409


class TooLarge(CsmlError):
    status = 413


class TooManyRequests(CsmlError):
    """429: come back after `retry_after` seconds."""

    status = 429

    def __init__(self, message: str, *, retry_after: float, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class QueueFull(TooManyRequests):
    """The application's queue is at capacity."""


class RateLimited(TooManyRequests):
    """A per-identity rate limit or quota was hit; the message says which."""


class ServerError(CsmlError):
    """5xx: the coordinator failed; try again later."""


class Unreachable(CsmlError):
    """No answer from the coordinator at all."""


class WaitTimeout(CsmlError):
    """The job did not finish within the time given to `wait`."""


_BY_STATUS: dict[int, type[CsmlError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    415: InvalidRequest,
    422: InvalidRequest,
}


def raise_for(response: Answer) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    message = error.get("message") or f"HTTP {response.status_code}: {response.text[:200]}"
    kw = {"status": response.status_code, "code": error.get("code"), "field": error.get("field")}
    if response.status_code == 429:
        retry = float(response.headers.get("retry-after", "1") or 1)
        kind = QueueFull if error.get("code") == "queue_full" else RateLimited
        raise kind(message, retry_after=retry, **kw)
    raise _BY_STATUS.get(response.status_code, ServerError)(message, **kw)
