"""API errors: every refusal names what was wrong and what to do."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from csml.schemas.errors import ErrorBody, ErrorDetail


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
