"""Row 1 of the hardening review: request bodies are bounded and come after authentication.

Against a real coordinator process: a 1 GB body (streamed from a generator, never
held in memory here) to the identity, worker, operator and job routes, announced
by `Content-Length` or chunked, with no token, a wrong one and a valid one. Each is
refused (401 before the body, or 413 naming the limit) long before the gigabyte
is sent, and the coordinator's resident memory grows by less than 20 MB.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, running_cluster
from tests.security.raw_http import MiB, PeakRss, padding, send

GB = 1 << 30
OPERATOR = "operator-secret-for-row-01"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("row01")
    with running_cluster(root, {"CSML_OPERATOR_TOKEN": OPERATOR}) as c:
        yield c


def tokens(cluster: Cluster) -> dict[str, str]:
    user = cluster.new_user()
    return {"identity": user.token or "", "join": cluster.join_token, "operator": OPERATOR}


# (route, the token kind it takes or None)
ROUTES = [
    ("/v1/identities", None),
    ("/v1/workers", "join"),
    ("/v1/operator/join-tokens", "operator"),
    ("/v1/jobs", "identity"),
    ("/v1/jobs/batch", "identity"),
]


def cases() -> Iterator[tuple[str, str | None, str, bool]]:
    for path, kind in ROUTES:
        for auth in ("valid", "none", "wrong") if kind else ("none",):
            for chunked in (False, True):
                yield path, kind, auth, chunked


@pytest.mark.parametrize(
    ("path", "kind", "auth", "chunked"),
    list(cases()),
    ids=lambda v: str(v),
)
def test_1gb_body_refused_without_reading_it(
    cluster: Cluster, path: str, kind: str | None, auth: str, chunked: bool
) -> None:
    headers = {"Content-Type": "application/json"}
    if kind is not None and auth == "valid":
        headers["Authorization"] = f"Bearer {tokens(cluster)[kind]}"
    elif auth == "wrong":
        headers["Authorization"] = "Bearer not-a-token"
    assert cluster.coordinator is not None
    # Warm up the route (imports, pools) so the measure is of this body alone.
    send(cluster.url, "POST", path, padding(2 * MiB), length=None, headers=headers)
    with PeakRss(cluster.coordinator.pid) as rss:
        before = rss.process.memory_info().rss
        answer = send(
            cluster.url,
            "POST",
            path,
            padding(GB),
            length=None if chunked else GB,
            headers=headers,
        )
    grew = (rss.peak - before) / MiB
    print(
        f"{path} auth={auth} chunked={chunked}: {answer.status}, client sent "
        f"{answer.sent / MiB:.1f} MiB, coordinator RSS +{grew:.1f} MiB"
    )
    error = answer.json()["error"]
    if kind is not None and auth != "valid":
        assert answer.status == 401, answer.body
        assert error["code"] == "unauthorized"
    else:
        assert answer.status == 413, answer.body
        assert error["code"] == "body_too_large"
        assert "bytes" in error["message"] and "CSML_MAX_" in error["message"]
    assert answer.headers.get("connection") == "close"
    assert answer.sent < 256 * MiB, "the client could send far more than the limit"
    assert grew < 20, f"the coordinator grew by {grew:.1f} MiB"


def test_small_bodies_still_work(cluster: Cluster) -> None:
    """The limits leave ordinary requests alone (a join-token creation, an identity)."""
    created = httpx.post(
        f"{cluster.url}/v1/operator/join-tokens",
        headers={"Authorization": f"Bearer {OPERATOR}"},
        json={"label": "x", "apps": ["echo"]},
    )
    assert created.status_code == 201, created.text
    assert cluster.new_user().token
