"""Counts this process's `os.fsync` calls: importing it wraps `os.fsync` (once).

For the in-process benches (`photo_cost.py`, `photo_bytes.py`) that print fsyncs per
photo: read `fsync_count.calls` before and after a window."""

from __future__ import annotations

import os
from typing import Any

calls = 0
_fsync = os.fsync


def _counting_fsync(fd: Any) -> None:
    global calls
    calls += 1
    _fsync(fd)


os.fsync = _counting_fsync
