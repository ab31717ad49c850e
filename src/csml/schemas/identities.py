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


class IdentityChallenge(BaseModel):
    """A proof-of-work challenge for creating an identity (`POST /v1/identities/challenge`)."""

    challenge: str = Field(description="Opaque, signed by the service; usable once.")
    difficulty: int = Field(
        description="Leading zero bits SHA-256(challenge || nonce) must have; 0: no work needed."
    )
    algorithm: str = Field(
        "sha256-leading-zero-bits",
        description="SHA-256 over the UTF-8 bytes of the challenge followed by the nonce.",
    )
    expires_at: datetime = Field(description="Solve and use it before this time.")


class IdentityProof(BaseModel):
    """The body of `POST /v1/identities`: a solved challenge."""

    challenge: str = Field(max_length=512, description="As issued, unchanged.")
    nonce: str = Field(
        max_length=128, description="Any string such that the hash has the leading zero bits."
    )


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
