"""A child forked for another owner's job is not taken for a process a job left behind.

`Sandbox._left_behind` takes any child of the zygote's whose pid no StartedMsg named
for an orphan a job left (the child that ran the job is then ended). A child the zygote
has just forked for another slot's job is such a child until the worker's reader has
read its StartedMsg: before the fix, a job ending in that window had its healthy child
ended (in (a)'s warm-up, 17 of 81 children were forked again so; under load the
churn went on). A real sandbox (zygote, job children, isolation); the reader's hand-off
of one StartedMsg is held (as a slow reader thread would) until the check waits for it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csml.worker import sandbox as sandbox_module
from csml.worker import zygote
from csml.worker.channel import StartedMsg
from csml.worker.sandbox import Sandbox, SandboxJob, _limits, _Resident

pytestmark = pytest.mark.timeout(120)


class WatchedEvent(threading.Event):
    """An event that tells when someone starts waiting for it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waited.set()
        return super().wait(timeout)


class HeldStarts:
    """Wraps `zygote.recv` as the sandbox's reader calls it: while `holding`, a
    StartedMsg is handed on only once `release` is set (`held` is set meanwhile)."""

    def __init__(self) -> None:
        self.real = zygote.recv
        self.holding = False
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, ctrl: Any, accept: Any) -> Any:
        message, fds = self.real(ctrl, accept)
        if self.holding and isinstance(message, StartedMsg):
            self.held.set()
            self.release.wait(60)
        return message, fds


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> HeldStarts:
    hook = HeldStarts()
    monkeypatch.setattr(zygote, "recv", hook)
    return hook


@pytest.fixture
def box(tmp_path: Path, held: HeldStarts) -> Iterator[Sandbox]:
    sb = Sandbox("echo", workdir=tmp_path)
    yield sb
    held.release.set()
    sb.close()


def job(tmp_path: Path, i: int) -> SandboxJob:
    out = tmp_path / f"out-{i}"
    out.mkdir()
    return SandboxJob("echo", {"i": i}, {}, out, 30, 512, 30)


def test_a_fork_for_another_job_does_not_end_a_healthy_child(
    box: Sandbox, held: HeldStarts, tmp_path: Path
) -> None:
    first = box.run(job(tmp_path, 1), owner="alice")
    assert first.ok, first.error
    limits = _limits(512, 30, 30 * sandbox_module.CPU_LIFETIME_FACTOR, 1 << 30)
    alice = box._checkout("alice", limits)
    assert alice is not None  # her child, idle after her job

    held.holding = True
    bob = box._spawn("bob", limits)  # asks the zygote for bob's child: it forks it
    watched = WatchedEvent()
    bob.child.started = watched  # (its StartedMsg is held: not set before this)
    assert held.held.wait(60)  # the fork is among the zygote's children, not yet named
    assert not bob.child.pid

    assert _left_behind_while_named(box, alice, watched, held) == [
        False
    ]  # nothing was left behind: alice's child is kept
    assert bob.child.pid and bob.child.pid in box._pids

    box._checkin(alice)
    box._retire(bob)
    again = box.run(job(tmp_path, 2), owner="alice")
    assert again.ok, again.error


def test_an_orphan_is_still_found_once_the_forks_are_named(
    box: Sandbox, held: HeldStarts, tmp_path: Path
) -> None:
    """A pid of the zygote's children that no StartedMsg names, with a fork in flight:
    once that fork is named, the unknown pid is still an orphan (the check waited, and
    still says so)."""
    first = box.run(job(tmp_path, 1), owner="alice")
    assert first.ok, first.error
    limits = _limits(512, 30, 30 * sandbox_module.CPU_LIFETIME_FACTOR, 1 << 30)
    alice = box._checkout("alice", limits)
    assert alice is not None
    with box._lock:  # the worker forgets alice's child: to the check it is an orphan
        orphan = alice.child.pid
        del box._pids[orphan]

    held.holding = True
    bob = box._spawn("bob", limits)
    watched = WatchedEvent()
    bob.child.started = watched
    assert held.held.wait(60)

    assert _left_behind_while_named(box, alice, watched, held) == [True]
    with box._lock:
        box._pids[orphan] = 1
    box._retire(alice)
    box._retire(bob)


def _left_behind_while_named(
    box: Sandbox, resident: _Resident, watched: WatchedEvent, held: HeldStarts
) -> list[bool]:
    """`box._left_behind(resident)` in a thread, the held fork named (its StartedMsg let
    through) once the check either answered (the old code: at once) or waits for it;
    the check's answer (empty if it never came)."""
    found: list[bool] = []
    check = threading.Thread(target=lambda: found.append(box._left_behind(resident)))
    check.start()
    while check.is_alive() and not watched.waited.wait(0.05):
        pass
    held.release.set()
    check.join(60)
    return found
