"""Random identifiers and secrets, shared by every layer.

Ids follow Docker's container-id rule: 64 lowercase hex characters from the OS
CSPRNG, drawn again while the 12-character short form would parse as a number,
so that a short id never looks like one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

ID_LENGTH = 64
SHORT_ID_LENGTH = 12
_HEX = re.compile(r"^[0-9a-f]+$")


def new_id() -> str:
    """A fresh 256-bit id in hex whose short form is not all digits."""
    while True:
        candidate = secrets.token_hex(32)
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
