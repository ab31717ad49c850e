"""A job whose input and output are over 256 KiB and within 1 MiB costs the worker no
request of its own: real coordinator and worker processes; the input comes inline in the
claim (no `GET …/inputs/{name}`), the output goes inline with the completion (no `PUT
…/outputs/{name}`), and the owner gets the same bytes back. An output over the
coordinator's inline bound is still uploaded."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, running_cluster

pytestmark = pytest.mark.timeout(300)

INPUT = "GET /v1/workers/{worker_id}/jobs/{job_id}/inputs/{name}"
OUTPUT = "PUT /v1/workers/{worker_id}/jobs/{job_id}/outputs/{name}"


def counts(cluster: Cluster) -> dict[str, float]:
    """Requests answered so far by "METHOD route" (from the coordinator's /metrics)."""
    text = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("csml_http_request_duration_seconds_count{"):
            method = line.split('method="', 1)[1].split('"', 1)[0]
            route = line.split('route="', 1)[1].split('"', 1)[0]
            key = f"{method} {route}"
            out[key] = out.get(key, 0.0) + float(line.rpartition(" ")[2])
    return out


def echo_round_trip(cluster: Cluster, data: bytes, tmp_path: Path) -> bytes:
    user = cluster.new_user()
    job = user.submit("echo", "echo", files={"data": data}).wait(120)
    assert job.state.value == "succeeded", job.error
    return job.download("data", tmp_path / "out").read_bytes()


def test_files_within_1_mib_ride_the_claim_and_the_completion(tmp_path: Path) -> None:
    settings = {"CSML_MAX_UPLOAD_BYTES": str(4 << 20)}
    with running_cluster(tmp_path / "c", settings, {"echo": 1}) as cluster:
        data = os.urandom(700_000)
        before = counts(cluster)
        assert echo_round_trip(cluster, data, tmp_path) == data
        after = counts(cluster)
    assert after.get(INPUT, 0) == before.get(INPUT, 0)
    assert after.get(OUTPUT, 0) == before.get(OUTPUT, 0)


def test_an_output_over_the_coordinators_inline_bound_is_uploaded(tmp_path: Path) -> None:
    # 3/8 of a 1 MiB worker body: 393,216 bytes inline at most.
    settings = {"CSML_MAX_UPLOAD_BYTES": str(4 << 20), "CSML_MAX_WORKER_JSON_BYTES": str(1 << 20)}
    with running_cluster(tmp_path / "c", settings, {"echo": 1}) as cluster:
        data = os.urandom(500_000)
        before = counts(cluster)
        assert echo_round_trip(cluster, data, tmp_path) == data
        after = counts(cluster)
    assert after.get(OUTPUT, 0) == before.get(OUTPUT, 0) + 1
