"""Where a job's time goes between its claim and its completion's receipt, as the worker
agent counts it (`AgentStats.queued_s`, `ride_wait_s`, `ride_flight_s`; printed per job by
`bench/agent_cost.py`): a claimed job's wait here for a slot thread, and a riding
completion's wait for its claim to be sent and that claim's round trip. A real agent that
never reaches a coordinator, handed what a claim's answer would bring."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from csml.schemas import ClaimResponse
from csml.schemas.workers import BatchedCompletion, CompletionOutcome
from csml.worker.agent import _Completion, _Running
from tests.integration.offline_agent import echo_claim, offline_agent


def test_a_claimed_jobs_wait_here_for_a_slot_thread_is_counted(tmp_path: Path) -> None:
    with offline_agent(tmp_path, slots=2, prefetch=8) as agent:
        job = echo_claim(b"x")
        waiter = threading.Lock()
        waiter.acquire()
        with agent._lock:
            agent._running[job.id] = _Running(job, arrived=time.monotonic() - 1.0)
            agent._queue.append(job)
            turn = agent._next_turn(waiter)
        assert turn is job
        assert agent._stats.queued_s >= 1.0  # claimed a second ago, taken now


def test_a_riding_completions_wait_for_its_claim_and_the_claims_trip_are_counted(
    tmp_path: Path,
) -> None:
    with offline_agent(tmp_path, slots=2, prefetch=8) as agent:
        sent = time.monotonic() - 1.0  # the claim went a second ago
        riding = [
            _Completion(BatchedCompletion(job_id=f"j{n}", lease_id="lease", state="succeeded"))
            for n in range(2)
        ]
        for c in riding:
            c.at = sent - 2.0  # handed two seconds before the claim went
        answer = ClaimResponse(
            jobs=[], results=[CompletionOutcome(job_id=f"j{n}", status=204) for n in range(2)]
        )
        agent._receipts(riding, answer, sent)
        stats = agent.stats()
        assert stats.riding == 2
        assert stats.ride_wait_s == 2 * 2.0
        assert stats.ride_flight_s >= 2 * 1.0


def test_a_completion_sent_alone_is_counted_from_handed_to_answered(tmp_path: Path) -> None:
    """`alone_s` (`bench/agent_cost.py`'s `alone_ms`, `handed_to_receipt_ms`): a wait
    moved from a claim to a request sent alone shows there. The request itself is not
    the subject: the agent's sending step answers at once (no coordinator)."""
    with offline_agent(tmp_path, slots=2, prefetch=8) as agent:
        batch = [
            _Completion(BatchedCompletion(job_id=f"j{n}", lease_id="lease", state="succeeded"))
            for n in range(2)
        ]
        for c in batch:
            c.at = time.monotonic() - 1.0  # handed a second ago
        sent: list[list[_Completion]] = []
        agent._send_completions = sent.append  # type: ignore[method-assign,assignment]
        agent._sending = True
        agent._send_alone(batch)
        stats = agent.stats()
        assert sent == [batch] and not agent._sending
        assert (stats.alone, stats.alone_batches) == (2, 1)
        assert stats.alone_s >= 2 * 1.0
