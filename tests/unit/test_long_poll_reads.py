"""What a long-poll (`GET /v1/jobs/{id}?wait=`) reads: given a whole id it subscribes
first and reads the job's state once, then loads the job once when its end wakes it;
given a prefix it resolves the id first and reads the state again once subscribed.
No read of it begins a transaction (each is one statement)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager

import pytest

from csml.coordinator.notify import job_key
from tests.cluster import wait_for
from tests.unit.inproc import HttpWorker, InProcessCoordinator, sent_statements


def owner_reads(coordinator: InProcessCoordinator) -> AbstractContextManager[list[str]]:
    """The owner's reads of jobs sent meanwhile (by owner and id), and every plain BEGIN."""
    return sent_statements(
        coordinator, lambda flat: flat == "BEGIN" or "WHERE jobs.owner_id = ? AND jobs.id" in flat
    )


@pytest.mark.parametrize(("length", "state_reads"), [(64, 1), (16, 2)])
def test_a_long_poll_woken_by_the_end_reads_the_state_then_the_job_once(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, length: int, state_reads: int
) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo", params={"n": 1})
    [claimed] = echo_worker.claim()
    waiters = coordinator.core.notifier._waiters
    with owner_reads(coordinator) as sent, ThreadPoolExecutor(1) as pool:
        polling = pool.submit(user.request, "GET", f"/v1/jobs/{job.id[:length]}?wait=30")
        wait_for(lambda: job_key(job.id) in waiters, timeout=10, interval=0.01)
        assert echo_worker.complete(claimed, result={"n": 1}).status_code == 204
        view = polling.result(timeout=30).json()
    assert (view["id"], view["state"], view["result"]) == (job.id, "succeeded", {"n": 1})
    assert "BEGIN" not in sent
    states = [s for s in sent if s.startswith("SELECT jobs.id, jobs.state ")]
    loads = [s for s in sent if "files_json" in s]
    assert (len(states), len(loads), len(sent)) == (state_reads, 1, state_reads + 1)


def test_a_long_poll_of_an_ended_job_answers_at_once_in_two_reads(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo", params={"n": 2})
    [claimed] = echo_worker.claim()
    assert echo_worker.complete(claimed, result={"n": 2}).status_code == 204
    for ident in (job.id, job.id[:12]):
        with owner_reads(coordinator) as sent:
            view = user.request("GET", f"/v1/jobs/{ident}?wait=30").json()
        assert (view["state"], view["result"]) == ("succeeded", {"n": 2})
        assert len(sent) == 2 and "BEGIN" not in sent  # its state, then the job
    other = coordinator.new_user()
    for ident in (job.id, job.id[:12]):  # another identity's job: 404 either way
        assert (
            other._http.get(f"/v1/jobs/{ident}?wait=1", headers=other._headers()).status_code == 404
        )


def test_a_view_with_queue_positions_reads_without_a_transaction(
    coordinator: InProcessCoordinator,
) -> None:
    """A GET with `positions=true` of a queued job: its load, then its app's ranks ahead
    of it (one statement each), and no BEGIN."""
    user = coordinator.new_user()
    first = user.submit("echo", "echo", params={"n": 1})
    second = user.submit("echo", "echo", params={"n": 2})
    with sent_statements(coordinator) as sent:
        view = user.request("GET", f"/v1/jobs/{second.id}?positions=true").json()
    assert first.id != second.id and view["queue_position"] == 2
    assert "BEGIN" not in sent and "ROLLBACK" not in sent
    assert len([s for s in sent if s.startswith("SELECT jobs.fair_rank, jobs.seq")]) == 1
