"""Shared fixtures, and the tier markers: each test is marked `unit`, `integration` or `e2e`
after the folder it lives in (tests/unit, tests/integration, tests/e2e)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, running_cluster

# The echo app's misbehaving operations (allocate, crash, connect, ...) exist only with this.
os.environ.setdefault("CSML_ECHO_DIAGNOSTICS", "1")

SKIMAGE_DATA = Path(str(__import__("skimage").__file__)).parent / "data"


@pytest.fixture(scope="session")
def photo() -> Path:
    """A real photo with one face, shipped with scikit-image (NASA's astronaut portrait)."""
    return SKIMAGE_DATA / "astronaut.png"


@pytest.fixture(scope="session")
def faceless_photo() -> Path:
    return SKIMAGE_DATA / "coffee.png"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One shared cluster: coordinator, an echo worker (2 slots), an opencv worker (2 slots)."""
    root = tmp_path_factory.mktemp("cluster")
    settings = {"CSML_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024)}
    with running_cluster(root, settings, {"echo": 2, "opencv": 2}) as c:
        yield c


# The tier of a test is the folder it lives in; tests/security reproduces attacks against
# real coordinator and worker processes, so it is of the integration tier.
TESTS = Path(__file__).resolve().parent
TIERS = {"unit": "unit", "integration": "integration", "e2e": "e2e", "security": "integration"}
# Security tests start clusters of processes (tens of seconds under load) unless their
# module says otherwise.
SECURITY_TIMEOUT = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.resolve().relative_to(TESTS).parts[0]
        if folder in TIERS:
            item.add_marker(TIERS[folder])
        if folder == "security" and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SECURITY_TIMEOUT))
