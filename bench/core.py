"""CSML core benchmarks on a real loopback cluster.

    /work/venv/bin/python bench/core.py            # full run (a few minutes)
    /work/venv/bin/python bench/core.py --quick    # smaller counts, for a smoke test

(a) end-to-end throughput of `echo` jobs (submit -> result read back) from many
    client threads against one worker of 2 slots and a prefetch of 8 (as Celery's
    prefork x2 with its default prefetch), with the CPU each process used, both
    ways the SDK submits: one `Client.submit` per job, and `Client.submit_many` (the
    batch route, `POST /v1/jobs/batch`, which `Client.map` uses) of a chunk of jobs;
(b) round-trip latency of one `echo` job at a time;
(c) `opencv detect_faces` over real images through CSML versus a plain
    `multiprocessing.Pool(2)` running the same OpenCV code;
(d) what a job costs: coordinator CPU, HTTP requests, SQL statements and write commits.
(a) and (b) are also run on Celery + Redis in the same run (bench/celery_anchor.py;
    --no-anchor skips it) and the ratios printed.

See bench/README.md. Results go to stdout and bench/results/core-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from cluster import (
    Cluster,
    CpuWindow,
    request_deltas,
    schedstat_ms_per_job,
    schedstat_window,
    scrape_requests,
    scrape_store,
    store_deltas,
    thread_counters,
    thread_deltas,
)
from csml.client import Client, Job

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

T = TypeVar("T")
R = TypeVar("R")

TARGET_JOBS_PER_S = 800.0
TARGET_P50_MS = 5.0
TARGET_OPENCV_RATIO = 1.15


# -- configuration ---------------------------------------------------------------


@dataclass
class Config:
    quick: bool
    throughput_jobs: int
    threads: int
    echo_workers: int
    echo_slots: int
    echo_prefetch: int
    latency_jobs: int
    latency_warmup: int
    images: int
    opencv_workers: int
    opencv_slots: int
    opencv_prefetch: int
    opencv_threads: int
    only: list[str]
    profile: str | None
    base_dir: str | None
    keep: bool
    anchor: bool
    ways: list[str]
    batch_chunk: int
    thread_split: bool = False


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    p.add_argument("--jobs", type=int, help="echo jobs for (a) [2000; quick 300]")
    p.add_argument("--threads", type=int, default=32, help="client threads for (a)")
    p.add_argument("--echo-workers", type=int, default=1, help="echo worker processes")
    p.add_argument(
        "--echo-slots",
        type=int,
        default=2,
        help="slots per echo worker (1 x 2: the 2 concurrent executions of Celery's prefork x2)",
    )
    p.add_argument(
        "--echo-prefetch",
        type=int,
        default=8,
        help="jobs each echo worker claims beyond its free slots "
        "(8: Celery's default prefetch of 4 per process, x2)",
    )
    p.add_argument("--latency-jobs", type=int, help="sequential jobs for (b) [300; quick 60]")
    p.add_argument("--images", type=int, help="images for (c) [200; quick 40]")
    p.add_argument("--opencv-workers", type=int, default=1, help="opencv worker processes")
    p.add_argument("--opencv-slots", type=int, default=2, help="slots per opencv worker")
    p.add_argument(
        "--opencv-prefetch",
        type=int,
        default=8,
        help="jobs each opencv worker claims beyond its free slots (as (a); Pool(2) feeds "
        "its processes from a queue filled ahead)",
    )
    p.add_argument("--opencv-threads", type=int, default=8, help="client threads for (c)")
    p.add_argument("--only", default="a,b,c", help="comma-separated subset of a,b,c")
    p.add_argument(
        "--profile",
        choices=["gil", "active"],
        help="sample the coordinator with py-spy during (a) and (c): "
        "`gil` = where its Python CPU goes "
        "(thread holding the GIL), `active` = every non-idle thread, incl. lock waits "
        "(perturbs the figures)",
    )
    p.add_argument(
        "--base-dir",
        help="parent folder of the temporary data directory "
        "(e.g. /dev/shm to see what fsync costs; not durable)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, db)")
    p.add_argument(
        "--no-anchor", action="store_true", help="skip Celery + Redis (bench/celery_anchor.py)"
    )
    p.add_argument(
        "--ways",
        default="submit,batch",
        help="how (a) submits, comma-separated: `submit` (one Client.submit per job), "
        "`batch` (Client.submit_many of --batch-chunk jobs per call: the batch route)",
    )
    p.add_argument(
        "--batch-chunk", type=int, default=25, help="jobs per submit_many call in (a) batch"
    )
    p.add_argument(
        "--thread-split",
        action="store_true",
        help="(a): the coordinator's CPU-ms and context switches per job by thread "
        "(event loop, writer, ...; names from `py-spy dump`)",
    )
    a = p.parse_args(argv)
    return Config(
        quick=a.quick,
        throughput_jobs=a.jobs or (300 if a.quick else 2000),
        threads=a.threads,
        echo_workers=a.echo_workers,
        echo_slots=a.echo_slots,
        echo_prefetch=a.echo_prefetch,
        latency_jobs=a.latency_jobs or (60 if a.quick else 300),
        latency_warmup=10 if a.quick else 30,
        images=a.images or (40 if a.quick else 200),
        opencv_workers=a.opencv_workers,
        opencv_slots=a.opencv_slots,
        opencv_prefetch=a.opencv_prefetch,
        opencv_threads=a.opencv_threads,
        only=[s.strip() for s in a.only.split(",") if s.strip()],
        profile=a.profile,
        base_dir=a.base_dir,
        keep=a.keep,
        anchor=not a.no_anchor,
        ways=[w.strip() for w in a.ways.split(",") if w.strip()],
        batch_chunk=max(1, a.batch_chunk),
        thread_split=a.thread_split,
    )


# -- machine ---------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(data_parent: str) -> dict[str, Any]:
    import cv2

    import csml

    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "csml": csml.__version__,
        "opencv": cv2.__version__,
        "fsync_ms_median": round(fsync_ms(data_parent), 2),
        "data_dir_parent": data_parent,
    }


def fsync_ms(folder: str, rounds: int = 50) -> float:
    """Median cost of write+fsync of 4 KiB where the store lives: the floor of one commit."""
    times = []
    with tempfile.NamedTemporaryFile(dir=folder) as f:
        for _ in range(rounds):
            start = time.perf_counter()
            os.write(f.fileno(), b"x" * 4096)
            os.fsync(f.fileno())
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


# -- statistics ------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms_summary(seconds: list[float]) -> dict[str, float]:
    ms = [1000 * s for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(max(ms), 2),
    }


# -- echo jobs -------------------------------------------------------------------


@dataclass
class EchoRecord:
    index: int
    job_id: str
    ok: bool
    submit_s: float
    total_s: float
    phases_ms: dict[str, float] = field(default_factory=dict)


def drain(clients: list[Client], items: list[T], fn: Callable[[Client, T], R]) -> list[R]:
    """One thread per client; each takes the next item until none are left."""
    lock = threading.Lock()
    pending = iter(items)
    done = object()

    def take() -> Any:
        with lock:
            return next(pending, done)

    def loop(client: Client) -> list[R]:
        return [fn(client, item) for item in iter(take, done)]

    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(loop, c) for c in clients]
        return [r for f in futures for r in f.result()]


def echo_once(client: Client, index: int) -> EchoRecord:
    """Submit one echo job, wait for it, check its result."""
    wall0, t0 = time.time(), time.perf_counter()
    job = client.submit("echo", "echo", params={"i": index, "tag": "bench"})
    t1 = time.perf_counter()
    job.wait(timeout=120)
    t2, wall2 = time.perf_counter(), time.time()
    result = job.result or {}
    ok = job.state.value == "succeeded" and result.get("params", {}).get("i") == index
    return EchoRecord(index, job.id, ok, t1 - t0, t2 - t0, _phases(job, wall0, wall2))


def echo_batch(client: Client, indexes: list[int]) -> list[EchoRecord]:
    """Submit a chunk of echo jobs in one `submit_many` (the batch route), wait for each,
    check each result."""
    wall0, t0 = time.time(), time.perf_counter()
    items = [{"params": {"i": i, "tag": "bench"}} for i in indexes]
    submitted = client.submit_many("echo", "echo", items)
    t1 = time.perf_counter()
    records = []
    for index, job in zip(indexes, submitted, strict=True):
        if not isinstance(job, Job):
            records.append(EchoRecord(index, "", False, t1 - t0, time.perf_counter() - t0))
            continue
        job.wait(timeout=120)
        t2, wall2 = time.perf_counter(), time.time()
        result = job.result or {}
        ok = job.state.value == "succeeded" and result.get("params", {}).get("i") == index
        records.append(EchoRecord(index, job.id, ok, t1 - t0, t2 - t0, _phases(job, wall0, wall2)))
    return records


def _phases(job: Job, wall0: float, wall2: float) -> dict[str, float]:
    """Where one job's round trip went, from the coordinator's timestamps (same host clock)."""
    d = job.data
    if d.started_at is None or d.finished_at is None:
        return {}
    created, started, finished = (
        d.created_at.timestamp(),
        d.started_at.timestamp(),
        d.finished_at.timestamp(),
    )
    return {
        "client_to_created": 1000 * (created - wall0),
        "queued_until_claimed": 1000 * (started - created),
        "claimed_until_finished": 1000 * (finished - started),
        "finished_until_client_sees": 1000 * (wall2 - finished),
    }


def phase_medians(records: list[EchoRecord]) -> dict[str, float]:
    names = records[0].phases_ms.keys() if records else []
    return {
        n: round(statistics.median(r.phases_ms[n] for r in records if r.phases_ms), 2)
        for n in names
    }


def start_echo_cluster(cfg: Config, root: Path) -> Cluster:
    cluster = Cluster(root / "echo")
    cluster.start_coordinator()
    cluster.start_workers("echo", cfg.echo_workers, cfg.echo_slots, prefetch=cfg.echo_prefetch)
    return cluster


WAYS = {
    "submit": "one Client.submit per job (POST /v1/jobs)",
    "batch": "Client.submit_many per chunk (POST /v1/jobs/batch, as Client.map)",
}


def run_throughput(
    cluster: Cluster, cfg: Config, root: Path, way: str = "submit"
) -> dict[str, Any]:
    """(a): `cfg.threads` clients each loop submit+wait until `cfg.throughput_jobs` are done;
    `way` "submit": one job per call, "batch": `cfg.batch_chunk` jobs per submit_many."""
    clients = [cluster.new_user() for _ in range(cfg.threads)]
    drain(clients, [-1] * 2 * len(clients), echo_once)  # warm-up: connections, forks, caches
    indexes = list(range(cfg.throughput_jobs))
    requests0, store0 = scrape_requests(cluster.url), scrape_store(cluster.url)
    coord = [cluster.coordinator.pid] if cfg.thread_split and cluster.coordinator else []
    threads0 = thread_counters(coord)
    with (
        _maybe_profile(cluster, cfg, root, f"a-{way}") as profile,
        CpuWindow(cluster.pids()) as cpu,
    ):
        if way == "batch":
            n = cfg.batch_chunk
            chunks = [indexes[i : i + n] for i in range(0, len(indexes), n)]
            records = [r for rs in drain(clients, chunks, echo_batch) for r in rs]
        else:
            records = drain(clients, indexes, echo_once)
    threads = thread_deltas(threads0, thread_counters(coord), len(records)) if coord else None
    store = store_deltas(store0, scrape_store(cluster.url), len(records))
    requests = request_deltas(requests0, scrape_requests(cluster.url), len(records))
    for c in clients:
        c.close()
    ok = sum(r.ok for r in records)
    return {
        "way": f"{way}: {WAYS[way]}"
        + (f", {cfg.batch_chunk} jobs per call" if way == "batch" else ""),
        "jobs": len(records),
        "ok": ok,
        "client_threads": cfg.threads,
        "workers": f"{cfg.echo_workers} x {cfg.echo_slots} slots, prefetch {cfg.echo_prefetch}",
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(cpu.wall, 3),
        "jobs_per_s": round(len(records) / cpu.wall, 1),
        "round_trip_under_load": ms_summary([r.total_s for r in records]),
        "submit_under_load": ms_summary([r.submit_s for r in records]),
        "phase_medians_ms": phase_medians(records),
        "cpu": cpu.report(),
        "cpu_ms_per_job": cpu_ms_per_job(cpu, len(records)),
        "http_requests_by_route": requests,
        "http_requests_per_job": round(sum(r["per_job"] for r in requests.values()), 2),
        "store_per_job": store,
        "coordinator_cpu_ms_per_job": round(
            1000 * cpu.used["coordinator"] / max(1, len(records)), 2
        ),
        "coordinator_threads_per_job": threads,
        "profile": profile.get("summary"),
        "_expected": {r.job_id: r.index for r in records if r.job_id},
    }


def cpu_ms_per_job(cpu: CpuWindow, jobs: int) -> dict[str, float]:
    """CPU-ms per job (over all the jobs of the window) by role: the coordinator, the
    worker agents, their zygotes and their job children (each summed over the workers,
    from the worker trees split by depth), and the SDK (this process: the client
    threads)."""
    out = {"coordinator": 0.0, "worker agents": 0.0, "zygotes": 0.0, "job children": 0.0}
    for name, seconds in cpu.used.items():
        if name == "coordinator":
            out["coordinator"] += seconds
        elif name.startswith("worker"):
            depths = cpu.depths.get(name, [])
            for role, sec in zip(("worker agents", "zygotes"), depths, strict=False):
                out[role] += sec
            out["job children"] += sum(depths[2:])
        else:
            out["SDK client (bench process)"] = seconds
    out["all CSML processes"] = sum(out.values())
    return {k: round(1000 * v / max(1, jobs), 2) for k, v in out.items()}


WRITE_ROUTES = (
    "POST /v1/jobs",
    "POST /v1/jobs/batch",
    "POST /v1/workers/{worker_id}/complete",
    "POST /v1/workers/{worker_id}/claim",
    "POST /v1/workers/{worker_id}/jobs/{job_id}/complete",
)


def throughput_limits(tp: dict[str, Any], fsync_ms: float) -> dict[str, Any]:
    """Ceilings implied by the measured costs, and what most likely limited the run."""
    procs: dict[str, dict[str, float]] = tp["cpu"]["processes"]
    cores = os.cpu_count() or 1
    cpu_ms = 1000 * sum(p["cpu_s"] for p in procs.values()) / max(1, tp["jobs"])
    coord_ms = tp["coordinator_cpu_ms_per_job"]
    routes = tp["http_requests_by_route"]
    # Each of these requests commits at least one write transaction (one fsync each,
    # serialised by SQLite's single writer); idle claim re-polls add more.
    commits = sum(routes.get(r, {}).get("per_job", 0.0) for r in WRITE_ROUTES)
    ceilings = {
        "coordinator_on_one_core": 1000 / max(coord_ms, 1e-9),
        "all_csml_cpu_on_all_cores": 1000 * cores / max(cpu_ms, 1e-9),
        "serialised_fsyncs": 1000 / max(commits * fsync_ms, 1e-9),
    }
    coord_pct = procs["coordinator"]["pct_of_one_core"]
    busy = tp["cpu"]["machine_busy_pct_all_cores"]
    if coord_pct >= 85:
        limiter = f"coordinator CPU: {coord_pct}% of one core (its Python runs under one GIL)"
    elif busy >= 90:
        limiter = (
            f"machine CPU saturated ({busy}% of {cores} cores; coordinator {coord_pct}% of a "
            f"core, other users {tp['cpu']['everything_else_cpu_s']} CPU-s)"
        )
    else:
        limiter = "waits, not CPU: SQLite's single write lock held across fsyncs, long-polls"
    return {
        "limited_by": limiter,
        "csml_cpu_ms_per_job_all_processes": round(cpu_ms, 2),
        "write_commits_per_job_at_least": round(commits, 2),
        "ceilings_jobs_per_s": {k: round(v, 1) for k, v in ceilings.items()},
    }


@contextmanager
def _maybe_profile(cluster: Cluster, cfg: Config, root: Path, tag: str) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {}
    if not cfg.profile or cluster.coordinator is None:
        yield out
        return
    from pyspy import Recorder, summarise

    raw = root / f"coordinator-{tag}.pyspy.txt"
    recorder = Recorder(cluster.coordinator.pid, raw, gil_only=cfg.profile == "gil")
    time.sleep(0.5)  # let py-spy attach
    try:
        yield out
    finally:
        recorder.stop()
        if raw.exists():
            out["summary"] = {"mode": cfg.profile, "raw_stacks": str(raw), **summarise(raw)}


def run_latency(cluster: Cluster, cfg: Config) -> dict[str, Any]:
    """(b): one client, one job at a time."""
    client = cluster.new_user()
    for _ in range(cfg.latency_warmup):
        echo_once(client, -1)
    requests0, store0 = scrape_requests(cluster.url), scrape_store(cluster.url)
    load0, sched0 = os.getloadavg(), schedstat_window(cluster.pids())
    with CpuWindow(cluster.pids()) as cpu:
        records = [echo_once(client, i) for i in range(cfg.latency_jobs)]
    sched = schedstat_ms_per_job(sched0, schedstat_window(cluster.pids()), len(records))
    load1 = os.getloadavg()
    store = store_deltas(store0, scrape_store(cluster.url), len(records))
    requests = request_deltas(requests0, scrape_requests(cluster.url), len(records))
    client.close()
    return {
        "jobs": len(records),
        "ok": sum(r.ok for r in records),
        "warmup_jobs": cfg.latency_warmup,
        "round_trip": ms_summary([r.total_s for r in records]),
        "submit_only": ms_summary([r.submit_s for r in records]),
        "phase_medians_ms": phase_medians(records),
        "http_requests_by_route": requests,
        "store_per_job": store,
        "cpu_ms_per_job": {
            name: round(1000 * sec / len(records), 2) for name, sec in cpu.used.items()
        },
        # How much of the round trip the machine's load took: per process, time runnable
        # but waiting for a CPU (schedstat; "this process" is the SDK), ms per job.
        "load_avg_before_after": [round(load0[0], 2), round(load1[0], 2)],
        "sched_ms_per_job": sched,
        "_expected": {r.job_id: r.index for r in records},
    }


# -- durability ------------------------------------------------------------------


def check_durable(db_path: Path, expected: dict[str, int]) -> dict[str, Any]:
    """After the coordinator was SIGKILLed: is every result in the store, intact?"""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        found: dict[str, tuple[str, str | None]] = {}
        ids = list(expected)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for job_id, state, result in conn.execute(
                f"SELECT id, state, result FROM jobs WHERE id IN ({marks})", chunk
            ):
                found[job_id] = (state, result)
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    good = sum(
        1
        for job_id, index in expected.items()
        if job_id in found
        and found[job_id][0] == "succeeded"
        and json.loads(found[job_id][1] or "{}").get("params", {}).get("i") == index
    )
    return {
        "expected": len(expected),
        "durable_and_intact": good,
        "journal_mode": journal,
        "store_synchronous": store_synchronous(db_path),
    }


def store_synchronous(db_path: Path) -> str:
    """PRAGMA synchronous on a connection made by csml's own engine factory."""
    from sqlalchemy import text

    from csml.store.db import make_engine

    engine = make_engine(f"sqlite:///{db_path}")
    try:
        with engine.connect() as conn:
            value = conn.execute(text("PRAGMA synchronous")).scalar()
    finally:
        engine.dispose()
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(int(value or 0), str(value))


THROUGHPUT_KEYS = {"submit": "throughput", "batch": "throughput_batch"}


def echo_benchmarks(cfg: Config, root: Path) -> dict[str, Any]:
    """(a) and (b) on one echo cluster, then a crash-kill and a durability check."""
    out: dict[str, Any] = {}
    cluster = start_echo_cluster(cfg, root)
    try:
        for way in cfg.ways if "a" in cfg.only else []:
            _say(
                f"(a) throughput ({way}): {cfg.throughput_jobs} echo jobs, "
                f"{cfg.threads} threads ..."
            )
            out[THROUGHPUT_KEYS[way]] = run_throughput(cluster, cfg, root, way)
        if "b" in cfg.only:
            _say(f"(b) latency: {cfg.latency_jobs} sequential echo jobs ...")
            out["latency"] = run_latency(cluster, cfg)
        expected: dict[str, int] = {}
        for part in (*THROUGHPUT_KEYS.values(), "latency"):
            expected.update(out.get(part, {}).pop("_expected", {}))
        cluster.stop_workers()
        cluster.kill_coordinator()
        out["durability"] = check_durable(cluster.db_path, expected)
    finally:
        cluster.stop()
    return out


# -- opencv ----------------------------------------------------------------------


def run_opencv(cfg: Config, root: Path) -> dict[str, Any]:
    """(c): detect_faces over the same files through CSML and through a plain Pool(2)."""
    from faces import cascade_load_seconds, make_images, run_baseline

    images = make_images(root / "images", cfg.images)
    _say(f"(c) opencv: {len(images)} images; baseline Pool(2), before ...")
    before = run_baseline(images, root / "baseline-out", processes=2)
    cluster = Cluster(root / "opencv")
    try:
        cluster.start_coordinator()
        cluster.start_workers(
            "opencv", cfg.opencv_workers, cfg.opencv_slots, prefetch=cfg.opencv_prefetch
        )
        _say("(c) opencv: through CSML ...")
        with _maybe_profile(cluster, cfg, root, "c") as profile:
            csml_run = _csml_faces(cluster, images, root / "csml-out", cfg.opencv_threads)
    finally:
        cluster.stop()
    _say("(c) opencv: baseline Pool(2), after ...")
    after = run_baseline(images, root / "baseline-out", processes=2)
    baseline_s = (before.wall_s + after.wall_s) / 2
    baseline_cpu = (before.cpu_s + after.cpu_s) / 2
    pool_cpu = [pool_processes_cpu_s(run.window) for run in (before, after)]
    csml_cpu = sum(p["cpu_s"] for p in csml_run["cpu"]["processes"].values())
    mismatched = sorted(n for n, c in csml_run["faces"].items() if before.faces.get(n) != c)
    return {
        "images": len(images),
        "image_bytes_total": sum(p.stat().st_size for p in images),
        "slots_total": cfg.opencv_workers * cfg.opencv_slots,
        "prefetch_per_worker": cfg.opencv_prefetch,
        "baseline_wall_s_before_after": [round(before.wall_s, 3), round(after.wall_s, 3)],
        "baseline_wall_s": round(baseline_s, 3),
        "baseline_pool_startup_s_untimed": round(before.startup_s, 3),
        "baseline_per_image_ms": ms_summary(before.per_image_s + after.per_image_s),
        "csml_wall_s": round(csml_run["wall_s"], 3),
        "csml_worker_time_per_job_ms": csml_run["run_ms"],
        "ratio_csml_over_baseline": round(csml_run["wall_s"] / baseline_s, 3),
        "baseline_cpu_s_before_after": [round(before.cpu_s, 3), round(after.cpu_s, 3)],
        "csml_cpu_s_all_processes": round(csml_cpu, 3),
        "cpu_ratio_csml_over_baseline": round(csml_cpu / baseline_cpu, 3),
        "csml_extra_cpu_ms_per_image": round(1000 * (csml_cpu - baseline_cpu) / len(images), 1),
        # The work itself, side by side: the pool's processes (their whole CPU over the
        # window, as the job children's) and CSML's processes by role.
        "pool_processes_cpu_ms_per_image": round(500 * sum(pool_cpu) / len(images), 2),
        "csml_cpu_ms_per_image": csml_run["cpu_ms_per_image"],
        "job_children_over_pool_processes_cpu": round(
            csml_run["cpu_ms_per_image"]["job children"] / (500 * sum(pool_cpu) / len(images)), 3
        ),
        "failed_jobs": csml_run["failed"],
        "face_count_mismatches": mismatched,
        "faces_found_total": sum(before.faces.values()),
        # Paid once per worker (the zygote's preload), not per job: see faces.py.
        "cascade_load_ms_once_per_zygote": round(1000 * cascade_load_seconds(), 2),
        "cpu": csml_run["cpu"],
        "http_requests_by_route": csml_run["requests"],
        "profile": profile.get("summary"),
    }


def _csml_faces(
    cluster: Cluster, images: list[Path], out_dir: Path, threads: int
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    clients = [cluster.new_user(timeout=300) for _ in range(threads)]

    def one(client: Client, path: Path) -> tuple[str, int | None, float | None]:
        job = client.submit("opencv", "detect_faces", files={"image": path})
        job.wait(timeout=600)
        if job.state.value != "succeeded":
            return path.name, None, None
        job.download("annotated", out_dir / f"{path.stem}.png")
        d = job.data
        run = (
            (d.finished_at - d.started_at).total_seconds()
            if d.finished_at and d.started_at
            else None
        )
        return path.name, int((job.result or {}).get("count", -1)), run

    requests0 = scrape_requests(cluster.url)
    with CpuWindow(cluster.pids()) as cpu:
        rows = drain(clients, images, one)
    requests = request_deltas(requests0, scrape_requests(cluster.url), len(images))
    for c in clients:
        c.close()
    runs = [r for _, _, r in rows if r is not None]
    return {
        "wall_s": cpu.wall,
        "faces": {n: c for n, c, _ in rows if c is not None},
        "failed": sum(1 for _, c, _ in rows if c is None),
        "run_ms": ms_summary(runs) if runs else {},
        "cpu": cpu.report(),
        "cpu_ms_per_image": cpu_ms_per_job(cpu, len(images)),
        "requests": requests,
    }


def pool_processes_cpu_s(window: dict[str, Any]) -> float:
    """CPU seconds of the pool's processes over a baseline's window (its parent left out)."""
    processes = window["processes"]
    return float(sum(p["cpu_s"] for name, p in processes.items() if name.startswith("pool")))


# -- report ----------------------------------------------------------------------


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    tp, lat, cv = results.get("throughput"), results.get("latency"), results.get("opencv")
    dur = results.get("durability")
    if tp:
        durable = dur is not None and dur["durable_and_intact"] == dur["expected"]
        rows.append(
            _row(
                "(a) echo throughput, jobs/s",
                f">= {TARGET_JOBS_PER_S:g}",
                tp["jobs_per_s"],
                tp["jobs_per_s"] >= TARGET_JOBS_PER_S and durable,
            )
        )
    if tp:
        coord_ms = tp["coordinator_cpu_ms_per_job"]
        rows.append(_row("(d) coordinator CPU per job, ms", "<= 1", coord_ms, coord_ms <= 1.0))
        rows.append(_row("(d) HTTP requests per job", "-", tp["http_requests_per_job"], None))
        rows.append(
            _row("(d) SQL statements per job", "-", tp["store_per_job"]["statements_per_job"], None)
        )
        rows.append(
            _row(
                "(d) write commits (fsyncs) per job",
                "-",
                tp["store_per_job"]["write_commits_per_job"],
                None,
            )
        )
    if dur:
        rows.append(
            _row(
                "(a,b) results durable after kill -9",
                "all",
                f"{dur['durable_and_intact']}/{dur['expected']}",
                dur["durable_and_intact"] == dur["expected"],
            )
        )
    if lat:
        p50 = lat["round_trip"]["p50_ms"]
        rows.append(
            _row("(b) echo round trip p50, ms", f"<= {TARGET_P50_MS:g}", p50, p50 <= TARGET_P50_MS)
        )
        p99 = lat["round_trip"]["p99_ms"]
        rows.append(_row("(b) echo round trip p99, ms", "<= 15", p99, p99 <= 15.0))
    tpb = results.get("throughput_batch")
    if tpb:
        durable = dur is not None and dur["durable_and_intact"] == dur["expected"]
        rows.append(
            _row(
                "(a) echo throughput via submit_many (batch route), jobs/s",
                f">= {TARGET_JOBS_PER_S:g}",
                tpb["jobs_per_s"],
                tpb["jobs_per_s"] >= TARGET_JOBS_PER_S and durable,
                window="throughput_batch",
            )
        )
        rows.append(
            _row(
                "(a) HTTP requests per job via submit_many",
                "-",
                tpb["http_requests_per_job"],
                None,
                window="throughput_batch",
            )
        )
    for key, label in (("throughput", "submit"), ("throughput_batch", "submit_many")):
        if results.get(key):
            per = results[key]["cpu_ms_per_job"]
            rows.append(
                _row(
                    f"(a) CPU-ms per job via {label}: coord/agents/zygotes/children/SDK",
                    "-",
                    "/".join(
                        f"{per.get(k, 0.0):g}"
                        for k in (
                            "coordinator",
                            "worker agents",
                            "zygotes",
                            "job children",
                            "SDK client (bench process)",
                        )
                    ),
                    None,
                    window=key,
                )
            )
    celery = results.get("celery")
    if celery and tpb:
        ratio = round(tpb["jobs_per_s"] / celery["throughput"]["jobs_per_s"], 3)
        rows.append(
            _row(
                "(a) CSML via submit_many / Celery throughput",
                ">= 1",
                ratio,
                ratio >= 1.0,
                window="throughput_batch",
            )
        )
    if celery and tp:
        ratio = round(tp["jobs_per_s"] / celery["throughput"]["jobs_per_s"], 3)
        rows.append(
            _row(
                "(a) Celery+Redis throughput, jobs/s", "-", celery["throughput"]["jobs_per_s"], None
            )
        )
        rows.append(_row("(a) CSML / Celery throughput", ">= 1", ratio, ratio >= 1.0))
    if celery and lat:
        rows.append(
            _row("(b) Celery+Redis round trip p50, ms", "-", celery["latency"]["p50_ms"], None)
        )
        rows.append(
            _row("(b) Celery+Redis round trip p99, ms", "-", celery["latency"]["p99_ms"], None)
        )
    if cv:
        ratio = cv["ratio_csml_over_baseline"]
        ok = ratio <= TARGET_OPENCV_RATIO and not cv["failed_jobs"]
        rows.append(_row("(c) opencv wall CSML/Pool(2)", f"<= {TARGET_OPENCV_RATIO:g}", ratio, ok))
        rows.append(
            _row("(c) opencv CPU CSML/Pool(2)", "-", cv["cpu_ratio_csml_over_baseline"], None)
        )
        rows.append(
            _row(
                "(c) job children / Pool processes, CPU per image",
                "-",
                cv["job_children_over_pool_processes_cpu"],
                None,
            )
        )
    return rows


def _row(
    metric: str, target: str, reached: Any, ok: bool | None, window: str | None = None
) -> dict[str, Any]:
    """`window`: the results key whose CPU window the figure comes from (acceptance.py's
    noise note), when it is not the part's default one."""
    status = "-" if ok is None else ("PASS" if ok else "MISS")
    row = {"metric": metric, "target": target, "reached": reached, "status": status}
    if window:
        row["window"] = window
    return row


def print_report(machine: dict[str, Any], results: dict[str, Any]) -> None:
    print()
    print(
        f"machine: {machine['cpu_model']}, {machine['logical_cores']} cores, "
        f"Python {machine['python']}, fsync {machine['fsync_ms_median']} ms, "
        f"load {machine['load_avg_at_start']}"
    )
    for name in ("throughput", "throughput_batch", "latency", "celery", "opencv"):
        if name in results:
            _print_details(name, results[name])
    print()
    rows = results["summary"]
    width = max(len(r["metric"]) for r in rows)
    print(f"{'metric':<{width}}  {'target':>8}  {'reached':>10}  status")
    print("-" * (width + 32))
    for r in rows:
        print(f"{r['metric']:<{width}}  {r['target']:>8}  {r['reached']!s:>10}  {r['status']}")
    for key in THROUGHPUT_KEYS.values():
        if key in results:
            print(f"(a) {results[key]['way']}: limited by {results[key]['analysis']['limited_by']}")


def _print_details(name: str, data: dict[str, Any]) -> None:
    print(f"\n[{name}]")
    for key, value in data.items():
        if key in ("profile",) and value:
            print(f"  profile (py-spy, % of samples): {json.dumps(value['by_bucket_pct'])}")
            continue
        if isinstance(value, dict):
            print(f"  {key}: {json.dumps(value)}")
        elif not isinstance(value, list) or len(value) < 20:
            print(f"  {key}: {value}")


def write_json(machine: dict[str, Any], cfg: Config, results: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"core-{datetime.now():%Y%m%d-%H%M%S}.json"
    doc = {"machine": machine, "config": asdict(cfg), **results}
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _timed(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    out = fn()
    _say(f"{label} done in {time.perf_counter() - start:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    machine = machine_info(cfg.base_dir or tempfile.gettempdir())
    results: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="csml-bench-", dir=cfg.base_dir)
    root = Path(tmp)
    _say(f"working in {root}")
    if {"a", "b"} & set(cfg.only):
        results.update(_timed("echo benchmarks", lambda: echo_benchmarks(cfg, root)))
    if cfg.anchor and {"a", "b"} & set(cfg.only):
        from celery_anchor import run as run_celery

        results["celery"] = _timed(
            "Celery + Redis anchor",
            lambda: run_celery(cfg.throughput_jobs, cfg.latency_jobs, cfg.latency_warmup),
        )
    if "c" in cfg.only:
        results["opencv"] = _timed("opencv benchmark", lambda: run_opencv(cfg, root))
    for key in THROUGHPUT_KEYS.values():
        if key in results:
            results[key]["analysis"] = throughput_limits(results[key], machine["fsync_ms_median"])
    results["summary"] = summary_rows(results)
    print_report(machine, results)
    print(f"\nwritten {write_json(machine, cfg, results)}")
    if not cfg.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"kept {root}")
    return 0 if all(r["status"] != "MISS" for r in results["summary"]) else 1


if __name__ == "__main__":
    sys.exit(main())
