"""CSML: collaborative and secure machine learning.

The version has one source, the package metadata written from pyproject.toml; it is
read when first asked for (`csml.__version__`), not at import: the lookup scans the
installed distributions, a cost every command (`csml batch` included) paid at start.
"""

from __future__ import annotations

import functools


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("csml")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'csml' has no attribute {name!r}")
