"""When a worker with a prefetch refills it (`WorkerAgent._refill_at`, `_claim_due`): at
half the prefetch when its jobs are long beside a claim's round trip, at every job's end
when its slots would run through more than half of it during four round trips, and at
every end until a job's time is known. A real agent that never reaches a coordinator;
the moving averages are set as its slot threads and claims would set them."""

from __future__ import annotations

from pathlib import Path

from csml.worker.agent import WorkerAgent
from tests.integration.offline_agent import offline_agent


def set_times(agent: WorkerAgent, job: float, claim: float) -> None:
    agent._job_seconds, agent._claim_seconds = job, claim


def test_the_refill_waits_for_half_the_prefetch_only_for_jobs_longer_than_claims(
    tmp_path: Path,
) -> None:
    with offline_agent(tmp_path, slots=2, prefetch=8) as agent, agent._lock:
        assert agent._refill_at() == 8  # no job's time known: a claim at every end
        set_times(agent, job=0.030, claim=0.010)  # photos: 4 x 10 ms x 2 slots / 30 ms
        assert agent._refill_at() == 4
        set_times(agent, job=0.002, claim=0.010)  # no-op jobs: 40 in four round trips
        assert agent._refill_at() == 8
        set_times(agent, job=0.5, claim=0.3125)  # in between: 5 jobs
        assert agent._refill_at() == 5


def test_without_a_prefetch_or_a_hold_a_claim_follows_every_end(tmp_path: Path) -> None:
    with offline_agent(tmp_path, slots=2, prefetch=0) as agent:
        assert not agent._holds()
    with offline_agent(tmp_path, slots=2, prefetch=8) as agent:
        assert agent._holds()
        agent.config.completion_hold = 0
        assert not agent._holds()
