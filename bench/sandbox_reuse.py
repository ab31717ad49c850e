"""Per-job cost of the sandbox: a fresh child per job versus a child reused per owner.

    PYTHONPATH=src /work/venv/bin/python bench/sandbox_reuse.py [--jobs 300] [--app echo]

Runs no-op `echo` jobs one after another through a real `Sandbox` (zygote, job
children, isolation: run it as root for per-owner uids) in this process, first
with no owner (a fresh child per job, as before reuse), then all with one owner
(one child reused), and prints the CPU per job of this process (the worker's
side: channel, file hand-over, supervision) plus the zygote and the job
children, and the wall time per job. Not a test: numbers depend on the machine
and its load (printed with them).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from csml.worker.sandbox import Sandbox, SandboxJob


def _sandbox_cpu(sandbox: Sandbox) -> float:
    """CPU seconds of the zygote and every job child, reaped or alive."""
    zygote = psutil.Process(sandbox._zygote.pid)
    t = zygote.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in zygote.children():
        with_children = child.cpu_times()
        total += with_children.user + with_children.system
    return total


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(sandbox: Sandbox, root: Path, jobs: int, owner: str) -> dict[str, float]:
    walls: list[float] = []
    cpu0, zcpu0 = _self_cpu(), _sandbox_cpu(sandbox)
    for i in range(jobs):
        work = root / f"{owner or 'fresh'}-{i}"
        (work / "outputs").mkdir(parents=True)
        job = SandboxJob("echo", {"i": i}, {}, work / "outputs", 30, 512, 30)
        start = time.perf_counter()
        outcome = sandbox.run(job, owner=owner)
        walls.append(time.perf_counter() - start)
        assert outcome.ok, outcome.error
        shutil.rmtree(work)
    time.sleep(0.5)  # let fresh children exit and be reaped into the zygote's times
    worker_ms = (_self_cpu() - cpu0) / jobs * 1000
    sandbox_ms = (_sandbox_cpu(sandbox) - zcpu0) / jobs * 1000
    return {
        "worker_cpu_ms_per_job": round(worker_ms, 3),
        "zygote_and_children_cpu_ms_per_job": round(sandbox_ms, 3),
        "total_cpu_ms_per_job": round(worker_ms + sandbox_ms, 3),
        "wall_ms_p50": round(statistics.median(walls) * 1000, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=300)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="csml-bench-reuse-"))
    os.chmod(root, 0o711)
    sandbox = Sandbox("echo", workdir=root / "w")
    try:
        print(sandbox.description)
        run(sandbox, root, 20, "")  # warm-up
        for name, owner in (("fresh child per job", ""), ("child reused per owner", "owner")):
            print(f"load {os.getloadavg()}")
            print(f"{name:24s} {run(sandbox, root, a.jobs, owner)}")
        print(f"load {os.getloadavg()}")
    finally:
        sandbox.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
