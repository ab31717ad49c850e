"""Fixtures of the fast tier: the coordinator in this process, on SQLite in `tmp_path`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from csml.apps.echo import app as echo_app
from tests.clock import SetClock
from tests.unit.inproc import HttpWorker, InProcessCoordinator

MakeCoordinator = Callable[..., InProcessCoordinator]


@pytest.fixture
def make_coordinator(tmp_path: Path) -> Iterator[MakeCoordinator]:
    """Build in-process coordinators with settings (keyword arguments of `Settings`);
    every one made in a test shares the test's store and clock, as coordinators of one
    database would."""
    clock = SetClock()
    with ExitStack() as stack:

        def make(**settings: Any) -> InProcessCoordinator:
            return InProcessCoordinator(tmp_path, stack, clock, **settings)

        yield make


@pytest.fixture
def coordinator(make_coordinator: MakeCoordinator) -> InProcessCoordinator:
    return make_coordinator()


@pytest.fixture
def echo_worker(coordinator: InProcessCoordinator) -> HttpWorker:
    return coordinator.worker(echo_app)
