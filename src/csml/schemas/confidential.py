"""Confidential jobs on the wire: only ciphertext, keys wrapped for attested workers.

Binary values are standard base64 (RFC 4648, padded). What each one holds, and the
encryption that produced it, is described in README.md ("Confidential jobs").
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_EVIDENCE_B64 = 256 * 1024
MAX_COLLATERAL_VALUE = 1024 * 1024
MAX_COLLATERAL_KEYS = 32
MAX_PARAMS_B64 = 200 * 1024
MAX_RESULT_B64 = 1024 * 1024


def _b64(value: str, what: str, size: int | None = None) -> str:
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError(f"{what} must be base64") from None
    if size is not None and len(data) != size:
        raise ValueError(f"{what} must be {size} bytes (base64), not {len(data)}")
    return value


class Recipient(BaseModel):
    model_config = ConfigDict(extra="forbid")
    worker_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    wrapped_key: str = Field(
        max_length=200,
        description="The job's data key sealed (crypto_box_seal) to the worker's X25519 key.",
    )

    @field_validator("wrapped_key")
    @classmethod
    def _wrapped(cls, v: str) -> str:
        return _b64(v, "wrapped_key", 80)


class ConfidentialSpec(BaseModel):
    """`spec.confidential`: the job is end-to-end encrypted to the listed workers."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    job_nonce: str = Field(max_length=64, description="32 random bytes chosen by the client.")
    recipients: list[Recipient] = Field(min_length=1, max_length=64)
    result_public_key: str = Field(
        max_length=64, description="The client's per-job X25519 key for the results."
    )
    encrypted_params: str = Field(
        max_length=MAX_PARAMS_B64,
        description="XChaCha20-Poly1305 (data key) of the parameters and what binds them.",
    )

    @field_validator("job_nonce")
    @classmethod
    def _nonce(cls, v: str) -> str:
        return _b64(v, "job_nonce", 32)

    @field_validator("result_public_key")
    @classmethod
    def _pk(cls, v: str) -> str:
        return _b64(v, "result_public_key", 32)

    @field_validator("encrypted_params")
    @classmethod
    def _params(cls, v: str) -> str:
        return _b64(v, "encrypted_params")

    @field_validator("recipients")
    @classmethod
    def _unique(cls, v: list[Recipient]) -> list[Recipient]:
        if len({r.worker_id for r in v}) != len(v):
            raise ValueError("a worker is listed twice among the recipients")
        return v


class EncryptedResult(BaseModel):
    """A confidential job's result or error, readable only by its client."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    worker_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    key_box: str = Field(
        max_length=200,
        description="The result key, boxed (crypto_box) from the worker's attested key to "
        "the client's result key.",
    )
    ciphertext: str = Field(
        max_length=MAX_RESULT_B64, description="XChaCha20-Poly1305 (result key) of the result."
    )

    @field_validator("key_box")
    @classmethod
    def _box(cls, v: str) -> str:
        return _b64(v, "key_box", 72)

    @field_validator("ciphertext")
    @classmethod
    def _ct(cls, v: str) -> str:
        return _b64(v, "ciphertext")


class WorkerAttestation(BaseModel):
    """What a worker registers: its public key and evidence binding it."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$", description="e.g. sgx-dcap, none.")
    public_key: str = Field(max_length=64, description="X25519, base64.")
    evidence: str = Field("", max_length=MAX_EVIDENCE_B64, description="base64; empty for none.")
    collateral: dict[str, str] | None = Field(
        None, description="Verification collateral the operator gave the worker."
    )

    @field_validator("public_key")
    @classmethod
    def _pk(cls, v: str) -> str:
        return _b64(v, "public_key", 32)

    @field_validator("evidence")
    @classmethod
    def _evidence(cls, v: str) -> str:
        return _b64(v, "evidence")

    @field_validator("collateral")
    @classmethod
    def _collateral(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (
            len(v) > MAX_COLLATERAL_KEYS
            or any(len(k) > 64 or len(s) > MAX_COLLATERAL_VALUE for k, s in v.items())
        ):
            raise ValueError("collateral is too large")
        return v


class ClaimedConfidential(BaseModel):
    """What a recipient worker gets with a claimed confidential job (its own wrapped key)."""

    job_nonce: str
    wrapped_key: str
    result_public_key: str
    encrypted_params: str


class WorkerKeyInfo(BaseModel):
    """One live worker of an app, as a client sees it before encrypting a job to it."""

    worker_id: str
    app: str
    kind: str = Field(description="Evidence kind: sgx-dcap, tdx-dcap, none, ...")
    public_key: str
    evidence: str = Field(description="base64")
    collateral: dict[str, str] | None
    insecure: bool = Field(
        description="True when there is no attestation: the operator can read the jobs."
    )
    registered_at: datetime
    last_heartbeat: datetime
