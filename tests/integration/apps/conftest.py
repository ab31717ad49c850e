"""Fixtures of the app tests: real data (scikit-learn's bundled datasets as CSV, a text
Python ships, scikit-image's photos) and a runner calling operations in this process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.apps.support import SKIMAGE_DATA, Dataset, Runner, load_dataset, zen_text


@pytest.fixture(scope="session")
def datasets() -> Callable[[str], Dataset]:
    cache: dict[str, Dataset] = {}

    def get(name: str) -> Dataset:
        if name not in cache:
            cache[name] = load_dataset(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "zen.txt"
    path.write_text(zen_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def astronaut() -> Path:
    return SKIMAGE_DATA / "astronaut.png"


@pytest.fixture
def run(tmp_path: Path) -> Runner:
    return Runner(tmp_path / "jobs")
