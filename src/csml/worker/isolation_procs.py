"""Killing what a job leaves behind (zygote side).

The zygote is a child subreaper (see `isolation.isolate_zygote`): a process a
job started and detached (`setsid`, double fork) becomes the zygote's child when
its parent dies, instead of init's. When a job ends, `sweep()` kills every such
orphan and its descendants, so nothing of a job outlives it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Collection

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_PID_ENTRY = 16  # a pid and its separator in a `children` list (pid_max < 2**22)


def read_proc(path: str) -> bytes:
    """A whole /proc file, with plain system calls (open, read until the end, close:
    no buffered file object, no seek, no terminal check). OSError if it is gone."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class ProcFile:
    """A /proc file of one process, kept open and read again from its start: one system
    call per read (pread) instead of open, read, close, for a file the worker reads at
    every job of a reused child. Bound to the process it was opened for (a later
    process given the same pid is not seen through it): a read raises OSError (or finds
    nothing) once that process is gone. Whoever closes it must be the only one still
    reading it (a closed descriptor's number may be reused by the next open)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> bytes:
        """One read from the start, through this descriptor only (never re-opened by
        path, which could name a later process with the same pid): all of a `stat` file
        (one line), and the start of a `children` list (the kernel hands a long one out
        about a page per read), which is enough to tell whether there are any."""
        return os.pread(self.fd, 65536, 0)

    def pids(self) -> list[int]:
        """All the pids of a `children` file, however many: the kernel hands the list out
        whole entries at a time, up to its buffer (a page) per read, so a read that ends
        further than the longest entry from a page's end holds the rest of the list (one
        call, the usual case); else the next read goes on where it ended."""
        chunks: list[bytes] = []
        offset = 0
        while True:
            data = os.pread(self.fd, 65536, offset)
            chunks.append(data)
            offset += len(data)
            if len(data) < PAGE_SIZE - MAX_PID_ENTRY:
                return list(map(int, b"".join(chunks).split()))

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _read_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f if ":\t" in line)


def children(pid: int, threads: bool = True) -> list[int]:
    """Children of all of `pid`'s threads (or of its main thread only)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task") if threads else [str(pid)]
    except OSError:
        return found
    for task in tasks:
        try:
            found.extend(map(int, read_proc(f"/proc/{pid}/task/{task}/children").split()))
        except OSError:
            continue
    return found


def _kill(pid: int, parent: int) -> bool:
    """SIGKILL `pid` if it is still a live child of `parent` (pidfd: no pid-reuse race)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        status = _read_status(pid)
        if status.get("State", "Z")[0] in "ZX" or int(status.get("PPid", "0")) != parent:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)


def sweep(keep: Collection[int], rounds: int = 200) -> bool:
    """Kill every descendant of this process outside the subtrees of `keep`.

    Used by the zygote (a subreaper: orphans of jobs are its children, and those of
    its main thread, which forks the jobs) when a job ends. True when nothing is left.
    """
    me = os.getpid()
    for _ in range(rounds):
        stack = [(pid, me) for pid in children(me, threads=False) if pid not in keep]
        killed = 0
        while stack:
            pid, parent = stack.pop()
            killed += _kill(pid, parent)
            stack.extend((c, pid) for c in children(pid))
        if not killed:
            return True
        time.sleep(0.001)
    return False
