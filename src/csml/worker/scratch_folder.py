"""A worker's scratch folder, locked while its process lives; folders of dead workers are swept.

The agent keeps its jobs' files in a `csml-worker-*` folder and the sandbox its
children's tmp dirs in a `csml-sandbox-*` folder, each removed when they close. A
worker killed with SIGKILL cannot remove them, so each such folder holds a lock file
(`.lock`) on which its owner keeps an exclusive `flock` for its whole life. The
kernel drops the lock with its holder's last descriptor, however that process
ended; so a new worker removes every folder of the same prefix beside its own whose
lock it can take (`sweep`): nobody holds it, its worker is gone.

Invariants:
- A folder is removed only when its lock could be taken, so never one of a live
  worker (in this process, another process, or another PID namespace sharing the
  temp dir: `flock` works on the file, not on PIDs).
- A folder is removed only if it is a real directory (not a symlink) owned by this
  process's uid, and its lock a regular file opened without following links: a job's
  uid cannot plant one for root to remove, and `rmtree` does not follow links.
- Folders without a lock file (made by versions before this one, or being made right
  now, before their lock exists) are left alone.
- The lock file appears under its name (`.lock`) only once its owner holds its lock: it
  is made and locked as `.lock.new`, then renamed (the lock is on the file, so it goes
  with it). Made as `.lock` and locked after, a worker starting at the same moment
  could find it unlocked in between, take it for a dead worker's and remove the folder
  of a live one (workers started together did, ~1 folder in 400: the agent's job folders
  then failed, and its slot thread died holding a claimed job). A worker killed between
  the two steps leaves a folder nobody sweeps (no `.lock`): a leak, never a removal.
- The lock file is the owner's (0600): a job's uid can neither open nor lock it. Its
  descriptor is not inherited across `exec` (a zygote does not hold it), so the lock
  lives as long as the worker process and whatever it forked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

LOCK_NAME = ".lock"
NEW_LOCK_NAME = ".lock.new"  # the lock file until it is locked (see the module)


class ScratchFolder:
    """A fresh folder `<prefix>*` in `parent` (the temp dir by default), locked until
    `close`. The folders of that prefix left there by dead workers are removed first."""

    def __init__(self, prefix: str, parent: Path | None = None) -> None:
        sweep(Path(parent or tempfile.gettempdir()), prefix)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        making = self.path / NEW_LOCK_NAME
        self._lock_fd: int | None = os.open(
            making, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
        )
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # a fresh file: nobody else holds it
        # Only now, locked, under the name a sweep looks for (see the module).
        os.rename(making, self.path / LOCK_NAME)

    def close(self) -> None:
        """Remove the folder, then let go of its lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove the `<prefix>*` folders in `parent` left by workers that are gone.

    Returns the folders removed. Never raises for a folder it cannot read or take."""
    removed = []
    uid = os.geteuid()
    candidates: list[str] = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        candidates = [e.path for e in entries if e.name.startswith(prefix)]
    for folder in map(Path, candidates):
        with contextlib.suppress(OSError):
            info = os.lstat(folder)
            if stat.S_ISDIR(info.st_mode) and info.st_uid == uid and _orphaned(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def _orphaned(folder: Path) -> bool:
    """Whether `folder`'s lock file exists and nobody holds its lock. (The lock is let go
    again at once: nothing ever locks an existing folder's file again, so its folder
    cannot come back to life.)"""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # no lock file (an older version's folder, or one being made)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its worker is alive
        return True
    finally:
        os.close(fd)
