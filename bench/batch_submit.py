"""`Client.map` over many no-op items, with and without the batch route.

    /work/venv/bin/python bench/batch_submit.py              # 2,000 items, each mode
    /work/venv/bin/python bench/batch_submit.py --items 300  # a smoke test

A real loopback cluster (`bench/cluster.py`: coordinator + 2 `echo` workers x 8 slots,
no per-identity limits) runs `Client.map("echo", "echo", files)` over tiny files, once
with small files submitted many per request (`POST /v1/jobs/batch`, the default) and
once with `batch_items=0` (one `POST /v1/jobs` per item, as before the route), each
mode with a fresh identity, the same `--concurrency` items in flight and the result
stream on. Per mode it prints jobs/s (wall time of `map`, submit to every result
read), HTTP requests per job by route (from the coordinator's /metrics), CPU per job
of each process, and the machine's load (`uptime`) before and after.

Results also go to bench/results/batch_submit-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from cluster import Cluster, CpuWindow, request_deltas, scrape_requests
from csml.client.batch import BATCH_ITEMS

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def small_files(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"item{i:05d}.txt"
        path.write_bytes(f"no-op {i}\n".encode())
        out.append(path)
    return out


def run_mode(
    cluster: Cluster, files: list[Path], batch_items: int, concurrency: int
) -> dict[str, Any]:
    with cluster.new_user() as client:
        client.map("echo", "echo", files[:20], concurrency=20, batch_items=batch_items)  # warm
        before = scrape_requests(cluster.url)
        load_before = load()
        with CpuWindow(cluster.pids()) as cpu:
            batch = client.map(
                "echo", "echo", files, concurrency=concurrency, batch_items=batch_items
            )
        load_after = load()
        requests = request_deltas(before, scrape_requests(cluster.url), len(files))
    ok = len(batch.succeeded)
    jobs = len(files)
    submit_routes = ("POST /v1/jobs", "POST /v1/jobs/batch")
    return {
        "mode": f"batch route ({batch_items} items/request at most)" if batch_items else "alone",
        "jobs": jobs,
        "ok": ok,
        "failed_examples": [i.error for i in batch.failed[:3]],
        "concurrency": concurrency,
        "wall_s": round(cpu.wall, 3),
        "jobs_per_s": round(jobs / cpu.wall, 1),
        "submit_requests_per_job": round(
            sum(r["per_job"] for k, r in requests.items() if k in submit_routes), 3
        ),
        "http_requests_per_job": round(sum(r["per_job"] for r in requests.values()), 2),
        "http_requests_by_route": requests,
        "cpu_ms_per_job": {name: round(1000 * sec / jobs, 2) for name, sec in cpu.used.items()},
        "cpu": cpu.report(),
        "load_before": load_before,
        "load_after": load_after,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, default=2000, help="no-op items per mode [2000]")
    p.add_argument("--concurrency", type=int, default=2000, help="items in flight [2000]")
    p.add_argument("--workers", type=int, default=2, help="echo worker processes [2]")
    p.add_argument("--slots", type=int, default=8, help="slots per worker [8]")
    p.add_argument("--batch-items", type=int, default=BATCH_ITEMS, help="items per request")
    p.add_argument("--modes", default="batch,alone", help="batch, alone or both")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="csml-bench-batch-") as tmp:
        root = Path(tmp)
        files = small_files(root / "in", a.items)
        with Cluster(root / "cluster") as cluster:
            cluster.start_coordinator()
            cluster.start_workers("echo", a.workers, a.slots)
            for mode in modes:
                size = a.batch_items if mode == "batch" else 0
                print(f"-- {mode}: {a.items} items, load {load()}", file=sys.stderr)
                try:
                    results.append(run_mode(cluster, files, size, a.concurrency))
                except Exception as exc:
                    print(f"{mode} failed: {exc}\n{cluster.logs()[-3000:]}", file=sys.stderr)
                    results.append({"mode": mode, "error": str(exc)})
    print(f"\n{'mode':<44} {'jobs/s':>8} {'submit req/job':>15} {'req/job':>8}  load")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<44} failed: {r['error']}")
            continue
        print(
            f"{r['mode']:<44} {r['jobs_per_s']:>8} {r['submit_requests_per_job']:>15} "
            f"{r['http_requests_per_job']:>8}  {r['load_before']} -> {r['load_after']}"
        )
        print(f"   cpu ms/job: {r['cpu_ms_per_job']}; ok {r['ok']}/{r['jobs']}")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"batch_submit-{datetime.now():%Y%m%d-%H%M%S}.json"
    machine = {"cpus": os.cpu_count(), "uname": " ".join(os.uname()), "at": time.time()}
    out.write_text(json.dumps({"machine": machine, "args": vars(a), "results": results}, indent=2))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
