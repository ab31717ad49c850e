"""Random identifiers and secrets, shared by every layer.

Ids follow Docker's container-id rule: 64 lowercase hex characters from the OS
CSPRNG, drawn again while the 12-character short form would parse as a number,
so that a short id never looks like one. The CSPRNG's bytes are fetched for 64 ids
at a time (`_Draws`): `os.urandom` releases the GIL, and on a busy coordinator each
release let the writer thread take it for up to a switch interval (5 ms) while the
event loop waited, once per job submitted. Each draw is used once; a forked child
starts with none of its parent's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading

ID_LENGTH = 64
SHORT_ID_LENGTH = 12
_HEX = re.compile(r"^[0-9a-f]+$")


class _Draws:
    """32-byte draws from the OS CSPRNG, fetched `BATCH` at a time (see the module)."""

    SIZE = 32
    BATCH = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = b""
        self._at = 0

    def take(self) -> bytes:
        with self._lock:
            at = self._at
            if at + self.SIZE > len(self._bytes):
                self._bytes = os.urandom(self.SIZE * self.BATCH)
                at = 0
            self._at = at + self.SIZE
            return self._bytes[at : at + self.SIZE]

    def forget(self) -> None:
        """In a forked child: drop the parent's draws (and its lock's state)."""
        self._lock = threading.Lock()
        self._bytes = b""
        self._at = 0


_DRAWS = _Draws()
os.register_at_fork(after_in_child=_DRAWS.forget)


def new_id() -> str:
    """A fresh 256-bit id in hex whose short form is not all digits."""
    while True:
        candidate = _DRAWS.take().hex()
        if not candidate[:SHORT_ID_LENGTH].isdigit():
            return candidate


def short(id_: str) -> str:
    return id_[:SHORT_ID_LENGTH]


def is_id_prefix(text: str) -> bool:
    """Whether `text` can name an id: lowercase hex, 12 to 64 characters."""
    return SHORT_ID_LENGTH <= len(text) <= ID_LENGTH and bool(_HEX.match(text))


def new_secret(prefix: str) -> str:
    """A 256-bit bearer secret; the prefix tells a reader what kind it is."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    """SHA-256 of a high-entropy secret: the only form the store keeps.

    A plain hash suffices (no slow KDF) because the secret is 256 random bits.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)
