"""The client's proof-of-work solver, and its agreement with the coordinator's check."""

from __future__ import annotations

import hashlib
import secrets
import statistics
import time

import pytest

from csml.client import pow
from csml.coordinator import abuse
from csml.coordinator.config import Settings


def random_challenge(difficulty: int) -> str:
    return f"v1.{difficulty}.1900000000.{secrets.token_hex(16)}.{secrets.token_hex(32)}"


def test_leading_zero_bits() -> None:
    assert pow.leading_zero_bits(b"\x00\x00\xff") == 16
    assert pow.leading_zero_bits(b"\x00\x01") == 15
    assert pow.leading_zero_bits(b"\x80") == 0
    assert pow.leading_zero_bits(b"\x00" * 32) == 256
    for _ in range(200):
        digest = secrets.token_bytes(32)
        assert pow.leading_zero_bits(digest) == abuse.leading_zero_bits(digest)


@pytest.mark.parametrize("difficulty", [1, 4, 8, 12, 13])
def test_solutions_have_the_leading_zero_bits(difficulty: int) -> None:
    challenge = random_challenge(difficulty)
    nonce = pow.solve(challenge, difficulty)
    digest = hashlib.sha256((challenge + nonce).encode()).digest()
    assert abuse.leading_zero_bits(digest) >= difficulty
    assert pow.is_solution(challenge, nonce, difficulty)
    # The first solution: no smaller decimal nonce works.
    assert not any(pow.is_solution(challenge, str(n), difficulty) for n in range(int(nonce)))


def test_difficulty_zero_needs_no_work() -> None:
    assert pow.solve("anything", 0) == "0"


def test_an_unsolvable_difficulty_times_out() -> None:
    started = time.monotonic()
    seen: list[int] = []
    with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
        pow.solve(random_challenge(200), 200, timeout=0.2, on_progress=seen.append)
    assert time.monotonic() - started < 5
    assert seen and seen == sorted(seen)
    with pytest.raises(ValueError):
        pow.solve("x", 257)


def test_the_default_difficulty_is_solved_well_under_a_second() -> None:
    difficulty = Settings().pow_difficulty
    assert difficulty > 0
    times = []
    for _ in range(12):
        challenge = random_challenge(difficulty)
        started = time.perf_counter()
        pow.solve(challenge, difficulty)
        times.append(time.perf_counter() - started)
    print(
        f"\ndifficulty {difficulty}: median {statistics.median(times):.3f} s, "
        f"mean {statistics.mean(times):.3f} s, max {max(times):.3f} s"
    )
    # Expected 2**difficulty hashes; generous bounds for a busy test machine.
    assert statistics.median(times) < 1.0
