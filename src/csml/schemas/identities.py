"""Anonymous identities and operator join tokens."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class IdentityCreated(BaseModel):
    id: str = Field(description="64 hex characters; the only thing the service knows of you.")
    token: str = Field(description="Bearer secret, shown once. Keep it: it cannot be recovered.")


class IdentityInfo(BaseModel):
    id: str
    created_at: datetime


class JoinTokenCreated(BaseModel):
    id: str
    token: str = Field(
        description="Give this to a worker (`csml worker --join-token`). Shown once."
    )


class JoinTokenInfo(BaseModel):
    id: str
    label: str
    created_at: datetime
    revoked_at: datetime | None
