"""Leases with the clock set, not slept: a silent worker's job is requeued when its lease
ends (then failed past max_attempts); heartbeats keep a lease; a stale worker's
completion is refused, so exactly one result is kept."""

from __future__ import annotations

from csml.apps.echo import app as echo_app
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import HttpWorker, InProcessCoordinator, error_of

LEASE = 30.0


def test_an_expired_lease_requeues_the_job(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(lease_seconds=LEASE, max_attempts=3)
    worker = coordinator.worker(echo_app)
    job = coordinator.new_user().submit("echo", "echo")
    [first] = worker.claim()

    coordinator.clock.advance(LEASE - 1)
    assert coordinator.reap() == 0  # the lease still runs
    coordinator.clock.advance(2)  # the worker stayed silent: the lease ended
    assert coordinator.reap() == 1
    job.refresh()
    assert job.state.value == "queued"
    assert job.progress[1] == "requeued: the worker running it was lost"
    # The silent worker's heartbeat now tells it to stop.
    assert worker.heartbeat(first).abort == [job.id]
    [second] = worker.claim()
    assert second.id == job.id and second.attempt == 2 and second.lease_id != first.lease_id


def test_a_stale_workers_completion_is_refused(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(lease_seconds=LEASE)
    slow, other = coordinator.worker(echo_app), coordinator.worker(echo_app)
    job = coordinator.new_user().submit("echo", "echo")
    [stale] = slow.claim()
    coordinator.clock.advance(LEASE + 1)
    assert coordinator.reap() == 1
    [current] = other.claim()
    assert current.id == job.id

    late = slow.complete(stale, result={"which": "stale"})
    assert late.status_code == 409 and error_of(late)["code"] == "lease_lost"
    assert other.complete(current, result={"which": "current"}).status_code == 204
    again = slow.complete(stale, result={"which": "stale"})
    assert again.status_code == 409
    job.refresh()
    assert job.state.value == "succeeded" and job.result == {"which": "current"}


def test_heartbeats_keep_the_lease(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(lease_seconds=LEASE)
    worker = coordinator.worker(echo_app)
    job = coordinator.new_user().submit("echo", "echo")
    [claimed] = worker.claim()
    for step in range(1, 5):  # 4 x 0.8 leases: the job outlives its first lease
        coordinator.clock.advance(LEASE * 0.8)
        assert worker.heartbeat(claimed, fraction=step / 10).abort == []
        assert coordinator.reap() == 0
    job.refresh()
    assert job.state.value == "running" and job.progress[0] == 0.4
    coordinator.clock.advance(LEASE + 1)  # now it goes silent
    assert coordinator.reap() == 1


def test_a_job_whose_worker_is_lost_too_often_fails(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(lease_seconds=LEASE, max_attempts=2)
    worker = coordinator.worker(echo_app)
    job = coordinator.new_user().submit("echo", "echo")
    for _ in range(2):
        assert [j.id for j in worker.claim()] == [job.id]
        coordinator.clock.advance(LEASE + 1)
        assert coordinator.reap() == 1
    job.refresh()
    assert job.state.value == "failed"
    assert "lost 2 times" in (job.error or "")
    assert worker.claim() == []
    assert coordinator.reap() == 0


def test_only_expired_leases_are_reaped(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    early = user.submit("echo", "echo")
    [first] = echo_worker.claim()
    coordinator.clock.advance(coordinator.settings.lease_seconds / 2)
    late = user.submit("echo", "echo")
    [second] = echo_worker.claim()
    coordinator.clock.advance(coordinator.settings.lease_seconds / 2 + 1)
    assert coordinator.reap() == 1
    assert (early.refresh().state.value, late.refresh().state.value) == ("queued", "running")
    assert echo_worker.heartbeat(first, second).abort == [first.id]
