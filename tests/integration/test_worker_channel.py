"""The worker's channel to the coordinator, with real coordinator and worker processes:
a busy worker's completions ride its claims (no request of their own), a completion
that must not wait for a claim goes alone at once, and each job keeps one result."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.cluster import Cluster, post_counts, running_cluster

pytestmark = pytest.mark.timeout(300)

CLAIM = "/v1/workers/{worker_id}/claim"
COMPLETE = "/v1/workers/{worker_id}/complete"


def attempts(cluster: Cluster) -> dict[str, tuple[str, int]]:
    """Every job's (state, attempts), read from the coordinator's database."""
    with sqlite3.connect(cluster.data_dir / "csml.db") as db:
        return {i: (s, a) for i, s, a in db.execute("SELECT id, state, attempts FROM jobs")}


def test_a_busy_workers_completions_ride_its_claims(tmp_path: Path) -> None:
    """20 jobs queued for a worker with one slot: each completion rides the claim that
    takes the next job (that claim then answers at once), none goes alone; every job
    ran once and kept its own result."""
    with running_cluster(tmp_path) as cluster:
        user = cluster.new_user()
        jobs = [user.submit("echo", "echo", params={"i": i}) for i in range(20)]
        cluster.start_worker("echo", slots=1)
        for i, job in enumerate(jobs):
            job.wait(timeout=120)
            assert job.state.value == "succeeded"
            assert job.result == {"params": {"i": i, "sleep": 0.0}}
        counts = post_counts(cluster.url)
        assert counts.get(COMPLETE, 0) == 0, counts
        assert counts.get(CLAIM, 0) >= 20, counts  # the last completion rode one too
        assert set(attempts(cluster).values()) == {("succeeded", 1)}


def test_a_completion_does_not_wait_for_a_claim(tmp_path: Path) -> None:
    """A worker with a free slot long-polls for work (here up to 60 s): a job's completion
    ending meanwhile goes alone at once, not with the next claim."""
    with running_cluster(tmp_path, {"CSML_CLAIM_WAIT": "60"}, {"echo": 2}) as cluster:
        user = cluster.new_user()
        job = user.submit("echo", "echo", params={"sleep": 0.5})
        job.wait(timeout=50)  # well before the long-poll would have ended
        assert job.state.value == "succeeded"
        counts = post_counts(cluster.url)
        assert counts.get(COMPLETE, 0) == 1, counts
        assert attempts(cluster)[job.id] == ("succeeded", 1)


def test_completions_ending_together_each_keep_one_result(tmp_path: Path) -> None:
    """A worker with 4 slots and a long-polling claim: completions end together, some
    sent alone by their job's own thread, others by the sender or riding claims while
    one is being sent; every job ran once and kept its own result."""
    with running_cluster(tmp_path, {"CSML_CLAIM_WAIT": "60"}, {"echo": 4}) as cluster:
        user = cluster.new_user()
        jobs = [user.submit("echo", "echo", params={"i": i, "sleep": 0.05}) for i in range(40)]
        for i, job in enumerate(jobs):
            job.wait(timeout=120)
            assert job.state.value == "succeeded"
            assert job.result == {"params": {"i": i, "sleep": 0.05}}
        assert set(attempts(cluster).values()) == {("succeeded", 1)}
        counts = post_counts(cluster.url)
        assert counts.get(CLAIM, 0) + counts.get(COMPLETE, 0) <= 2 * len(jobs), counts
