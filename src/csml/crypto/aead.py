"""One-shot authenticated encryption of small messages (params, results, errors).

`crypto_aead_xchacha20poly1305_ietf` with a random 24-byte nonce; the output is
nonce || ciphertext || tag.
"""

from __future__ import annotations

import secrets

from nacl import bindings
from nacl.exceptions import CryptoError

from csml.crypto.errors import DecryptionError

NONCE_BYTES = bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_BYTES = bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES


def seal_message(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def open_message(key: bytes, sealed: bytes, ad: bytes, what: str = "message") -> bytes:
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionError(f"the encrypted {what} is truncated ({len(sealed)} bytes)")
    nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        return bytes(bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(body, ad, nonce, key))
    except CryptoError:
        raise DecryptionError(
            f"the encrypted {what} failed authentication: it was altered, or belongs to another job"
        ) from None
