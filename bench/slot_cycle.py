"""A worker slot's cycle per no-op job, split: the worker's hand-off, the child, the wait.

    PYTHONPATH=src /work/venv/bin/python bench/slot_cycle.py [--jobs 2000] [--slots 2] [--owners 32]

Runs echo jobs through a real `Sandbox` (zygote, a reused child per owner, isolation:
run it as root for per-owner uids) in this process, as a worker's slots do: `--slots`
threads, each running its share of the jobs one after another, the jobs' owners taken in
turn over `--owners` (as (a)'s 32 clients: consecutive jobs of a slot are of different
owners, so each goes to another child). No coordinator, no HTTP: only the slot's
hand-off to its child and back.

Per job (after the first `--owners` x 2, which fork the children):
- the worker's CPU (this process: the slot threads' hand-off, plus the bench's folder
  emptying) and the children's (each reused child's, read from /proc once it served
  every job), and their context switches (voluntary, i.e. waits; and involuntary);
- the children forked during the warm-up (`forks_warm_up`: one per owner, plus one
  for each child ended meanwhile) and in the window (`forks`: 0 unless a child was
  ended), and how many of the first ones lived through the window (`children_kept`);
- where a slot's time went, p50 and mean: `pre` (from `Sandbox.run` to the start
  message sent), `child` (start sent -> answer read: the child's wake-up, its work and
  the slot thread's wake-up), `post` (answer read -> `Sandbox.run` returns: CPU
  overrun, files taken back, checks before the child is kept). It wraps
  `JobChannel.start` and `JobChannel.next` to time them.

Not a test: wall figures depend on the machine's load (printed with them); CPU and
switches per job are steadier. Compare trees by running it with each tree's
`PYTHONPATH`, in interleaved pairs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from csml.worker import channel
from csml.worker.sandbox import Sandbox, SandboxJob

_marks = threading.local()


def _wrap_channel() -> None:
    """Timestamp each start sent and each answer read, per slot thread."""
    start, next_message = channel.JobChannel.start, channel.JobChannel.next

    def timed_start(self: channel.JobChannel, job: channel.StartMsg) -> None:
        start(self, job)
        _marks.sent = time.perf_counter()

    def timed_next(self: channel.JobChannel, timeout: float | None) -> Any:
        message = next_message(self, timeout)
        if isinstance(message, channel.ResultMsg | channel.ErrorMsg):
            _marks.answered = time.perf_counter()
        return message

    channel.JobChannel.start = timed_start  # type: ignore[method-assign]
    channel.JobChannel.next = timed_next  # type: ignore[method-assign]


_forks = [0]


def _count_forks() -> None:
    """Count the children the sandbox asks its zygote for (`Sandbox._spawn`)."""
    spawn = Sandbox._spawn

    def counted(self: Sandbox, owner: str, limits: Any) -> Any:
        _forks[0] += 1
        return spawn(self, owner, limits)

    Sandbox._spawn = counted  # type: ignore[method-assign]


def _switches(status: str) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"])


def _children(sandbox: Sandbox) -> dict[int, tuple[float, int, int]]:
    """(CPU seconds, voluntary, involuntary switches) of each job child alive."""
    out: dict[int, tuple[float, int, int]] = {}
    for child in psutil.Process(sandbox._zygote.pid).children():
        try:
            t = child.cpu_times()
            with open(f"/proc/{child.pid}/status") as f:
                vol, invol = _switches(f.read())
        except (OSError, psutil.Error):
            continue
        out[child.pid] = (t.user + t.system, vol, invol)
    return out


def _threads_switches(idents: list[int]) -> tuple[int, int]:
    vol = invol = 0
    for tid in idents:
        with open(f"/proc/self/task/{tid}/status") as f:
            v, i = _switches(f.read())
        vol, invol = vol + v, invol + i
    return vol, invol


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--owners", type=int, default=32)
    a = p.parse_args()
    _wrap_channel()
    _count_forks()
    root = Path(tempfile.mkdtemp(prefix="csml-bench-cycle-"))
    os.chmod(root, 0o711)
    sandbox = Sandbox(
        "echo", workdir=root / "w", max_idle=a.owners, idle_bytes=a.owners << 26, slots=a.slots
    )
    warm = 2 * a.owners
    rows: list[tuple[float, float, float, float]] = []
    tids: list[int] = []
    rows_lock = threading.Lock()
    barrier = threading.Barrier(a.slots + 1)
    release = threading.Event()

    def slot(k: int) -> None:
        with rows_lock:
            tids.append(threading.get_native_id())
        out = root / "w" / f"slot-{k}" / "outputs"
        out.mkdir(parents=True)
        for phase, (first, last) in enumerate(((0, warm), (warm, warm + a.jobs))):
            if phase:
                barrier.wait()  # the warm-up is over everywhere: the window opens
            for i in range(first + k, last, a.slots):
                job = SandboxJob("echo", {"i": i}, {}, out, 30, 512, 30)
                began = time.perf_counter()
                outcome = sandbox.run(job, owner=f"owner-{i % a.owners}")
                ended = time.perf_counter()
                assert outcome.ok, outcome.error
                for name in outcome.outputs or ():
                    (out / name).unlink()
                if phase:
                    with rows_lock:
                        rows.append(
                            (
                                _marks.sent - began,
                                _marks.answered - _marks.sent,
                                ended - _marks.answered,
                                ended - began,
                            )
                        )
        barrier.wait()  # done
        release.wait()  # (alive until its switches are read)

    try:
        print(sandbox.description)
        threads = [threading.Thread(target=slot, args=(k,)) for k in range(a.slots)]
        for t in threads:
            t.start()
        barrier.wait()  # every slot warmed up
        load0 = os.getloadavg()
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        kids0, own0, forks0 = _children(sandbox), _threads_switches(tids), _forks[0]
        wall0 = time.perf_counter()
        barrier.wait()  # every slot done
        wall = time.perf_counter() - wall0
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        kids1, own1 = _children(sandbox), _threads_switches(tids)
        release.set()
        for t in threads:
            t.join()
        kept = kids0.keys() & kids1.keys()  # (a child replaced meanwhile is left out)
        n = a.jobs
        cpu = usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime
        per_child = [tuple(x - y for x, y in zip(kids1[p], kids0[p], strict=True)) for p in kept]
        share = n / a.owners * len(kept)  # the jobs the kept children served
        print(f"load before/after {[round(x, 2) for x in load0]} {os.getloadavg()}")
        print(
            {
                "jobs": n,
                "slots": a.slots,
                "owners": a.owners,
                "jobs_per_s": round(n / wall, 1),
                "worker_cpu_ms_per_job": round(1000 * cpu / n, 3),
                "worker_slot_switches_per_job": [
                    round(x / n, 3) for x in map(lambda i: own1[i] - own0[i], (0, 1))
                ],
                "children_cpu_ms_per_job": round(1000 * sum(c[0] for c in per_child) / share, 3),
                "children_switches_per_job": [
                    round(sum(c[i] for c in per_child) / share, 3) for i in (1, 2)
                ],
                "children_kept": f"{len(kept)}/{a.owners}",
                "forks_warm_up": forks0,
                "forks": _forks[0] - forks0,
            }
        )
        for j, name in enumerate(("pre", "child", "post", "total")):
            ms = [1000 * r[j] for r in rows]
            print(f"  {name:6s} p50 {statistics.median(ms):.3f}  mean {statistics.mean(ms):.3f} ms")
    finally:
        sandbox.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
