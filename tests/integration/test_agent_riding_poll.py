"""One job at a time: a quick job's completion rides the claim that then waits for the
next job (one request per job from the worker, none sent alone), and the next job still
comes to it. A real coordinator process and a real worker agent (in this process, so
that its claim grace can be made long: no claim goes out while a job runs)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from csml.schemas import ClaimedJob, JobLimits
from csml.worker import agent as agent_module
from csml.worker.agent import WorkerAgent, WorkerConfig, _Running
from tests.cluster import Cluster, post_counts
from tests.integration.offline_agent import offline_agent

# Starts a coordinator process (10-60 s under load).
pytestmark = pytest.mark.timeout(300)

JOBS = 8
COMPLETE = "/v1/workers/{worker_id}/complete"
CLAIM = "/v1/workers/{worker_id}/claim"


def test_a_quick_jobs_completion_rides_the_claim_that_waits_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No claim while a job runs, however slow the machine: a quick job ends in its grace.
    monkeypatch.setattr(agent_module, "CLAIM_GRACE_SECONDS", 60.0, raising=False)
    cluster = Cluster(tmp_path)
    agent: WorkerAgent | None = None
    thread: threading.Thread | None = None
    try:
        cluster.start_coordinator()
        agent = WorkerAgent(
            WorkerConfig(
                coordinator=cluster.url,
                join_token=cluster.join_token,
                app="echo",
                slots=2,
                prefetch=8,
                workdir=tmp_path,
                claim_wait=1.0,
                insecure_http=True,
            )
        )
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        cluster.wait_workers("echo", 1)
        user = cluster.new_user()
        # The owner's first job starts its child: the next claim is not held for that.
        first = user.submit("echo", "echo", params={"i": -1}).wait(60)
        assert first.state.value == "succeeded", first.error
        before = post_counts(cluster.url)
        for i in range(JOBS):
            job = user.submit("echo", "echo", params={"i": i}).wait(60)
            assert job.state.value == "succeeded", job.error
            assert (job.result or {})["params"]["i"] == i
        after = post_counts(cluster.url)
        stats = agent.stats()
    finally:
        if agent is not None:
            agent.stop()
        if thread is not None:
            thread.join(60)
        cluster.stop()
    # Every completion rode a claim (none went alone), each the claim of the next job.
    assert after.get(COMPLETE, 0) - before.get(COMPLETE, 0) == 0
    assert after.get(CLAIM, 0) - before.get(CLAIM, 0) >= JOBS
    assert stats.riding >= JOBS - 1  # the last one's receipt waits in the claim in flight


def test_the_heartbeat_leaves_out_jobs_whose_completion_is_handed(tmp_path: Path) -> None:
    """A handed job's receipt may wait in a claim's long-poll, its completion committed:
    the heartbeat thread does not report it (the coordinator would say to abort it)."""
    with offline_agent(tmp_path) as agent:
        limits = JobLimits(timeout_seconds=30, memory_mb=512, cpu_seconds=30)
        for job_id, handed in (("running", False), ("handed", True)):
            job = ClaimedJob(
                id=job_id,
                operation="echo",
                params={},
                inputs=[],
                lease_id="l",
                attempt=1,
                limits=limits,
            )
            agent._running[job_id] = _Running(job, handed=handed)
        assert [r.job_id for r in agent._held()] == ["running"]
        assert [r["job_id"] for r in agent._held_json()] == ["running"]
