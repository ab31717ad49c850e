"""The confidential-job protocol shared by clients and workers.

Client -> worker, under the job's random data key K (sealed to each recipient worker):
    encrypted_params = XChaCha20-Poly1305(K, AD("params", nonce),
        JSON {"v": 1, "app", "operation", "params", "inputs": [names], "result_public_key"})
    every input file  = secretstream(K, AD("input", nonce, name))
Worker -> client, under a fresh result key R, boxed from the worker's attested key to the
client's per-job result key (so only that client can read it, and it knows which attested
worker wrote it):
    encrypted_result  = {"worker_id", "key_box": box(R), "ciphertext": XChaCha20-Poly1305(R,
        AD("result", nonce), JSON {"v": 1, "state", "result", "error", "outputs"})}
    every output file = secretstream(R, AD("output", nonce, name))

The manifest inside encrypted_params carries the client's result key: the coordinator
cannot swap in a key of its own without breaking the authentication of the params.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nacl.public import PrivateKey

from csml.crypto.aead import open_message, seal_message
from csml.crypto.binding import associated_data
from csml.crypto.errors import DecryptionError
from csml.crypto.keys import b64d, b64e, box_key, unbox_key
from csml.schemas.confidential import EncryptedResult

VERSION = 1


@dataclass(frozen=True)
class JobManifest:
    app: str
    operation: str
    params: dict[str, Any]
    inputs: list[str]
    result_public_key: bytes


def seal_manifest(data_key: bytes, job_nonce: bytes, manifest: JobManifest) -> bytes:
    body = json.dumps(
        {
            "v": VERSION,
            "app": manifest.app,
            "operation": manifest.operation,
            "params": manifest.params,
            "inputs": sorted(manifest.inputs),
            "result_public_key": b64e(manifest.result_public_key),
        },
        separators=(",", ":"),
    ).encode()
    return seal_message(data_key, body, associated_data("params", job_nonce))


def open_manifest(data_key: bytes, job_nonce: bytes, sealed: bytes) -> JobManifest:
    plain = open_message(data_key, sealed, associated_data("params", job_nonce), "params")
    try:
        data = json.loads(plain)
        if data.get("v") != VERSION:
            raise ValueError(f"unknown version {data.get('v')!r}")
        return JobManifest(
            app=str(data["app"]),
            operation=str(data["operation"]),
            params=dict(data["params"]),
            inputs=[str(n) for n in data["inputs"]],
            result_public_key=b64d(data["result_public_key"], "result_public_key", 32),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DecryptionError(f"the decrypted params are malformed: {exc}") from None


@dataclass
class ResultPayload:
    state: str
    result: dict[str, Any] | None = None
    error: str | None = None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "v": VERSION,
                "state": self.state,
                "result": self.result,
                "error": self.error,
                "outputs": self.outputs,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ResultPayload:
        try:
            data = json.loads(raw)
            if data.get("v") != VERSION:
                raise ValueError(f"unknown version {data.get('v')!r}")
            return cls(
                state=str(data["state"]),
                result=data["result"],
                error=data["error"],
                outputs=dict(data.get("outputs") or {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DecryptionError(f"the decrypted result is malformed: {exc}") from None


def seal_result(
    payload: ResultPayload,
    *,
    result_key: bytes,
    worker_id: str,
    worker_key: PrivateKey,
    client_public_key: bytes,
    job_nonce: bytes,
) -> EncryptedResult:
    return EncryptedResult(
        worker_id=worker_id,
        key_box=b64e(box_key(result_key, worker_key, client_public_key)),
        ciphertext=b64e(
            seal_message(result_key, payload.to_json(), associated_data("result", job_nonce))
        ),
    )


def open_result_key(
    encrypted: EncryptedResult, *, result_key: PrivateKey, worker_public_key: bytes
) -> bytes:
    return unbox_key(b64d(encrypted.key_box, "key_box"), result_key, worker_public_key)


def open_result(
    encrypted: EncryptedResult,
    *,
    result_key: PrivateKey,
    worker_public_key: bytes,
    job_nonce: bytes,
) -> tuple[ResultPayload, bytes]:
    """The decrypted result and the key that opens the job's output files."""
    key = open_result_key(encrypted, result_key=result_key, worker_public_key=worker_public_key)
    plain = open_message(
        key,
        b64d(encrypted.ciphertext, "ciphertext"),
        associated_data("result", job_nonce),
        "result",
    )
    return ResultPayload.from_json(plain), key
