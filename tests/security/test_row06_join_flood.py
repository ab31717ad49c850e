"""Issue 12, row 6: one client cannot lock everyone out of joining.

Against a real coordinator with a small target rate (5 new identities per minute)
and a low base difficulty (8 bits, so the test is quick): a flood of identities is
never refused with `identity_rate_limited` (before the fix the sixth got a 429 and
so did every newcomer until the window ended); instead each challenge asks for
more work, one bit per doubling of the recent rate, up to the cap; a newcomer who
solves the current challenge gets in during the flood; a challenge collected
before the flood (at the base difficulty) is refused once the difficulty has risen
past it, so stockpiling cheap challenges does not buy a flood.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from csml.client import pow as client_pow
from tests.cluster import Cluster, running_cluster

BASE, TARGET, EXTRA = 8, 5, 3
SETTINGS = {
    "CSML_POW_DIFFICULTY": str(BASE),
    "CSML_IDENTITY_RATE_LIMIT": str(TARGET),
    "CSML_IDENTITY_RATE_WINDOW_SECONDS": "600",
    "CSML_POW_MAX_EXTRA_BITS": str(EXTRA),
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("row06"), SETTINGS) as cluster:
        yield cluster


def challenge(url: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/identities/challenge", timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def solve(issued: dict[str, Any]) -> dict[str, str]:
    nonce = client_pow.solve(issued["challenge"], issued["difficulty"])
    return {"challenge": issued["challenge"], "nonce": nonce}


def join(url: str, body: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/identities", json=body, timeout=30)


def test_a_flood_raises_the_difficulty_and_locks_no_one_out(cluster: Cluster) -> None:
    url = cluster.url
    assert challenge(url)["difficulty"] == BASE
    stockpiled = solve(challenge(url))  # collected cheaply before the flood

    seen: list[int] = []
    statuses: list[int] = []
    for _ in range(TARGET * 2**EXTRA + 5):  # past the cap
        issued = challenge(url)
        seen.append(issued["difficulty"])
        r = join(url, solve(issued))
        statuses.append(r.status_code)
        assert r.status_code == 201, r.text  # never identity_rate_limited
    assert set(statuses) == {201}
    # One more bit per doubling of the rate past the target, never above the cap.
    assert seen[:TARGET] == [BASE] * TARGET
    assert seen == sorted(seen)
    assert seen[TARGET] == BASE + 1 and seen[2 * TARGET] == BASE + 2
    assert max(seen) == BASE + EXTRA == seen[-1]

    # The stockpiled base-difficulty challenge is now too easy (not rate-limited).
    r = join(url, stockpiled)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "challenge_too_easy", r.text

    # A newcomer takes the current challenge; the flood goes on while it solves it;
    # its solution is still accepted (the difficulty is at the cap).
    newcomer = challenge(url)
    assert newcomer["difficulty"] == BASE + EXTRA
    for _ in range(10):
        assert join(url, solve(challenge(url))).status_code == 201
    r = join(url, solve(newcomer))
    assert r.status_code == 201, r.text
    # And the SDK (and so the CLI) gets in too.
    assert cluster.client().create_identity().token
