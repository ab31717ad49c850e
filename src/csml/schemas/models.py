"""Model artifacts as clients see them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelInfo(BaseModel):
    id: str
    app: str = Field(description="The app whose workers read it.")
    kind: str = Field(description="What it is, e.g. `svm`, `mlp`, `char-rnn`, `dnn`.")
    format: str
    format_version: int
    name: str = Field(description="The output (or imported file) it came from.")
    operation: str | None = Field(None, description="The operation that made it.")
    job_id: str | None = Field(None, description="The job that made it; none if imported.")
    size: int
    sha256: str
    media_type: str
    created_at: datetime
    metrics: dict[str, Any] = Field({}, description="The result of the job that made it.")


class ModelList(BaseModel):
    models: list[ModelInfo]


class ModelImport(BaseModel):
    """The `spec` part of `POST /v1/models`."""

    model_config = ConfigDict(extra="forbid")
    app: str = Field(min_length=1, max_length=40)
    format: str = Field(min_length=1, max_length=64)
    format_version: int | None = Field(
        None, ge=1, description="Default: the newest version the app's workers read."
    )
    name: str = Field("model", pattern=r"^[a-z][a-z0-9_]{0,63}$")
