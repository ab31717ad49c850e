"""The one error body every 4xx/5xx answer carries."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable kind, e.g. `queue_full`, `invalid_params`.")
    message: str = Field(description="What was wrong and what to do about it.")
    field: str | None = Field(None, description="The request field at fault, when there is one.")
    details: list[dict[str, object]] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
