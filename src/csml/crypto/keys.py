"""X25519 keys and the wrapping of 32-byte data keys.

Client -> worker: the job's data key is sealed (`crypto_box_seal`, anonymous sender) to
each accepted worker's attested public key.
Worker -> client: the result key is boxed (`crypto_box`, X25519 + XSalsa20-Poly1305)
from the worker's attested private key to the client's per-job result public key, so the
client knows the result comes from a worker it attested, not from the coordinator (which
knows the client's result public key and could otherwise seal a forged result to it).
"""

from __future__ import annotations

import base64
import binascii
import secrets

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey, SealedBox

from csml.crypto.errors import DecryptionError

KEY_BYTES = 32
WRAPPED_KEY_BYTES = 32 + KEY_BYTES + 16  # ephemeral public key, key, MAC
BOXED_KEY_BYTES = 24 + KEY_BYTES + 16


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str, what: str = "value", size: int | None = None) -> bytes:
    """Strict standard base64; `size` (if given) is the exact decoded length."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if size is not None and len(data) != size:
        raise ValueError(f"{what} must be {size} bytes, not {len(data)}")
    return data


def new_data_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def wrap_key(data_key: bytes, recipient: bytes) -> bytes:
    """Seal a data key to a worker's X25519 public key (80 bytes)."""
    return SealedBox(PublicKey(recipient)).encrypt(data_key)


def unwrap_key(wrapped: bytes, private_key: PrivateKey) -> bytes:
    try:
        key = SealedBox(private_key).decrypt(wrapped)
    except CryptoError:
        raise DecryptionError(
            "the job key was not sealed to this worker's key (or was altered)"
        ) from None
    if len(key) != KEY_BYTES:
        raise DecryptionError("the unwrapped job key has the wrong length")
    return key


def box_key(data_key: bytes, sender: PrivateKey, recipient: bytes) -> bytes:
    """Authenticated encryption of a data key from `sender` to `recipient` (nonce || box)."""
    return bytes(Box(sender, PublicKey(recipient)).encrypt(data_key))


def unbox_key(boxed: bytes, recipient: PrivateKey, sender: bytes) -> bytes:
    try:
        key = Box(recipient, PublicKey(sender)).decrypt(boxed)
    except CryptoError:
        raise DecryptionError(
            "the result key does not open with the worker's attested key and this job's "
            "result key: the result was altered or does not come from that worker"
        ) from None
    if len(key) != KEY_BYTES:
        raise DecryptionError("the result key has the wrong length")
    return key
