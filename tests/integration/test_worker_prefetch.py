"""A worker with a prefetch (2 slots + 8, as bench (a) runs it): claims of several
jobs, completions riding claims. Every job runs once with its own result, every completion
is sent exactly once (riding a claim or alone), no job is told to stop, and the
agent's counters (logged when it leaves) add up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from csml.client import Job
from tests.cluster import Cluster

# Starts a coordinator and a worker process (30-120 s under load).
pytestmark = pytest.mark.timeout(300)

JOBS = 120


def left_the_cluster(cluster: Cluster) -> dict[str, Any]:
    for line in (cluster.log_dir / "worker-echo-0.log").read_text().splitlines():
        if '"left the cluster"' in line:
            return dict(json.loads(line))
    raise AssertionError("the worker did not log its counters:\n" + cluster.logs())


def test_a_prefetching_worker_runs_each_job_once_and_its_counters_add_up(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path, {"CSML_QUEUE_CAPACITY": str(2 * JOBS)})
    try:
        cluster.start_coordinator()
        worker = cluster.start_worker("echo", 2, ("--prefetch", "8", "--log-format", "json"))
        cluster.wait_workers("echo", 1)
        users = [cluster.new_user() for _ in range(3)]
        submitted: list[tuple[int, Job]] = []
        for start in range(0, JOBS, 20):
            user = users[(start // 20) % len(users)]
            items = [{"params": {"i": i}} for i in range(start, start + 20)]
            jobs = user.submit_many("echo", "echo", items)
            assert all(isinstance(j, Job) for j in jobs), jobs
            submitted.extend(zip(range(start, start + 20), jobs, strict=True))  # type: ignore[arg-type]
        for i, job in submitted:
            job.wait(timeout=120)
            assert job.state.value == "succeeded", job.data.error
            assert (job.result or {}).get("params", {}).get("i") == i
        worker.terminate()
        worker.wait(timeout=60)
        stats = left_the_cluster(cluster)
        log = (cluster.log_dir / "worker-echo-0.log").read_text()
    finally:
        cluster.stop()
    assert stats["jobs"] == stats["claimed"] == JOBS
    assert stats["riding"] + stats["alone"] == JOBS
    assert stats["claims"] >= JOBS // 10  # at most slots + prefetch per claim
    assert stats["busy_s"] > 0
    assert "stopping job" not in log  # no job of this worker was said to be cancelled or lost
