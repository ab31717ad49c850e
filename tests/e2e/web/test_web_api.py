"""The API the pages use: the job event stream, queue positions, operator stats, page headers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cluster import Cluster, wait_for
from tests.e2e.web.conftest import OPERATOR_TOKEN

# A cluster and a headless browser.
pytestmark = pytest.mark.timeout(300)


def events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    name, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


def test_event_stream_follows_my_jobs_only(web_cluster: Cluster) -> None:
    me, other = web_cluster.new_user(), web_cluster.new_user()
    first = me.submit("echo", "echo", files={"data": b"one"}).wait(60)
    theirs = other.submit("echo", "echo", files={"data": b"theirs"}).wait(60)
    r = httpx.get(f"{web_cluster.url}/v1/jobs/events")
    assert r.status_code == 401
    headers = {"Authorization": f"Bearer {me.token}"}
    seen: dict[str, str] = {}
    with httpx.stream("GET", f"{web_cluster.url}/v1/jobs/events", headers=headers, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        stream = events(r)
        name, data = next(stream)
        assert name == "snapshot"
        assert [j["id"] for j in data["jobs"]] == [first.id]
        second = me.submit("echo", "echo", files={"data": b"two"}, params={"sleep": 0.5})
        for name, data in stream:
            assert name in ("job", "reconnect"), name
            if name == "reconnect":
                break
            assert data["id"] != theirs.id
            seen[data["id"]] = data["state"]
            if seen.get(second.id) == "succeeded":
                break
    assert seen.get(second.id) == "succeeded"


def test_event_streams_per_identity_are_bounded(web_cluster: Cluster) -> None:
    me = web_cluster.new_user()
    headers = {"Authorization": f"Bearer {me.token}"}
    with httpx.Client(base_url=web_cluster.url, headers=headers, timeout=30) as http:
        streams = [http.stream("GET", "/v1/jobs/events") for _ in range(4)]
        opened = [s.__enter__() for s in streams]
        try:
            lines = [s.iter_lines() for s in opened]  # kept: a dropped iterator closes it
            for s, it in zip(opened, lines, strict=True):
                assert s.status_code == 200
                assert next(it) == "event: snapshot"
            r = http.get("/v1/jobs/events")
            assert r.status_code == 429
            assert "at most 4 event streams" in r.json()["error"]["message"]
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    # Closed streams free their places.
    wait_for(lambda: _opens(web_cluster, headers), timeout=10)


def _opens(cluster: Cluster, headers: dict[str, str]) -> bool:
    with httpx.stream("GET", f"{cluster.url}/v1/jobs/events", headers=headers, timeout=30) as r:
        return r.status_code == 200


def test_queue_positions(web_cluster: Cluster) -> None:
    me = web_cluster.new_user()
    jobs = [me.submit("echo", "echo", params={"sleep": 60}) for _ in range(3)]
    headers = {"Authorization": f"Bearer {me.token}"}
    try:
        wait_for(lambda: me.job(jobs[0].id).state.value == "running", timeout=30)
        asked = {"positions": "true"}  # positions are computed only when asked
        listed = httpx.get(f"{web_cluster.url}/v1/jobs", params=asked, headers=headers).json()[
            "jobs"
        ]
        places = {j["id"]: j["queue_position"] for j in listed}
        assert places[jobs[0].id] is None
        assert [places[jobs[1].id], places[jobs[2].id]] == [1, 2]
        one = httpx.get(
            f"{web_cluster.url}/v1/jobs/{jobs[2].id}", params=asked, headers=headers
        ).json()
        assert one["queue_position"] == 2
        # A newcomer's job is served before the first user's second queued job (fair queue).
        newcomer = web_cluster.new_user()
        theirs = newcomer.submit("echo", "echo", params={"sleep": 60})
        r = httpx.get(
            f"{web_cluster.url}/v1/jobs/{theirs.id}",
            params=asked,
            headers={"Authorization": f"Bearer {newcomer.token}"},
        ).json()
        assert r["queue_position"] == 2
        theirs.cancel()
    finally:
        for job in jobs:
            job.cancel()


def test_operator_stats_count_finished_and_failed_jobs(web_cluster: Cluster) -> None:
    op = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}

    def totals() -> tuple[int, int, int]:
        s = httpx.get(f"{web_cluster.url}/v1/operator/stats?minutes=60", headers=op).json()
        assert len(s["minutes"]) == 60
        return (
            sum(m["finished"] for m in s["minutes"]),
            sum(m["failed"] for m in s["minutes"]),
            sum(f["count"] for f in s["failures"]),
        )

    before = totals()
    me = web_cluster.new_user()
    started = time.monotonic()
    for _ in range(3):
        me.submit("echo", "echo", files={"data": b"x"}).wait(60)
    crashed = me.submit("echo", "crash").wait(60)
    assert crashed.state.value == "failed"
    after = totals()
    if time.monotonic() - started < 50:  # all within the window's edges
        assert after[0] - before[0] == 4
        assert after[1] - before[1] == 1
        assert after[2] - before[2] == 1
    s = httpx.get(f"{web_cluster.url}/v1/operator/stats?minutes=5", headers=op).json()
    recent = [m for m in s["minutes"] if m["finished"]]
    assert recent and all(m["latency_mean_seconds"] is not None for m in recent)
    assert all(m["latency_p95_seconds"] >= 0 for m in recent)
    r = httpx.get(f"{web_cluster.url}/v1/operator/stats?minutes=0", headers=op)
    assert r.status_code == 422 and r.json()["error"]["field"] == "minutes"


def test_pages_and_assets_are_served_with_a_strict_policy(web_cluster: Cluster) -> None:
    for path in ("/", "/operator", "/static/js/app.js", "/static/style.css"):
        r = httpx.get(f"{web_cluster.url}{path}")
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    assert httpx.head(f"{web_cluster.url}/").status_code == 200
    assert (
        "text/javascript"
        in httpx.get(f"{web_cluster.url}/static/js/app.js").headers["content-type"]
    )
    for bad in ("/static/../routes.py", "/static/%2e%2e/routes.py", "/static/nope.js"):
        assert httpx.get(f"{web_cluster.url}{bad}").status_code == 404, bad
    html = httpx.get(f"{web_cluster.url}/").text
    assert "<script>" not in html and "http://" not in html and "https://" not in html


def test_every_page_asset_is_package_data() -> None:
    """`pip install csml` (not editable) must bring the page: each asset matches a glob of
    [tool.setuptools.package-data] in pyproject.toml."""
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    root = Path(__file__).parents[3]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["csml"]
    package = root / "src" / "csml"
    assets = [p for p in (package / "web" / "static").rglob("*") if p.is_file()]
    assert len(assets) >= 10
    missing = [
        str(p.relative_to(package))
        for p in assets
        if not any(fnmatch(str(p.relative_to(package)), g) for g in globs)
    ]
    assert missing == []
