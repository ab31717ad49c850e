"""Where one job's round trip goes, across processes (a bench-only breakdown of (b)).

    PYTHONPATH=src /work/venv/bin/python bench/latency.py [--jobs 200] [--workers 1 --slots 2]

Starts the echo cluster of bench/core.py's (b) (1 worker, 2 slots, prefetch 8) with
`bench/latency_trace` on PYTHONPATH and CSML_LATENCY_TRACE set, so the SDK (this process),
the coordinator and the worker agents append timestamps of a few csml functions to
per-process files (see latency_trace/sitecustomize.py; csml itself has no tracing).
Then one job at a time, as (b) does, and for each job the first occurrence of each
event within its round trip. Prints, per event of the path, the median time it came
at, the median and p90 of its step (the time since the previous event found on that
job's path) and the step's mean over the slow jobs (those at or above the round trip's
p90: where the tail goes), then the round trip's p50/p99 (which the tracing itself
inflates a little: ~50 file writes per job).

With `--threads`, also per thread (by name, per process: the coordinator, each worker
agent and its zygote and job children, this process) CPU-ms and voluntary /
involuntary context switches per job over the timed jobs: a voluntary switch is
mostly a wake-up to wait for (a socket, a queue, a lock, the GIL, an fsync), a count
that does not depend on the machine's load as the times do (needs py-spy for names).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TRACE_DIR = tempfile.mkdtemp(prefix="csml-latency-trace-")
os.environ["CSML_LATENCY_TRACE"] = TRACE_DIR
os.environ["PYTHONPATH"] = os.pathsep.join(
    [
        str(BENCH / "latency_trace"),
        *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    ]
)
_spec = importlib.util.spec_from_file_location(
    "csml_latency_trace", BENCH / "latency_trace" / "sitecustomize.py"
)
assert _spec is not None and _spec.loader is not None
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))  # the hooks, here too

from core import echo_once, percentile  # noqa: E402

from cluster import (  # noqa: E402
    Cluster,
    schedstat_ms_per_job,
    schedstat_window,
    thread_counters,
    thread_deltas,
    tree_pids,
)

# The events of one job's path, in order: (label, event name, job-field test).
# A `job` value of "ID" must equal the job's id; "*" matches anything; other text must
# be a substring of the field.
PATH: list[tuple[str, str, str]] = [
    ("sdk: POST /v1/jobs sent", "link.0", "jobs"),
    ("coord: submit op queued", "c.submit.0", "*"),
    ("coord: writer batch begins", "w.batch.0", "*"),
    ("coord: woken claim starts", "c.claim.0", "*"),
    ("coord: COMMIT starts", "db.commit.0", "*"),
    ("coord: COMMIT returns", "db.commit.1", "*"),
    ("coord: writer delivers", "w.deliver", "*"),
    ("coord: claim returns job", "c.claim.1", "ID"),
    ("agent: claim answered", "link.1", "claim"),
    ("agent: job thread starts", "a.execute.0", "ID"),
    ("agent: sandbox.run", "s.run.0", "*"),
    ("agent: StartMsg sent", "ch.start.1", "*"),
    ("agent: answer read", "ch.next.1", "*"),
    ("agent: sandbox.run returns", "s.run.1", "*"),
    ("agent: completion handed over", "a.handoff.0", "ID"),
    ("agent: completion sent", "a.send.0", "*"),
    ("coord: complete starts", "c.complete.0", "*"),
    ("coord: complete batch begins", "w.batch.0", "*"),
    ("coord: complete COMMIT starts", "db.commit.0", "*"),
    ("coord: complete COMMIT returns", "db.commit.1", "*"),
    ("coord: writer delivers (complete)", "w.deliver", "*"),
    ("coord: complete returns", "c.complete.1", "*"),
    ("coord: event stream loads the job", "c.changed.0", "ID"),
    ("sdk: result event delivered", "sdk.deliver.0", "succeeded"),
    ("sdk: wait returns", "sdk.wait.1", "ID"),
]


# Events off the path, shown by their first occurrence after a path event.
SIDE: list[tuple[str, str, str, str]] = [
    ("agent: next claim sent", "agent: claim answered", "link.0", "claim"),
    ("coord: next claim checked", "agent: claim answered", "c.claim.1", "-"),
    ("coord: submit returns (after hand-over)", "coord: writer delivers", "c.submit.1", "ID"),
    ("sdk: POST /v1/jobs answered", "coord: writer delivers", "link.1", "jobs"),
    ("agent: complete answered", "coord: complete returns", "link.1", "complete"),
    ("agent: job ended", "coord: complete returns", "a.end.0", "ID"),
]


def side(
    events: list[tuple[float, str, str, str]],
    job_id: str,
    t0: float,
    t1: float,
    line: dict[str, float],
) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, after, name, want in SIDE:
        if after not in line:
            continue
        start = t0 + line[after] / 1000
        for t, _pid, ev, field in events:
            if t >= start and t <= t1 + 0.005 and ev == name and matches(field, want, job_id):
                out[label] = 1000 * (t - t0)
                break
    return out


def gc_pauses(events: list[tuple[float, str, str, str]], t0: float, t1: float) -> list[str]:
    """Per process, the collections of generations 1 and 2 within [t0, t1]: count, total
    and longest ms (each pauses that process)."""
    start: dict[tuple[str, str], float] = {}
    by: dict[str, list[float]] = {}
    for t, pid, ev, _ in events:
        if not (t0 <= t <= t1) or not ev.startswith("gc"):
            continue
        gen, phase = ev[:3], ev[4:]
        if phase == "0":
            start[(pid, gen)] = t
        elif (pid, gen) in start:
            by.setdefault(f"{pid} {gen}", []).append(1000 * (t - start.pop((pid, gen))))
    return [
        f"  pid {k}: {len(v)} collections, {sum(v):.1f} ms in all, longest {max(v):.1f} ms"
        for k, v in sorted(by.items())
    ]


def read_events() -> list[tuple[float, str, str, str]]:
    events = []
    for f in Path(TRACE_DIR).glob("*.trace"):
        for line in f.read_text().splitlines():
            parts = line.split(" ", 4)
            if len(parts) == 5:
                events.append((float(parts[0]), parts[1], parts[3], parts[4]))
    events.sort()
    return events


def matches(field: str, want: str, job_id: str) -> bool:
    if want == "*":
        return True
    if want == "ID":
        return job_id in field
    return want in field


def timeline(
    events: list[tuple[float, str, str, str]], job_id: str, t0: float, t1: float
) -> dict[str, float]:
    """ms from the submit start to each PATH event: the first occurrence at or after the
    previous event found (events found out of order are skipped, not guessed)."""
    window = [e for e in events if t0 <= e[0] <= t1 + 0.0005]
    out: dict[str, float] = {}
    i = 0
    for label, name, want in PATH:
        for j in range(i, len(window)):
            t, _pid, ev, field = window[j]
            if ev == name and matches(field, want, job_id):
                out[label] = 1000 * (t - t0)
                i = j
                break
    return out


def step_of(line: dict[str, float], label: str) -> float | None:
    """ms from the previous PATH event found in `line` to `label` (None: not found)."""
    if label not in line:
        return None
    prev = 0.0
    for other, _, _ in PATH:
        if other == label:
            return line[label] - prev
        if other in line:
            prev = line[other]
    return None


def process_trees(pids: dict[str, int]) -> dict[str, list[int]]:
    """Each named process with its live descendants (a worker's zygote and job
    children), and this process alone."""
    return {**{name: tree_pids(pid) for name, pid in pids.items()}, "this process": [os.getpid()]}


def thread_counts(
    trees: dict[str, list[int]],
) -> dict[str, dict[tuple[int, int], tuple[str, float, int, int]]]:
    return {name: thread_counters(pids) for name, pids in trees.items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=8, help="as bench/core.py's (b)")
    p.add_argument("--keep", action="store_true", help="keep the trace files and the cluster")
    p.add_argument(
        "--threads", action="store_true", help="CPU and context switches per job by thread"
    )
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="csml-latency-"))
    print(f"load {os.getloadavg()}", file=sys.stderr)
    with Cluster(root / "echo") as cluster:
        cluster.start_coordinator()
        cluster.start_workers("echo", a.workers, a.slots, prefetch=a.prefetch)
        client = cluster.new_user()
        for _ in range(a.warmup):
            echo_once(client, -1)
        runs = []
        trees = process_trees(cluster.pids()) if a.threads else {}
        threads0 = thread_counts(trees)
        sched0 = schedstat_window(cluster.pids())
        for i in range(a.jobs):
            t0 = time.time()
            r = echo_once(client, i)
            runs.append((r, t0, time.time()))
        sched1 = schedstat_window(cluster.pids())
        threads1 = thread_counts(trees)
        client.close()
    events = read_events()
    total = [1000 * r.total_s for r, _, _ in runs]
    lines = [timeline(events, r.job_id, t0, t1) for r, t0, t1 in runs]
    print(f"load {os.getloadavg()}; jobs {len(runs)}, ok {sum(r.ok for r, _, _ in runs)}")
    print(
        f"round trip p50 {percentile(total, 50):.2f} ms, p90 {percentile(total, 90):.2f}, "
        f"p99 {percentile(total, 99):.2f} (traced)"
    )
    # Per job, each step is the time since the previous event found on its path; the
    # tail columns: the same steps over the jobs at or above the round trip's p90.
    slow_at = percentile(total, 90)
    slow = [line for line, t in zip(lines, total, strict=True) if t >= slow_at]
    print(
        f"{'event (first within the round trip)':45} {'at ms':>7} {'step p50':>8} "
        f"{'p90':>6} {'slow jobs':>9} {'n':>4}"
    )
    for label, _, _ in PATH:
        at = [line[label] for line in lines if label in line]
        if not at:
            print(f"{label:45} {'-':>7}")
            continue
        steps = [s for line in lines if (s := step_of(line, label)) is not None]
        slow_steps = [s for line in slow if (s := step_of(line, label)) is not None]
        print(
            f"{label:45} {statistics.median(at):7.2f} {statistics.median(steps):8.2f} "
            f"{percentile(steps, 90):6.2f} "
            f"{statistics.mean(slow_steps) if slow_steps else 0:9.2f} {len(at):4}"
        )
    print(f"{'round trip':45} {statistics.median(total):14.2f}")
    print("per job, ms: on a CPU / runnable but waiting for a CPU (schedstat, all threads)")
    for name, v in schedstat_ms_per_job(sched0, sched1, len(runs)).items():
        print(f"  {name:40} {v['on_cpu']:6.2f} / {v['runnable_waiting']:6.2f}")
    if a.threads:
        print("per job, by thread: CPU-ms, voluntary + involuntary context switches")
        for proc, before in threads0.items():
            for name, v in thread_deltas(before, threads1[proc], len(runs)).items():
                print(
                    f"  {proc[:26]:26} {name[:22]:22} {v['cpu_ms']:6.3f} ms "
                    f"{v['voluntary']:6.2f} + {v['involuntary']:5.2f}  ({v['threads']:.0f})"
                )
    print("garbage collections (generations 1 and 2) during the timed jobs:")
    print("\n".join(gc_pauses(events, runs[0][1], runs[-1][2])) or "  none")
    sides = [
        side(events, r.job_id, t0, t1, line) for (r, t0, t1), line in zip(runs, lines, strict=True)
    ]
    for label, *_ in SIDE:
        at = [x[label] for x in sides if label in x]
        if at:
            print(f"{label:45} {statistics.median(at):14.2f} {'':8} {len(at):4}")
    if a.keep:
        print(f"kept {TRACE_DIR} and {root}")
    else:
        shutil.rmtree(TRACE_DIR, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
