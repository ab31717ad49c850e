"""Fair claiming: identities are served round-robin per app, so one identity's burst
does not starve another, whenever the other arrives."""

from __future__ import annotations

from csml.client import Client
from tests.unit.inproc import HttpWorker, InProcessCoordinator


def burst(user: Client, count: int) -> list[str]:
    return [user.submit("echo", "echo", params={"n": i}).id for i in range(count)]


def test_a_burst_does_not_starve_a_later_identity(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    alice, bob = coordinator.new_user(), coordinator.new_user()
    a = burst(alice, 10)
    b = burst(bob, 2)
    # Bob arrived after Alice's ten, yet he is served every other job.
    assert echo_worker.claim_ids(4) == [a[0], b[0], a[1], b[1]]
    assert echo_worker.claim_ids(10) == a[2:]


def test_a_newcomer_ranks_just_past_what_was_served(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    alice, bob, carol = coordinator.new_user(), coordinator.new_user(), coordinator.new_user()
    a = burst(alice, 5)
    b = burst(bob, 2)
    assert echo_worker.claim_ids(3) == [a[0], b[0], a[1]]
    # Carol arrives now: ahead of most of Alice's backlog, not behind all of it.
    c = burst(carol, 1)
    assert echo_worker.claim_ids(10) == [b[1], a[2], c[0], a[3], a[4]]


def test_one_job_at_a_time_alternates_between_identities(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    alice, bob = coordinator.new_user(), coordinator.new_user()
    a = burst(alice, 6)
    b = burst(bob, 3)
    served = [echo_worker.claim_ids(1)[0] for _ in range(9)]
    assert served == [a[0], b[0], a[1], b[1], a[2], b[2], a[3], a[4], a[5]]
    assert echo_worker.claim_ids(1) == []


def test_fairness_is_per_app(coordinator: InProcessCoordinator, echo_worker: HttpWorker) -> None:
    """A backlog in one app does not push back the same identity's job in another."""
    from csml.apps.opencv import app as opencv_app

    opencv_worker = coordinator.worker(opencv_app)
    alice, bob = coordinator.new_user(), coordinator.new_user()
    burst(alice, 5)
    b = burst(bob, 1)
    mine = alice.submit("opencv", "detect_faces", files={"image": b"not read here"}).id
    assert opencv_worker.claim_ids(5) == [mine]
    assert echo_worker.claim_ids(2)[1] == b[0]
