"""Scale on PostgreSQL: throughput with 1, 2 and 4 coordinators; claim latency vs queue depth.

    /work/venv/bin/python bench/scale.py [--jobs 2000] [--workers 16] [--submitters 8]
                                         [--only a,b] [--samples 300]

A throwaway PostgreSQL server is started (`tests/pg_server.py`, as the tests do).

(a) For 1, 2 and 4 coordinator processes (`python -m csml server`) on a fresh
    database: `--submitters` client threads submit `--jobs` echo jobs over HTTP
    while `--workers` worker loops claim (long-poll) and complete them over HTTP;
    clients and workers are spread round-robin over the coordinators, and their
    number stays the same, so only the coordinators vary. jobs/s = jobs / wall
    time from the first submission to the last completion; each job must run
    exactly once (the harness of tests/integration/postgres/test_scale.py). The workers are
    threads speaking the real worker protocol, not worker processes: this
    measures the coordinators and the store, not sandboxes.
(b) Claim latency (`JobQueue.claim`, one transaction: the store's part of
    POST /claim) p50/p99 with 100 and with 100,000 echo jobs queued (two
    databases, claimed from in turn so the machine's load hits both alike; each
    claimed job is replaced, untimed, to keep the depth); then the same through
    HTTP (POST /v1/workers/{id}/claim, wait 0), one coordinator process per database.
    Target: p99 ratio (100,000 / 100) <= 1.5.

Results are printed and written to bench/results/scale-<timestamp>.json. The
machine is probably shared: load average and the CPU other processes took
(`everything_else_cpu_s`) are reported with (a).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.postgres.support import bulk_queue, new_identity, new_worker  # noqa: E402
from tests.integration.postgres.test_scale import (  # noqa: E402
    check_exactly_once,
    drive,
    fleet,
    join_workers,
)
from tests.pg_server import PostgresServer, create_database, running_postgres  # noqa: E402

from cluster import CpuWindow, request_deltas, scrape_requests  # noqa: E402
from csml.coordinator.app import build_core  # noqa: E402
from csml.coordinator.config import Settings  # noqa: E402
from csml.coordinator.state import Core  # noqa: E402
from csml.coordinator.tokens import create_join_token  # noqa: E402
from csml.store.tables import Worker  # noqa: E402

DEPTHS = (100, 100_000)
TARGET_RATIO = 1.5


def fresh_core(pg: PostgresServer, root: Path) -> tuple[Core, str, str]:
    """A new database, migrated; its core, URL and a join token."""
    name = f"csml_bench_{secrets.token_hex(4)}"
    create_database(pg, name)
    url = pg.url_for(name)
    settings = Settings(
        database_url=url,
        data_dir=root / "shared-data",
        queue_capacity=1_000_000,
        max_active_jobs=0,
        submission_rate_limit=0,
    )
    core = build_core(settings)
    return core, url, create_join_token(settings, "bench", apps=["echo"])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def throughput(pg: PostgresServer, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in (1, 2, 4):
        run_root = root / f"a-{n}"
        core, url, token = fresh_core(pg, run_root)
        with fleet(url, run_root, n) as procs:
            pids = {f"coordinator-{i}": c.proc.pid for i, c in enumerate(procs)}
            pids["postgres"] = pg.process.pid
            with CpuWindow(pids) as cpu:
                run, elapsed = drive(
                    core,
                    procs,
                    token,
                    queued=0,
                    over_http=args.jobs,
                    workers=args.workers,
                    submitters=args.submitters,
                    timeout=1800,
                )
            routes: dict[str, tuple[float, float]] = {}
            for c in procs:  # summed over the coordinators
                for key, (count, total) in scrape_requests(c.url).items():
                    c0, t0 = routes.get(key, (0.0, 0.0))
                    routes[key] = (c0 + count, t0 + total)
        check_exactly_once(core, run)
        core.engine.dispose()
        results[str(n)] = {
            "jobs": args.jobs,
            "wall_s": round(elapsed, 2),
            "jobs_per_s": round(args.jobs / elapsed, 1),
            "executed_exactly_once": True,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "cpu": cpu.report(),
            "coordinator_cpu_ms_per_job": round(
                1000 * sum(v for k, v in cpu.used.items() if k.startswith("coord")) / args.jobs, 1
            ),
            "http_requests_by_route": request_deltas({}, routes, args.jobs),
        }
        print(f"(a) {n} coordinator(s): {args.jobs / elapsed:.0f} jobs/s ({elapsed:.1f} s)")
    base = results["1"]["jobs_per_s"]
    for r in results.values():
        r["ratio_to_one"] = round(r["jobs_per_s"] / base, 2)
    return results


@dataclass
class Queue:
    """A database holding `depth` queued echo jobs, and a worker to claim them."""

    depth: int
    core: Core
    url: str
    join_token: str
    owners: list[str]
    worker: Worker
    times: list[float] = field(default_factory=list)


def filled(pg: PostgresServer, root: Path, depth: int) -> Queue:
    core, url, token = fresh_core(pg, root / f"b-{depth}")
    owners = [new_identity(core) for _ in range(8)]
    for start in range(0, depth, 10_000):
        bulk_queue(core, owners, min(10_000, depth - start))
    return Queue(depth, core, url, token, owners, new_worker(core))


def measure(queues: list[Queue], claim: Callable[[Queue], int], samples: int) -> None:
    """Claim one job at a time from each queue in turn (so the machine's load falls on
    every depth alike), refilling what was claimed, untimed; 30 warm-up rounds."""
    for q in queues:
        q.times.clear()
    for i in range(samples + 30):
        for q in queues:
            t = time.perf_counter()
            got = claim(q)
            took = time.perf_counter() - t
            assert got == 1, f"claimed {got} jobs, not 1"
            if i >= 30:
                q.times.append(took)
            bulk_queue(q.core, q.owners, 1)


def summary(times: list[float]) -> dict[str, float]:
    return {
        "samples": len(times),
        "p50_ms": round(statistics.median(times) * 1000, 3),
        "p99_ms": round(pct(times, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(times) * 1000, 3),
    }


def latency(pg: PostgresServer, root: Path, samples: int) -> dict[str, Any]:
    queues = [filled(pg, root, depth) for depth in DEPTHS]
    out: dict[str, Any] = {}
    measure(queues, lambda q: len(q.core.queue.claim(q.worker, 1)), samples)
    out["store"] = {str(q.depth): summary(q.times) for q in queues}
    with ExitStack() as stack:
        http: dict[int, tuple[httpx.Client, str]] = {}
        for q in queues:
            (coordinator,) = stack.enter_context(fleet(q.url, root / f"b-http-{q.depth}", 1))
            worker_id, token = join_workers(coordinator.url, q.join_token, 1)[0]
            client = stack.enter_context(
                httpx.Client(
                    base_url=coordinator.url,
                    timeout=30,
                    headers={"Authorization": f"Bearer {token}"},
                )
            )
            http[q.depth] = (client, f"/v1/workers/{worker_id}/claim")

        def claim_http(q: Queue) -> int:
            client, path = http[q.depth]
            r = client.post(path, json={"max_jobs": 1, "wait": 0})
            assert r.status_code == 200, r.text
            return len(r.json()["jobs"])

        measure(queues, claim_http, samples)
    out["http"] = {str(q.depth): summary(q.times) for q in queues}
    for q in queues:
        q.core.engine.dispose()
    for kind in ("store", "http"):
        small, big = out[kind][str(DEPTHS[0])], out[kind][str(DEPTHS[1])]
        out[kind]["p50_ratio"] = round(big["p50_ms"] / small["p50_ms"], 2)
        out[kind]["p99_ratio"] = round(big["p99_ms"] / small["p99_ms"], 2)
        print(f"(b) {kind} claim: {out[kind]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--submitters", type=int, default=8)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--only", default="a,b")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        }
    }
    with (
        tempfile.TemporaryDirectory(prefix="csml-scale-") as tmp,
        running_postgres() as pg,
    ):
        report["postgresql"] = pg.version
        root = Path(tmp)
        if "a" in parts:
            report["a_throughput"] = throughput(pg, root, args)
        if "b" in parts:
            report["b_claim_latency"] = latency(pg, root, args.samples)
    print("\n== summary ==")
    if "a_throughput" in report:
        for n, r in report["a_throughput"].items():
            print(
                f"(a) {n} coordinator(s): {r['jobs_per_s']:7.1f} jobs/s  "
                f"x{r['ratio_to_one']:.2f} of one coordinator"
            )
    ok = True
    if "b_claim_latency" in report:
        b = report["b_claim_latency"]
        for kind in ("store", "http"):
            small, big = b[kind][str(DEPTHS[0])], b[kind][str(DEPTHS[1])]
            print(
                f"(b) {kind:5} claim p50/p99: {small['p50_ms']:.2f}/{small['p99_ms']:.2f} ms "
                f"(100 queued) vs {big['p50_ms']:.2f}/{big['p99_ms']:.2f} ms (100,000 queued); "
                f"ratio p50 {b[kind]['p50_ratio']}, p99 {b[kind]['p99_ratio']}"
            )
        ok = b["store"]["p99_ratio"] <= TARGET_RATIO
        print(f"(b) target p99 ratio <= {TARGET_RATIO}: {'PASS' if ok else 'MISS'}")
    out = ROOT / "bench" / "results" / f"scale-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
