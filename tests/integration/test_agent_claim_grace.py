"""After a claim's answer, the next claim waits for the grace of the job the claimer runs
(`CLAIM_GRACE_SECONDS`, `WorkerAgent._deferred`: a quick job's completion rides it),
unless completions ended while that claim was in flight: they waited a whole round trip
for it already, so the next claim goes at once and carries them. A real agent that never
reaches a coordinator; the claim's answer is handed to it as its link would (the network
call is not the subject)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from csml.schemas import ClaimResponse
from csml.schemas.workers import BatchedCompletion
from csml.worker.agent import WorkerAgent, _ClaimTurn, _Completion
from tests.integration.offline_agent import echo_claim, offline_agent


def answered(agent: WorkerAgent, ended_in_flight: int) -> _ClaimTurn | None:
    """A claim turn answered with two jobs, `ended_in_flight` completions handed while it
    was out; then the claim turn a waiting thread takes once the other slot's thread
    took the second job, if a claim is due (None: not yet)."""
    jobs = [echo_claim(b"x", job_id=f"job{n}") for n in range(2)]

    def claim(turn: _ClaimTurn) -> ClaimResponse:
        with agent._lock:  # jobs of the slots that ended while it was in flight
            for n in range(ended_in_flight):
                done = BatchedCompletion(job_id=f"ended{n}", lease_id="l", state="succeeded")
                agent._pending.append(_Completion(done))
                agent._free += 1
        return ClaimResponse(jobs=jobs)

    agent._fold = True
    agent._claim = claim  # type: ignore[method-assign]
    waiter = threading.Lock()
    waiter.acquire()
    with agent._lock:
        turn = agent._next_turn(waiter)  # nothing held: the first claim
    assert isinstance(turn, _ClaimTurn)
    mine = agent._claim_turn(turn)
    assert mine is not None and mine.id == "job0"  # the claimer runs the first job
    with agent._lock:
        if not agent._claim_due():
            return None
        other = agent._next_turn(waiter)  # another thread runs the second job
        assert isinstance(other, type(mine)) and other.id == "job1"
        nxt = agent._next_turn(waiter)  # ... and a third claims
    assert isinstance(nxt, _ClaimTurn)
    return nxt


@pytest.mark.parametrize("ended", [0, 2])
def test_the_next_claim_waits_for_the_grace_only_if_no_completion_waits(
    tmp_path: Path, ended: int
) -> None:
    with offline_agent(tmp_path, slots=2, prefetch=8) as agent:
        nxt = answered(agent, ended)
        if ended == 0:
            assert nxt is None and agent._deferred  # the claimer's job may ride it
        else:
            assert nxt is not None and not agent._deferred
            assert [c.completion.job_id for c in nxt.riding] == ["ended0", "ended1"]
            assert not nxt.poll  # jobs are held: it answers at once
