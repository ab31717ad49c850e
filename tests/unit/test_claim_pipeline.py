"""When a worker agent claims: at once when some capacity is free and no claim is in
flight; with a prefetch, a second claim follows one in flight that answers at once,
once half the capacity is free (the capacity freed while a claim travels would else
wait for its answer); never behind a long-polling claim, nor once a claim came back
empty (claims answering at once would follow each other without end)."""

from __future__ import annotations

from csml.worker.agent import claim_due


def due(free: int, in_flight: int, **kw: bool | int) -> bool:
    state: dict[str, bool | int] = {
        "spare_link": True,
        "polling": False,
        "dry": False,
        "pipeline_at": 5,
    }
    state.update(kw)
    return claim_due(free, in_flight, **state)  # type: ignore[arg-type]


def test_a_claim_goes_when_capacity_is_free_and_none_is_in_flight() -> None:
    assert due(1, 0)
    assert due(10, 0, dry=True, spare_link=False)  # (dry or not: the first claim may poll)
    assert not due(0, 0)


def test_a_second_claim_follows_one_that_answers_at_once_once_half_the_capacity_is_free() -> None:
    assert not due(4, 1)
    assert due(5, 1)
    assert due(8, 1)


def test_no_second_claim_behind_a_long_poll_after_an_empty_claim_or_without_a_spare_link() -> None:
    assert not due(8, 1, polling=True)
    assert not due(8, 1, dry=True)
    assert not due(8, 1, spare_link=False)  # no prefetch, or two already in flight
    assert not due(8, 2, spare_link=False)
