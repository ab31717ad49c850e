"""API errors: every refusal names what was wrong and what to do.

The one place where domain refusals (`csml.refusals`) become HTTP: `STATUS` maps each
kind to a status code, and `install_handlers` renders every refusal, validation
error, unknown route and unexpected failure as the same JSON body (`ErrorBody`).
`ApiError` is for the API modules themselves (routes, auth, middleware); services
and the store raise refusals and never name a status.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from csml import refusals
from csml.schemas.errors import ErrorBody, ErrorDetail

STATUS: dict[type[refusals.Refusal], int] = {
    refusals.Malformed: 400,
    refusals.Unauthenticated: 401,
    refusals.Forbidden: 403,
    refusals.NotFound: 404,
    refusals.Conflict: 409,
    refusals.TooLarge: 413,
    refusals.UnsupportedMedia: 415,
    refusals.Invalid: 422,
    refusals.RateLimited: 429,
    refusals.QuotaExceeded: 429,
    refusals.QueueFull: 429,
    refusals.Unavailable: 503,
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers
        self.details = details

    def response(self) -> JSONResponse:
        body = ErrorBody(
            error=ErrorDetail(
                code=self.code, message=self.message, field=self.field, details=self.details
            )
        )
        return JSONResponse(
            body.model_dump(exclude_none=True), status_code=self.status, headers=self.headers
        )


def status_of(refusal: refusals.Refusal) -> int:
    """The HTTP status of a refusal: its kind's, or its nearest mapped base's."""
    for kind in type(refusal).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 400


def from_refusal(refusal: refusals.Refusal) -> ApiError:
    """The HTTP form of a domain refusal (Retry-After when it passes with time)."""
    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after else None
    if isinstance(refusal, refusals.Unauthenticated):
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return ApiError(
        status_of(refusal),
        refusal.code,
        refusal.message,
        field=refusal.field,
        headers=headers,
        details=refusal.details,
    )


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"no {what} {ident!r} is visible to you")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(refusals.Refusal)
    async def _refusal(_: Request, exc: refusals.Refusal) -> JSONResponse:
        return from_refusal(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _field_path(tuple(first.get("loc", ())))
        details = [
            {"field": _field_path(tuple(e.get("loc", ()))), "message": e.get("msg", "")}
            for e in errors
        ]
        return ApiError(
            422, "invalid_request", f"{field}: {first.get('msg')}", field=field, details=details
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = "no such route; see /docs for the API"
        return ApiError(exc.status_code, code, message).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("csml.coordinator").exception("unexpected error")
        return ApiError(
            500, "internal_error", "the coordinator failed to handle this request; it was logged"
        ).response()


def spec_error(exc: ValidationError) -> ApiError:
    """A submitted `spec` that does not validate: 422 naming its first bad field."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return ApiError(422, "invalid_spec", f"spec is not valid JSON: {err['msg']}", field="spec")
    loc = ".".join(str(p) for p in err["loc"])
    field = f"spec.{loc}" if loc else "spec"
    return ApiError(422, "invalid_spec", f"{field}: {err['msg']}", field=field)
