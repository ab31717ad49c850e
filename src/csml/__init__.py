"""CSML: collaborative and secure machine learning.

The version has one source, the package metadata written from pyproject.toml.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("csml")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
