"""The operator view: workers, queues, recent throughput and failures, join tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from csml.schemas.apps import QueueInfo


class OperatorWorker(BaseModel):
    id: str
    app: str
    state: Literal["live", "silent", "left"] = Field(
        description="live: heartbeat recent; silent: no recent heartbeat; left: deregistered."
    )
    slots: int
    running: int = Field(description="Jobs it holds now.")
    sandbox: str
    registered_at: datetime
    last_heartbeat: datetime
    heartbeat_age_seconds: float
    contributed: bool = Field(False, description="Joined with an identity's contributed token.")
    labels: dict[str, bool | int | float | str] = Field(
        {}, description="The placement labels it announced (see docs/user-guide/placement.md)."
    )


class OperatorApp(BaseModel):
    name: str
    workers: int = Field(description="Live workers.")
    slots: int = Field(description="Live slots.")
    queue: QueueInfo


class OperatorOverview(BaseModel):
    generated_at: datetime
    apps: list[OperatorApp]
    workers: list[OperatorWorker] = Field(
        description="Workers not deregistered, and those that left in the last hour."
    )


class MinuteStats(BaseModel):
    start: datetime
    submitted: int
    finished: int = Field(description="Jobs that reached a final state in this minute.")
    succeeded: int
    failed: int
    cancelled: int
    jobs_per_second: float = Field(description="finished / 60.")
    latency_mean_seconds: float | None = Field(
        None, description="Submission to end, jobs that succeeded or failed."
    )
    latency_p95_seconds: float | None = None
    wait_mean_seconds: float | None = Field(None, description="Submission to start.")


class FailureReason(BaseModel):
    reason: str = Field(description="The error's first line, ids and numbers folded.")
    count: int
    apps: list[str]


class OperatorStats(BaseModel):
    window_minutes: int
    minutes: list[MinuteStats] = Field(description="Oldest first, one per minute.")
    failures: list[FailureReason] = Field(description="Failed jobs in the window, most first.")


class JoinTokenRow(BaseModel):
    id: str
    label: str
    created_at: datetime
    revoked_at: datetime | None
    apps: list[str] | None = Field(
        description="Apps its workers may serve; null: any app (a token made before tokens "
        "named their apps, or with any_app; replace it with a bound one)."
    )
    may_publish: bool = Field(description="Its workers may announce a new app version.")
    workers: int = Field(description="Live workers that joined with it.")
    contributed: bool = Field(
        False, description="An identity's contributed token (`csml contribute`), not yours."
    )


class JoinTokenList(BaseModel):
    tokens: list[JoinTokenRow]


class JoinTokenRequest(BaseModel):
    label: str = Field("", max_length=200, description="A note for you, e.g. the machine.")
    apps: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,39}$")]] = Field(
        [], max_length=64, description="The apps its workers may serve (registering another: 403)."
    )
    any_app: bool = Field(False, description="Serve any app instead (not recommended).")
    publish: bool = Field(
        False, description="Its workers may announce a new version of their apps' manifests."
    )

    @model_validator(mode="after")
    def _apps_or_any(self) -> JoinTokenRequest:
        if bool(self.apps) == self.any_app:
            raise ValueError("name the apps the token may serve (apps), or set any_app: true")
        return self
