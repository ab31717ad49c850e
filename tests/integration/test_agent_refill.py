"""When a worker with a prefetch refills it (`WorkerAgent._refill_at`, `_claim_due`): at
half the prefetch when its jobs are long beside a claim's round trip, at every job's end
when its slots would run through more than half of it during four round trips, and at
every end until a job's time is known; and how far the prefetch grows for jobs short
beside a claim's round trip (`_reach`). A real agent that never reaches a coordinator;
the moving averages are set as its slot threads and claims would set them."""

from __future__ import annotations

import threading
from pathlib import Path

from csml.worker.agent import WorkerAgent, _ClaimTurn
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


def test_the_prefetch_grows_to_cover_two_claims_of_short_jobs_and_shrinks_back(
    tmp_path: Path,
) -> None:
    with offline_agent(tmp_path, slots=2, prefetch=8) as agent, agent._lock:
        assert (agent._prefetch, agent._free) == (8, 10)
        set_times(agent, job=0.030, claim=0.010)  # photos: 2 x 10 ms x 2 slots / 30 ms
        agent._reach()
        assert (agent._prefetch, agent._free) == (8, 10)  # never below the configured one
        set_times(agent, job=0.002, claim=0.006)  # no-op jobs: 12 in two round trips
        agent._reach()
        assert (agent._prefetch, agent._free) == (12, 14)
        assert agent._refill_at() == 12  # a claim at every end, as before
        set_times(agent, job=0.002, claim=0.015)  # a loaded machine: 30, at most twice 8
        agent._reach()
        assert (agent._prefetch, agent._free, agent._stats.prefetch_peak) == (16, 18, 16)
        agent._free = 3  # 15 jobs held
        set_times(agent, job=0.030, claim=0.010)  # long jobs again: back to 8
        agent._reach()
        assert (agent._prefetch, agent._free) == (8, -5)  # no claim until 5 more end
        assert not agent._claim_due()


def test_without_a_configured_prefetch_none_grows(tmp_path: Path) -> None:
    with offline_agent(tmp_path, slots=2, prefetch=0) as agent, agent._lock:
        set_times(agent, job=0.002, claim=0.015)
        agent._reach()
        assert (agent._prefetch, agent._free) == (0, 2)


def test_a_claim_that_long_polls_holding_nothing_asks_for_the_configured_prefetch(
    tmp_path: Path,
) -> None:
    with offline_agent(tmp_path, slots=2, prefetch=8) as agent:
        waiter = threading.Lock()
        waiter.acquire()
        with agent._lock:
            set_times(agent, job=0.002, claim=0.015)
            agent._reach()
            assert agent._free == 18
            turn = agent._next_turn(waiter)  # idle: nothing running, nothing queued
        assert isinstance(turn, _ClaimTurn) and turn.poll
        assert (turn.free, agent._prefetch, agent._free) == (10, 8, 0)
