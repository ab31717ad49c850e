"""Pipelines: one submission that chains operations across applications.

A pipeline is sent to `POST /v1/jobs` like a job, with `steps` instead of
`app`/`operation`. Each step's inputs are wired by name to an uploaded file
part (`upload:<part>`) or to an output of an earlier step (`<step>.<output>`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from csml.schemas.jobs import LimitsRequest

MAX_STEPS = 8
STEP_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,23}$"
UPLOAD_PREFIX = "upload:"


class StepSpec(BaseModel):
    """One step: an operation of an app, its params, and where each input comes from."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        pattern=STEP_NAME_PATTERN,
        description="Unique in the pipeline; its outputs are `<name>.<output>`.",
    )
    app: str = Field(min_length=1, max_length=40)
    operation: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = {}
    inputs: dict[str, str] = Field(
        {},
        description="Input name -> `upload:<file part>` or `<earlier step>.<output>`.",
    )


class PipelineSpec(BaseModel):
    """The `spec` part of a pipeline submission (files: one part per `upload:` name)."""

    model_config = ConfigDict(extra="forbid")
    steps: list[StepSpec] = Field(min_length=1, max_length=MAX_STEPS)
    limits: LimitsRequest | None = Field(None, description="Applied to every step.")
