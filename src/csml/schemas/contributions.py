"""Contributed workers: what an identity asks for and sees, and the operator's settings."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

APP_PATTERN = r"^[a-z][a-z0-9_-]{0,39}$"


class ContributionRequest(BaseModel):
    app: str = Field(pattern=APP_PATTERN, description="The one app your worker will serve.")
    label: str = Field("", max_length=200, description="A note for yourself (e.g. the host).")


class ContributionCreated(BaseModel):
    id: str
    app: str
    token: str = Field(description="The join token for your worker. Shown once.")
    worker_command: list[str] = Field(
        description="Starts the worker (argv); it reads the token on its standard input."
    )
    container_command: list[str] = Field(
        description="The same worker in the app's hardened image (argv, podman or docker); "
        "the token goes in the file ./csml-join-token."
    )


class ContributedWorkerInfo(BaseModel):
    id: str
    app_version: str | None
    slots: int
    sandbox: str
    registered_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None


class ContributionInfo(BaseModel):
    id: str
    app: str
    label: str
    created_at: datetime
    revoked_at: datetime | None
    workers: list[ContributedWorkerInfo]


class ContributionList(BaseModel):
    contributions: list[ContributionInfo]


class ContributionSettingRequest(BaseModel):
    allowed: bool | None = Field(
        None, description="Take contributed workers for the app (absent: leave as is)."
    )
    max_workers: int | None = Field(
        None,
        ge=0,
        description="At most this many live contributed workers (null: no cap; absent: leave).",
    )
    credit_weight: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="Credit per wall second of a run of the app, earned by contributors and "
        "spent by priority (0: no credit for the app; absent: leave; default 1.0).",
    )
    verification: str | None = Field(
        None,
        max_length=32,
        description="How contributed workers' results are checked: `none`, `replicate:K` "
        "(2..5) or `spot-check:P` (0 < P <= 1); `default` for the coordinator's default "
        "(absent: leave as is). See docs/operator-guide/verification.md.",
    )


class ContributionSettingInfo(BaseModel):
    app: str
    allowed: bool
    max_workers: int | None
    default: bool = Field(description="True when the operator set nothing (CSML_CONTRIBUTIONS).")
    contributed_workers: int = Field(description="Live contributed workers of the app now.")
    credit_weight: float = Field(1.0, description="Credit per wall second of a run of the app.")
    verification: str = Field(
        "replicate:2", description="The app's verification policy in force (see the request)."
    )
    verification_default: bool = Field(
        True, description="True when the operator set no policy for the app (the default)."
    )


class ContributedWorkerRecord(BaseModel):
    """A contributed worker's record against accepted results (the operator's view)."""

    id: str
    app: str
    agreements: int
    disagreements: int
    reputation: int = Field(description="agreements - 10 x disagreements.")
    probation: bool
    quarantined_at: datetime | None
    stopped_at: datetime | None


class ContributedWorkerRecords(BaseModel):
    workers: list[ContributedWorkerRecord]
