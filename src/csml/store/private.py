"""Owner-only folders and files for the store.

Invariants: the data folder and every folder the store makes below it are 0700,
and the files it writes (the SQLite database with its -wal and -shm, blobs) are
0600, whatever the process umask, so that no other uid on the host (a job under
its sandbox uid, another login) can read users' inputs, results or the store's
secrets. A folder or file made earlier with wider modes is tightened when the
store opens it; one the process may not chmod (another owner) is left as it is,
with a warning, and the folder above it still keeps others out.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
UMASK = 0o077
"""The coordinator's umask: whatever else it writes is owner-only too."""

SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")

log = logging.getLogger("csml.store")


def tighten(path: Path, mode: int) -> None:
    """Drop every permission bit of `path` beyond `mode` (a no-op when it has none or is
    missing). Symbolic links are followed: the data folder may be one."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & ~mode == 0:
        return
    try:
        os.chmod(path, current & mode)
    except PermissionError:
        log.warning(
            "cannot make %s owner-only (mode %o, not ours): other users may read it",
            path,
            current,
        )


def private_dir(path: Path, *, stop: Path | None = None) -> Path:
    """`path` as a 0700 folder: made, or tightened if it exists with wider modes. Missing
    parents below `stop` are 0700 too; without `stop` they get the usual modes (a data
    folder's parents, such as ~/.local/share, are not the store's)."""
    missing: list[Path] = []
    probe = path
    while stop is not None and probe != stop and probe.parent != probe and not probe.exists():
        missing.append(probe)
        probe = probe.parent
    if stop is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        missing = [path]
    for folder in reversed(missing):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
    tighten(path, DIR_MODE)
    return path


def create_private_file(path: Path, flags: int = os.O_WRONLY | os.O_TRUNC) -> int:
    """Open `path` for writing, creating it 0600 (an existing one is tightened); a descriptor."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & ~FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_sqlite(database: Path) -> None:
    """Make the SQLite file 0600 before SQLite opens it (SQLite gives its -wal and -shm
    the database file's mode) and tighten the companions an older run left behind."""
    if database.parent.is_dir() and not database.exists():
        os.close(create_private_file(database, os.O_WRONLY))
    for suffix in SQLITE_COMPANIONS:
        tighten(database.with_name(database.name + suffix), FILE_MODE)
