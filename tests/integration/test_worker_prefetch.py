"""A worker with a prefetch (2 slots + 8, as bench (a) runs it): claims of several
jobs, completions riding claims. Every job runs once with its own result, every completion
is sent exactly once (riding a claim or alone), no job is told to stop, and the
agent's counters (logged when it leaves) add up."""

from __future__ import annotations

import json
import subprocess
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


def drained(
    cluster: Cluster, worker: subprocess.Popen[bytes], numbered: list[tuple[int, Job]]
) -> dict[str, Any]:
    """Wait for each job in turn (it must succeed with its own `i`), then stop the worker:
    its counters as it left the cluster."""
    for i, job in numbered:
        job.wait(timeout=120)
        assert job.state.value == "succeeded", job.data.error
        assert (job.result or {}).get("params", {}).get("i") == i
    worker.terminate()
    worker.wait(timeout=60)
    return left_the_cluster(cluster)


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
        stats = drained(cluster, worker, submitted)
        log = (cluster.log_dir / "worker-echo-0.log").read_text()
    finally:
        cluster.stop()
    assert stats["jobs"] == stats["claimed"] == JOBS
    assert stats["riding"] + stats["alone"] == JOBS
    assert stats["claims"] >= JOBS // 10  # at most slots + prefetch per claim
    assert stats["busy_s"] > 0
    assert "stopping job" not in log  # no job of this worker was said to be cancelled or lost


SLOW_JOBS = 24


def run_slow_jobs(tmp_path: Path, count: int, sleep: float, hold: str) -> dict[str, Any]:
    """Queue `count` echo jobs of `sleep` seconds each, then start a worker of one slot
    with a prefetch of 8 and `--completion-hold hold`: every job must succeed in order;
    the worker's counters as it left the cluster."""
    cluster = Cluster(tmp_path, {"CSML_QUEUE_CAPACITY": str(2 * count)})
    try:
        cluster.start_coordinator()
        user = cluster.new_user()
        # Queued before the worker joins: its first claim fills the prefetch.
        jobs = user.submit_many(
            "echo", "echo", [{"params": {"i": i, "sleep": sleep}} for i in range(count)]
        )
        worker = cluster.start_worker(
            "echo",
            1,
            ("--prefetch", "8", "--completion-hold", hold, "--log-format", "json"),
        )
        numbered: list[tuple[int, Job]] = []
        for i, job in enumerate(jobs):
            assert isinstance(job, Job), job
            numbered.append((i, job))
        stats = drained(cluster, worker, numbered)
    finally:
        cluster.stop()
    assert stats["jobs"] == stats["claimed"] == count
    return stats


def test_a_full_prefetch_is_refilled_at_half_not_after_every_job(tmp_path: Path) -> None:
    """Jobs that each take far longer than a claim: while the local prefetch is more than
    half full a job's end sends nothing, its completion rides the refill claim with those
    of the jobs after it. (An agent that claimed after every job's end, as before, sent
    about one claim per job.)"""
    # A hold far longer than the run: only the refills at half send completions.
    stats = run_slow_jobs(tmp_path, SLOW_JOBS, 0.05, "60")
    assert stats["riding"] + stats["alone"] == SLOW_JOBS
    # A refill at half of 8 brings about 4 jobs: at most half a claim per job, with room.
    assert stats["claims"] <= SLOW_JOBS // 2, stats


def test_a_completion_waits_for_the_refill_no_longer_than_its_hold(tmp_path: Path) -> None:
    """Jobs far longer than the hold (0.5 s against 0.05 s): each completion's hold ends
    before the next job does, so its claim goes then, one per job or nearly, however
    full the prefetch. (Were completions held until the refill at half, these 20 jobs
    behind a prefetch of 8 went in 16 requests.)"""
    count = 20
    stats = run_slow_jobs(tmp_path, count, 0.5, "0.05")
    # The first claim, then a request per job's end (riding a claim or alone): about
    # count + 1; held until the refills, 16 (5 s idle checks ending some holds).
    assert stats["claims"] + stats["alone_batches"] >= count - 1, stats
