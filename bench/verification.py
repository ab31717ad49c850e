"""What verification costs (issue 13, item 3), on real coordinator and worker processes.

1. Throughput of the same jobs under `none` and under `replicate:2`: two contributed
   workers of different identities (slots 1 each, no operator worker) serve `vcheck`
   (tests/verify_app.py: a deterministic app, `work` CPU seconds per job); probation is
   off (0) so that `none` takes their results as they are. Jobs/s for each policy, and
   the ratio (replicate:2 runs every job twice: about 0.5 is the expected ceiling).
2. Time to catch a lying worker: an operator worker and an honest contributor's run the
   honest copy, a third contributor's worker a copy that lies one time in three;
   `replicate:2`; jobs are submitted in a steady stream until the liar is quarantined:
   seconds and jobs from its first claimable job to its quarantine, and how many of its
   own runs it made before that. Repeated `--catches` times (fresh cluster each).

The machine's load (1-minute average) is printed with each figure; this machine is
shared, so compare figures measured under similar load.

    python bench/verification.py [--jobs 200] [--work 0.02] [--catches 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.*

from sqlalchemy import select
from tests.cluster import Cluster, running_cluster
from tests.integration.test_verification import (
    start_contributed,
    with_path,
    worker_of,
)
from tests.verify_app import APP, write_app

from csml.client import Client
from csml.schemas import JobState
from csml.store import verification as store
from csml.store.db import make_engine, sqlite_url
from csml.store.jobs import WORKERS

# A benchmark is one heavy user: per-identity abuse limits would throttle it.
UNLIMITED = {
    "CSML_SUBMISSION_RATE_LIMIT": "0",
    "CSML_MAX_ACTIVE_JOBS": "0",
    "CSML_IDENTITY_RATE_LIMIT": "0",
}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def throughput(cluster: Cluster, bob: Client, jobs: int, work: float, policy: str) -> float:
    cluster.csml("operator", "contributions", "policy", APP, policy)
    time.sleep(2.5)  # the coordinator's policy cache (2 s)
    started = time.monotonic()
    submitted = bob.submit_many(
        APP, "square", [{"params": {"n": n, "work": work}} for n in range(jobs)]
    )
    for job in submitted:
        assert not isinstance(job, Exception), job
        done = job.wait(600)
        assert done.state == JobState.succeeded, done.error
    return jobs / (time.monotonic() - started)


def part_throughput(root: Path, jobs: int, work: float) -> dict[str, Any]:
    site = write_app(root / "honest")
    settings = {"CSML_CONTRIBUTIONS": "true", "CSML_VERIFY_PROBATION": "0", **UNLIMITED}
    with running_cluster(root / "cluster", settings) as cluster:
        cluster.env["PYTHONPATH"] = with_path(site, cluster.env)
        # The operator's worker announces the app, then leaves: only contributed ones serve.
        announcer = cluster.start_worker(APP)
        cluster.wait_workers(APP, 1)
        announcer.terminate()
        announcer.wait(30)
        for name in ("alice", "carol"):
            start_contributed(cluster, cluster.new_user(), site, name)
        cluster.wait_workers(APP, 2)
        bob = cluster.new_user()
        throughput(cluster, bob, 10, work, "none")  # warm: zygotes, caches
        out: dict[str, Any] = {"jobs": jobs, "work_seconds": work}
        for policy in ("none", "replicate:2", "none", "replicate:2"):
            before = load()
            rate = throughput(cluster, bob, jobs, work, policy)
            out.setdefault(policy, []).append({"jobs_per_s": round(rate, 2), "load": before})
            print(f"  {policy:<12} {rate:7.2f} jobs/s   (load {before})", flush=True)
        best = {p: max(r["jobs_per_s"] for r in out[p]) for p in ("none", "replicate:2")}
        out["ratio"] = round(best["replicate:2"] / best["none"], 3)
        print(f"  replicate:2 / none = {out['ratio']}", flush=True)
        return out


def part_catch(root: Path, work: float, max_jobs: int = 600) -> dict[str, Any]:
    honest_site = write_app(root / "honest")
    lying_site = write_app(root / "lying", lie_rate=1 / 3)
    settings = {"CSML_CONTRIBUTIONS": "true", "CSML_VERIFY_PROBATION": "30", **UNLIMITED}
    with running_cluster(root / "cluster", settings) as cluster:
        cluster.env["PYTHONPATH"] = with_path(honest_site, cluster.env)
        cluster.start_worker(APP)
        cluster.wait_workers(APP, 1)
        cluster.csml("operator", "contributions", "policy", APP, "replicate:2")
        start_contributed(cluster, cluster.new_user(), honest_site, "carol")
        mallory = cluster.new_user()
        start_contributed(cluster, mallory, lying_site, "mallory")
        cluster.wait_workers(APP, 3)
        liar = worker_of(mallory)
        bob = cluster.new_user()
        before = load()
        started = datetime.now(UTC)
        sent: list[tuple[datetime, Any]] = []  # (when submitted, job)
        caught_at: datetime | None = None
        while len(sent) < max_jobs and caught_at is None:
            now = datetime.now(UTC)
            for job in bob.submit_many(
                APP,
                "square",
                [{"params": {"n": len(sent) + i, "work": work}} for i in range(5)],
            ):
                sent.append((now, job))
            while sum(1 for _, j in sent[-40:] if j.refresh().state.value == "queued") > 20:
                time.sleep(0.05)  # keep the queue short: a steady stream, not a backlog
            record = quarantined(cluster, liar)
            if record is not None:
                caught_at = record
        assert caught_at is not None, f"not caught within {len(sent)} jobs"
        runs = runs_before(cluster, liar, caught_at)
        out = {
            "seconds": round((caught_at - started).total_seconds(), 2),
            "jobs_submitted_before": sum(1 for when, _ in sent if when < caught_at),
            "liar_runs_before": len(runs),
            # Of its runs by then, the first one found wrong (a lie still waiting for its
            # comparison when the quarantine came shows no outcome yet).
            "liar_first_disagreement_at_run": next(
                (i + 1 for i, r in enumerate(runs) if r["outcome"] == "disagreed"), None
            ),
            "load": before,
        }
        print(
            f"  caught {out['seconds']} s after the stream began, "
            f"{out['jobs_submitted_before']} jobs submitted by then; the liar's runs by then "
            f"{out['liar_runs_before']}, the first found wrong: run "
            f"{out['liar_first_disagreement_at_run']}"
            f"   (load {before})",
            flush=True,
        )
        return out


def quarantined(cluster: Cluster, worker_id: str) -> datetime | None:
    engine = make_engine(sqlite_url(cluster.data_dir))
    try:
        with engine.connect() as conn:
            found = conn.scalar(select(WORKERS.c.quarantined_at).where(WORKERS.c.id == worker_id))
    finally:
        engine.dispose()
    return found


def runs_before(cluster: Cluster, worker_id: str, when: datetime) -> list[dict[str, Any]]:
    engine = make_engine(sqlite_url(cluster.data_dir))
    try:
        with engine.connect() as conn:
            return [r for r in store.runs_of_worker(conn, worker_id) if r["at"] <= when]
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--work", type=float, default=0.02, help="CPU seconds per job")
    parser.add_argument("--catches", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="csml-bench-verify-") as tmp:
        root = Path(tmp)
        print(f"throughput, {args.jobs} jobs of {args.work} CPU-s, 2 contributed workers:")
        result: dict[str, Any] = {"throughput": part_throughput(root / "t", args.jobs, args.work)}
        print("time to catch a worker that lies one time in three (replicate:2):")
        result["catch"] = [part_catch(root / f"c{i}", args.work) for i in range(args.catches)]
    result["cpus"] = os.cpu_count()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
