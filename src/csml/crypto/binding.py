"""What binds keys to attestation evidence, and ciphertexts to their job and name."""

from __future__ import annotations

import hashlib
import secrets

REPORT_DATA_LABEL = b"csml-worker-key-v1"
REPORT_DATA_BYTES = 64
JOB_NONCE_BYTES = 32
AD_LABEL = b"csml-ad-v1"
PURPOSES = ("params", "input", "output", "result")


def worker_key_report_data(public_key: bytes, app: str) -> bytes:
    """The 64 bytes of report data a worker's evidence must carry for its key.

    SHA-256(b"csml-worker-key-v1" || public_key || app name), then 32 zero bytes.
    """
    if len(public_key) != 32:
        raise ValueError("an X25519 public key is 32 bytes")
    digest = hashlib.sha256(REPORT_DATA_LABEL + public_key + app.encode()).digest()
    return digest + bytes(REPORT_DATA_BYTES - len(digest))


def new_job_nonce() -> bytes:
    """A random per-job value chosen by the client; part of every associated data."""
    return secrets.token_bytes(JOB_NONCE_BYTES)


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def associated_data(purpose: str, job_nonce: bytes, name: str = "") -> bytes:
    """Associated data for one ciphertext: length-prefixed label, purpose, job nonce, name.

    An input ciphertext cannot be passed off as another input, as an output, or as any
    file of another job: its authentication tag covers all of these.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}")
    return b"".join(_field(part) for part in (AD_LABEL, purpose.encode(), job_nonce, name.encode()))
