"""A kept /proc file (`ProcFile`, read at every job of a reused child) reads the process
as it is now, at every read, and nothing once that process is gone (a later process
given the same pid is never read through it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from csml.worker.isolation_procs import ProcFile, children
from csml.worker.sandbox import _parse_stat, proc_stat


def test_a_kept_stat_file_reads_the_process_now_and_nothing_once_it_is_gone() -> None:
    # The child spins 0.3 s of CPU once told to, says so, then waits: the same descriptor
    # is read before and after (no reader spinning beside it: on a loaded 2-core machine
    # a spinning reader took the CPU the child needed, and CI timed out once).
    spin = (
        "import time\ninput()\nt = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\nprint('spun', flush=True)\ninput()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        stat = ProcFile(f"/proc/{proc.pid}/stat")
        kids = ProcFile(f"/proc/{proc.pid}/task/{proc.pid}/children")
        before = _parse_stat(stat.read())[0]
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"spun\n"  # it waits for input now: its CPU stays
        cpu, rss, threads = _parse_stat(stat.read())
        assert cpu - before >= 0.25  # the same descriptor sees its CPU grow
        assert (cpu, threads) == (proc_stat(proc.pid)[0], 1) and rss > 0
        assert kids.read().split() == [str(p).encode() for p in children(proc.pid, threads=False)]
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(OSError):
        stat.read()
    assert kids.read() == b""
    stat.close()
    kids.close()
    stat.close()  # (twice is harmless)


def test_a_kept_children_file_lists_every_child_even_past_a_page() -> None:
    # Children enough that their pids take more than the page the kernel hands out per
    # read, however many digits the pids have here (700 four-digit pids fit in one):
    # the process forks until its own list passes 1.5 pages. `pids()` reads on where
    # the first read ended.
    forks = (
        "import os, sys\n"
        "r, w = os.pipe()\n"
        "me = f'/proc/{os.getpid()}/task/{os.getpid()}/children'\n"
        "n = 0\n"
        "while n < 4000 and (n % 100 or len(open(me, 'rb').read()) <= 6144):\n"
        "    if os.fork() == 0:\n"
        "        os.close(w); os.read(r, 1); os._exit(0)\n"
        "    n += 1\n"
        "print(n, flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", forks], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        forked = int(proc.stdout.readline())
        kids = ProcFile(f"/proc/{proc.pid}/task/{proc.pid}/children")
        try:
            listed = kids.pids()
            assert len(kids.read()) < len(b" ".join(str(p).encode() for p in listed))
        finally:
            kids.close()
        assert len(listed) == forked
        assert sorted(listed) == sorted(children(proc.pid, threads=False))
    finally:
        proc.kill()  # its children read end-of-file on the pipe and exit
        proc.wait()
