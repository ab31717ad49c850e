"""Which idle job processes a worker ends: the count cap and the memory budget (LRU)."""

from __future__ import annotations

from csml.worker.sandbox import evictions

MB = 1 << 20


def test_under_both_caps_nothing_is_ended() -> None:
    assert evictions([(1, 10 * MB), (2, 0), (3, 5 * MB)], max_idle=3, idle_bytes=15 * MB) == []


def test_over_the_count_the_least_recently_used_go_first() -> None:
    assert evictions([(1, 0), (2, 0), (3, 0), (4, 0)], max_idle=2, idle_bytes=1 << 40) == [1, 2]


def test_over_the_memory_budget_the_least_recently_used_go_until_it_fits() -> None:
    idle = [(1, 10 * MB), (2, 60 * MB), (3, 1 * MB), (4, 30 * MB)]
    # 101 MB held, 64 allowed: ending 1 (91) is not enough, ending 2 as well (31) is.
    assert evictions(idle, max_idle=10, idle_bytes=64 * MB) == [1, 2]


def test_many_small_processes_are_kept_within_the_budget() -> None:
    idle = [(token, 2 * MB) for token in range(1, 33)]
    assert evictions(idle, max_idle=64, idle_bytes=16 * 64 * MB) == []
    assert evictions(idle, max_idle=16, idle_bytes=16 * 64 * MB) == list(range(1, 17))


def test_both_caps_apply_together() -> None:
    idle = [(1, 0), (2, 0), (3, 50 * MB), (4, 0)]
    assert evictions(idle, max_idle=3, idle_bytes=10 * MB) == [1, 2, 3]
