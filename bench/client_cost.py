"""What the SDK costs its own process per no-op job, the way (a) drives it.

Starts the echo cluster of `core.py` (a coordinator and echo workers, real processes on
loopback), then in this process runs `--threads` clients, each with its own identity,
looping `Client.submit` + `Job.wait` (way `submit`) or `Client.submit_many` of
`--batch-chunk` jobs + a wait per job (way `batch`), and reports this process's CPU per
job (user + system, from `os.times`: the SDK, its result-stream readers and the few
lines of loop around it), with the coordinator's for scale. The loop here does less
than core.py's (no phase records), so it is a little below core.py's "SDK" column.
Rounds alternate the ways; the medians are printed. CPU is robust to the machine's load
(wall is not); `uptime` is printed before and after.

    /work/venv/bin/python bench/client_cost.py [--jobs 1000] [--rounds 3] [--ways submit,batch]
    /work/venv/bin/python bench/client_cost.py --profile gil   # py-spy this process

With `--calls`, one more round per way counts the Python function calls this process
makes per job (every thread, through `sys.setprofile`): a count, not a time, so it
compares two trees on a busy machine.

With `--profile gil|active`, py-spy samples this process during the last round of each
way; the raw stacks are kept in the temporary folder, whose path is printed (summarise
them with `bench/pyspy.py`'s `summarise`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cluster import Cluster, tree_cpu_seconds
from csml.client import Client, Job


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _own_usage() -> tuple[float, float, int, int]:
    """(user s, system s, voluntary, involuntary context switches) of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_nvcsw, r.ru_nivcsw


def _run(clients: list[Client], n: int, way: str, chunk: int) -> int:
    lock = threading.Lock()
    counter = iter(range(n))

    def take(k: int) -> list[int]:
        with lock:
            return [i for _, i in zip(range(k), counter, strict=False)]

    def one(client: Client) -> int:
        ok = 0
        while True:
            if way == "submit":
                idx = take(1)
                if not idx:
                    return ok
                job = client.submit("echo", "echo", params={"i": idx[0], "tag": "bench"})
                jobs: list[Any] = [job]
            else:
                idx = take(chunk)
                if not idx:
                    return ok
                items = [{"params": {"i": i, "tag": "bench"}} for i in idx]
                jobs = client.submit_many("echo", "echo", items)
            for i, job in zip(idx, jobs, strict=True):
                if not isinstance(job, Job):
                    continue
                job.wait(timeout=120)
                result = job.result or {}
                ok += job.state.value == "succeeded" and result.get("params", {}).get("i") == i
        return ok

    with ThreadPoolExecutor(len(clients)) as pool:
        return sum(pool.map(one, clients))


def _count_calls(warm: Callable[[], object], fn: Callable[[], object]) -> int:
    """Python function calls made while `fn` runs, by this thread and every thread
    started since `warm` began (Python 3.11 cannot reach threads already running, so the
    profile function is set before the warm-up, which starts the result-stream readers,
    and counts only during `fn`)."""
    count = itertools.count()
    counting = False

    def profile(frame: Any, event: str, arg: Any) -> None:
        if counting and event == "call":
            next(count)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        warm()
        counting = True
        fn()
        counting = False
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type, unused-ignore]  # typeshed versions differ
    return next(count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000, help="jobs per round and way")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--ways", default="submit,batch")
    p.add_argument("--batch-chunk", type=int, default=25)
    p.add_argument("--echo-workers", type=int, default=2)
    p.add_argument("--echo-slots", type=int, default=8)
    p.add_argument("--profile", choices=("gil", "active"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--calls", action="store_true", help="count Python calls per job")
    a = p.parse_args()
    ways = a.ways.split(",")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    root = Path(tempfile.mkdtemp(prefix="csml-client-cost-"))
    results: dict[str, list[dict[str, float]]] = {w: [] for w in ways}
    with Cluster(root / "echo") as cluster:
        cluster.start_coordinator()
        cluster.start_workers("echo", a.echo_workers, a.echo_slots)
        assert cluster.coordinator is not None
        coord = cluster.coordinator.pid
        for rnd in range(a.rounds):
            for way in ways:
                clients = [cluster.new_user() for _ in range(a.threads)]
                _run(clients, 2 * a.threads, "submit", a.batch_chunk)  # warm-up
                recorder = None
                if a.profile and rnd == a.rounds - 1:
                    from pyspy import Recorder

                    raw = root / f"client-{way}.pyspy.txt"
                    recorder = Recorder(os.getpid(), raw, gil_only=a.profile == "gil")
                    time.sleep(0.5)
                use0 = _own_usage()
                own0, coord0, t0 = _own_cpu(), tree_cpu_seconds(coord), time.perf_counter()
                ok = _run(clients, a.jobs, way, a.batch_chunk)
                wall = time.perf_counter() - t0
                own, co = _own_cpu() - own0, tree_cpu_seconds(coord) - coord0
                use = [b - a for a, b in zip(use0, _own_usage(), strict=True)]
                if recorder is not None:
                    recorder.stop()
                    print(f"  raw profile: {raw}")
                for c in clients:
                    c.close()
                row = {
                    "sdk_cpu_ms_per_job": 1000 * own / a.jobs,
                    "sdk_user_ms_per_job": 1000 * use[0] / a.jobs,
                    "sdk_system_ms_per_job": 1000 * use[1] / a.jobs,
                    "sdk_voluntary_switches_per_job": use[2] / a.jobs,
                    "sdk_involuntary_switches_per_job": use[3] / a.jobs,
                    "coordinator_cpu_ms_per_job": 1000 * co / a.jobs,
                    "jobs_per_s": a.jobs / wall,
                    "ok": ok,
                }
                results[way].append(row)
                print(f"round {rnd} {way}: " + json.dumps({k: round(v, 3) for k, v in row.items()}))
        if a.calls:
            for way in ways:
                clients = [cluster.new_user() for _ in range(a.threads)]
                calls = _count_calls(
                    lambda: _run(clients, 2 * a.threads, "submit", a.batch_chunk),  # noqa: B023
                    lambda: _run(clients, a.jobs, way, a.batch_chunk),  # noqa: B023
                )
                for c in clients:
                    c.close()
                print(f"calls {way}: {calls / a.jobs:.1f} Python calls per job")
    summary = {
        way: {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0] if k != "ok"}
        for way, rows in results.items()
    }
    print("medians:", json.dumps(summary))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if not a.keep and not a.profile:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
