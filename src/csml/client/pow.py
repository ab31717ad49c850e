"""Proof of work for new identities (hashcash-style), solved on the client.

The coordinator hands out a signed `challenge` and a `difficulty` in bits; a
solution is a `nonce` such that SHA-256(challenge || nonce), over their UTF-8
bytes, starts with `difficulty` zero bits. Each extra bit doubles the expected
work (2**difficulty hashes on average); checking a solution costs one hash.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

ALGORITHM = "sha256-leading-zero-bits"
_BATCH = 65536


def leading_zero_bits(digest: bytes) -> int:
    """How many zero bits `digest` starts with."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def is_solution(challenge: str, nonce: str, difficulty: int) -> bool:
    digest = hashlib.sha256(challenge.encode() + nonce.encode()).digest()
    return leading_zero_bits(digest) >= difficulty


def solve(
    challenge: str,
    difficulty: int,
    *,
    timeout: float | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> str:
    """The first decimal nonce that solves `challenge` at `difficulty` bits.

    A pure-Python loop over `hashlib`: the prefix is hashed once and copied for
    each candidate. `on_progress` sees the number of hashes tried every 65,536.
    Raises TimeoutError after `timeout` seconds.
    """
    if difficulty <= 0:
        return "0"
    if difficulty > 256:
        raise ValueError(f"difficulty {difficulty} is above 256 bits")
    width = (difficulty + 7) // 8
    shift = width * 8 - difficulty
    prefix = hashlib.sha256(challenge.encode())
    deadline = None if timeout is None else time.monotonic() + timeout
    from_bytes = int.from_bytes
    start = 0
    while True:
        for nonce in range(start, start + _BATCH):
            h = prefix.copy()
            h.update(str(nonce).encode())
            if from_bytes(h.digest()[:width], "big") >> shift == 0:
                return str(nonce)
        start += _BATCH
        if on_progress is not None:
            on_progress(start)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no solution at {difficulty} bits within {timeout:g} s")
