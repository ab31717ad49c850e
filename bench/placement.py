"""Warm-model placement: what it saves to run dnn_infer jobs where their network is loaded.

    PYTHONPATH=src:. /work/venv/bin/python bench/placement.py [--jobs 40] [--layers 400]

Real processes (`python -m csml server`, two `csml worker --app opencv`), SQLite. One
user keeps two networks as models (a chain of `--layers` fully connected layers built
here with the `onnx` package: quick to run, slow to load); worker A runs model a once
and worker B model b once (set up with `role` labels), so each holds one loaded. Then
`--jobs` jobs alternating a, b are queued at once, free to run anywhere, twice:

- `window 16`: the claim prefers jobs whose model the worker holds (the default);
- `window 0`: strict fair order (CSML_PLACEMENT_WINDOW=0), what CSML did before.

For each run it prints the makespan (first start to last finish), the sum and median of
the jobs' wall times, how many jobs found their network loaded (a job is warm if the
worker's last job ran the same network: a worker's process keeps the last one), and
the load time saved (median cold minus median warm job, times the warm jobs gained).
Also the network's load time measured in this process, and the machine's load
(`uptime`) before and after. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from csml.client import Client, Job

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import running_cluster
from tests.integration.apps.dnn_builders import onnx_deep

WIDTH = 64


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()


def load_seconds(network: bytes, repeat: int = 5) -> float:
    """The median time OpenCV takes to load the network and run it once, here."""
    import cv2

    x = np.ones((1, WIDTH), np.float32)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        net = cv2.dnn.readNetFromONNX(np.frombuffer(network, np.uint8))
        net.setInput(x)
        net.forward()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker_of(data_dir: Path, job_ids: list[str]) -> dict[str, str]:
    db = sqlite3.connect(f"file:{data_dir / 'csml.db'}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(job_ids))
        rows = db.execute(
            "SELECT jobs.id, workers.labels FROM jobs JOIN workers ON workers.id = jobs.worker_id "
            f"WHERE jobs.id IN ({marks})",
            job_ids,
        ).fetchall()
    finally:
        db.close()
    return {job_id: json.loads(labels)["role"] for job_id, labels in rows}


def run(window: int, jobs: int, networks: dict[str, bytes], root: Path) -> dict[str, Any]:
    settings = {
        "CSML_MAX_UPLOAD_BYTES": str(256 << 20),
        "CSML_PLACEMENT_WINDOW": str(window),
        "CSML_MAX_MODELS": "1000",  # each dnn_infer job may keep a model: counted queued
        "CSML_MAX_ACTIVE_JOBS": "1000",
    }
    with running_cluster(root, settings) as c:
        for role in ("a", "b"):
            c.start_worker("opencv", 1, ("--label", f"role={role}"))
        c.wait_workers("opencv", 2, timeout=180)
        user: Client = c.new_user()
        x = root / "x.npy"
        np.save(x, np.ones((1, WIDTH), np.float32), allow_pickle=False)
        models: dict[str, str] = {}
        for role, data in networks.items():
            path = root / f"{role}.onnx"
            path.write_bytes(data)
            up = user.submit(
                "opencv",
                "dnn_infer",
                files={"network": path, "tensor": x},
                requires={"role": role},
            )
            assert up.wait(timeout=600).state.value == "succeeded", up.data.error
            models[role] = up.data.models["model"]
            warming = user.submit(
                "opencv",
                "dnn_infer",
                files={"tensor": x},
                params={"model": models[role]},
                requires={"role": role},
            )
            assert warming.wait(timeout=600).state.value == "succeeded", warming.data.error
        order = [("a", "b")[i % 2] for i in range(jobs)]
        answers = user.submit_many(
            "opencv",
            "dnn_infer",
            [{"params": {"model": models[m]}, "files": {"tensor": x}} for m in order],
        )
        done: list[Job] = []
        for answer in answers:
            assert isinstance(answer, Job), answer
            assert answer.wait(timeout=900).state.value == "succeeded", answer.data.error
            done.append(answer)
        where = worker_of(c.data_dir, [j.id for j in done])
    per_worker: dict[str, list[tuple[Any, str, float]]] = {"a": [], "b": []}
    starts, ends = [], []
    for job, model in zip(done, order, strict=True):
        d = job.data
        assert d.started_at is not None and d.finished_at is not None
        starts.append(d.started_at)
        ends.append(d.finished_at)
        per_worker[where[job.id]].append(
            (d.started_at, model, (d.finished_at - d.started_at).total_seconds())
        )
    warm: list[float] = []
    cold: list[float] = []
    for role, seq in per_worker.items():
        loaded = role  # what the worker's process held before the batch
        for _, model, wall in sorted(seq):
            (warm if model == loaded else cold).append(wall)
            loaded = model
    walls = warm + cold
    return {
        "window": window,
        "jobs": jobs,
        "makespan_s": round((max(ends) - min(starts)).total_seconds(), 3),
        "sum_wall_s": round(sum(walls), 3),
        "p50_wall_ms": round(statistics.median(walls) * 1000, 1),
        "warm_jobs": len(warm),
        "cold_jobs": len(cold),
        "p50_warm_ms": round(statistics.median(warm) * 1000, 1) if warm else None,
        "p50_cold_ms": round(statistics.median(cold) * 1000, 1) if cold else None,
        "jobs_per_worker": {r: len(s) for r, s in per_worker.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=40)
    p.add_argument("--layers", type=int, default=400)
    p.add_argument("--json-out", type=Path, default=None)
    a = p.parse_args()
    networks = {"a": onnx_deep(a.layers, WIDTH, seed=1), "b": onnx_deep(a.layers, WIDTH, seed=2)}
    size = len(networks["a"])
    load = load_seconds(networks["a"])
    print(
        f"network: {a.layers} layers, {size / 1e6:.1f} MB; load+first run here {load * 1000:.0f} ms"
    )
    before = uptime()
    print(f"before: {before}")
    results = []
    for window in (16, 0):
        with tempfile.TemporaryDirectory(prefix="csml-bench-placement-") as tmp:
            os.chmod(tmp, 0o755)
            r = run(window, a.jobs, networks, Path(tmp))
        results.append(r)
        print(
            f"window {window:>2}: makespan {r['makespan_s']:.2f} s, sum of job walls "
            f"{r['sum_wall_s']:.2f} s, p50 {r['p50_wall_ms']:.0f} ms; warm {r['warm_jobs']}/"
            f"{r['jobs']} (p50 {r['p50_warm_ms']} ms), cold {r['cold_jobs']} "
            f"(p50 {r['p50_cold_ms']} ms); jobs per worker {r['jobs_per_worker']}",
            flush=True,
        )
    after = uptime()
    print(f"after: {after}")
    pref, strict = results
    saved_per_job = None
    if pref["p50_cold_ms"] is not None or strict["p50_cold_ms"] is not None:
        cold_ms = strict["p50_cold_ms"] or pref["p50_cold_ms"]
        warm_ms = pref["p50_warm_ms"] or strict["p50_warm_ms"]
        saved_per_job = round(cold_ms - warm_ms, 1)
    gained = pref["warm_jobs"] - strict["warm_jobs"]
    summary = {
        "network_mb": round(size / 1e6, 2),
        "load_ms_in_process": round(load * 1000, 1),
        "runs": results,
        "warm_jobs_gained": gained,
        "saved_ms_per_warm_job_p50": saved_per_job,
        "saved_s_total_estimate": round(gained * saved_per_job / 1000, 2)
        if saved_per_job
        else None,
        "load_before": before,
        "load_after": after,
    }
    print(
        f"preference ran {gained} more of {a.jobs} jobs warm; a cold job costs ~{saved_per_job} ms "
        f"more (p50): ~{summary['saved_s_total_estimate']} s of loading saved; sum of job walls "
        f"{strict['sum_wall_s']:.2f} s -> {pref['sum_wall_s']:.2f} s"
    )
    out = a.json_out or Path(__file__).resolve().parent / "results" / "placement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
