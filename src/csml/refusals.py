"""Refusals: what the platform declines to do and why, without any HTTP.

The store and the coordinator's services raise these; exactly one place, the API's
error handlers (`csml.coordinator.errors.install_handlers`), turns each kind into
an HTTP status and a JSON body (`ErrorBody`: code, message, field, details). Below
the API nothing knows a status code.

Invariants: every refusal carries a stable machine `code` and a `message` that says
what was wrong and what to do; `field` names the offending input when there is
one (a dotted path such as `spec.params.scale`); `retry_after` (seconds) is set
only on refusals that pass with time (`RateLimited`, `QuotaExceeded`, `QueueFull`).
The kind, not the code, decides the status; codes may be shared across kinds.
"""

from __future__ import annotations

from typing import Any


class Refusal(Exception):
    """Base of every domain refusal. Subclasses say which kind of refusal it is."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        details: list[dict[str, Any]] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.details = details
        self.retry_after = retry_after


class Malformed(Refusal):
    """The request cannot be read as meant (an ambiguous id, a broken multipart body)."""


class Invalid(Refusal):
    """The request is readable but breaks a rule of the input (a bad spec or parameter)."""


class Unauthenticated(Refusal):
    """No valid credential was presented."""


class Forbidden(Refusal):
    """The credential is valid but may not do this."""


class NotFound(Refusal):
    """Nothing of that name is visible to the caller (another owner's things included)."""

    @classmethod
    def of(cls, what: str, ident: str) -> NotFound:
        return cls("not_found", f"no {what} {ident!r} is visible to you")


class Conflict(Refusal):
    """The thing exists but is in a state that does not allow this (e.g. already ended)."""


class TooLarge(Refusal):
    """A body, file or field is over its bound."""


class UnsupportedMedia(Refusal):
    """A body of a content type this route does not take."""


class RateLimited(Refusal):
    """Too many requests of this kind in the current window; retry after `retry_after`."""


class QuotaExceeded(Refusal):
    """The owner's quota (active jobs, stored bytes, models) would be exceeded."""


class QueueFull(Refusal):
    """The app's queue is at its bound; retry later."""


class Unavailable(Refusal):
    """A dependency (the store, a relay) cannot serve the request now."""
