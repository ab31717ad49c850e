"""Celery + Redis on this machine: the anchor CSML's core figures are compared with.

    /work/venv/bin/python bench/celery_anchor.py [--jobs 2000] [--latency-jobs 300]

`bench/core.py` runs this in the same run as CSML's (a) and (b) (unless --no-anchor) and
prints both and their ratio. What is run, so the comparison can be judged:

- redis-server from Debian (`apt-get install redis-server` when missing, as root), on a
  free loopback port in a temporary folder, as Redis ships it but with no RDB snapshots
  or AOF: Celery's broker messages and results are NOT fsync'd, CSML's are.
- Celery 5 with its Redis extra in the bench's own venv (~/.cache/csml/bench-celery-venv,
  made once), never in CSML's.
- One worker: prefork pool, concurrency 2 and Celery's default prefetch (4 per process):
  the 2 concurrent executions and the prefetch of 8 CSML's bench uses; `task_acks_late`,
  results stored in Redis and read back by the client.
- (a) throughput: `--jobs` no-op tasks submitted, then every result read back
  (`AsyncResult.get`); wall time from the first submit to the last result.
- (b) latency: one task at a time, submit -> result, after a warm-up.
CPU seconds of the worker tree, of redis-server and of the client are measured over each
part. Prints a JSON document on stdout (and a human summary on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster import free_port, tree_cpu_seconds

CACHE = Path(os.environ.get("CSML_CACHE_DIR", Path.home() / ".cache" / "csml"))
VENV = CACHE / "bench-celery-venv"
CELERY_SPEC = "celery[redis]>=5.4,<6"

TASKS = """
import os
from celery import Celery

app = Celery("anchor", broker=os.environ["ANCHOR_REDIS"], backend=os.environ["ANCHOR_REDIS"])
app.conf.update(
    task_acks_late=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task
def noop(i):
    return {"i": i}
"""

CLIENT = """
import json, os, statistics, sys, time
from tasks import noop

jobs, latency_jobs, warmup = (int(x) for x in sys.argv[1:4])
out = {}
for r in [noop.delay(-1) for _ in range(warmup)]:
    r.get(timeout=120)
print(json.dumps({"phase": "warm"}), flush=True)
sys.stdin.readline()  # the parent starts its CPU window, then says go
cpu0, t0 = time.process_time(), time.perf_counter()
pending = [noop.delay(i) for i in range(jobs)]
submitted = time.perf_counter()
ok = sum(1 for i, r in enumerate(pending) if r.get(timeout=300) == {"i": i})
wall = time.perf_counter() - t0
out["throughput"] = {"jobs": jobs, "ok": ok, "wall_s": wall, "submit_s": submitted - t0,
                     "client_cpu_s": time.process_time() - cpu0}
print(json.dumps({"phase": "a"}), flush=True)
sys.stdin.readline()
cpu0 = time.process_time()
times = []
for i in range(latency_jobs):
    t = time.perf_counter()
    assert noop.delay(i).get(timeout=60) == {"i": i}
    times.append(time.perf_counter() - t)
out["latency"] = {"jobs": latency_jobs, "round_trip_s": times,
                  "client_cpu_s": time.process_time() - cpu0}
print(json.dumps({"phase": "b", **out}), flush=True)
"""


def say(text: str) -> None:
    print(f"[celery-anchor] {text}", file=sys.stderr, flush=True)


def ensure_redis() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("redis-server is missing: sudo apt-get install redis-server")
    say("apt-get install redis-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    # Debian starts a system redis on 6379; the anchor uses its own, so stop that one.
    subprocess.run(["service", "redis-server", "stop"], check=False, capture_output=True)
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import celery, redis"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    say(f"making the bench's Celery venv in {VENV}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", CELERY_SPEC], check=True, capture_output=True
    )
    return python


def celery_version(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import celery; print(celery.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def wait_redis(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer in {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    return {name: tree_cpu_seconds(pid) for name, pid in pids.items()}


def run(jobs: int, latency_jobs: int, warmup: int = 50) -> dict[str, Any]:
    """Start Redis and a Celery worker, run (a) and (b), stop everything; the figures."""
    redis_server, python = ensure_redis(), ensure_venv()
    with tempfile.TemporaryDirectory(prefix="csml-celery-anchor-") as tmp:
        root = Path(tmp)
        (root / "tasks.py").write_text(TASKS)
        (root / "client.py").write_text(CLIENT)
        port = free_port()
        env = {
            **os.environ,
            "ANCHOR_REDIS": f"redis://127.0.0.1:{port}/0",
            "PYTHONPATH": str(root),
        }
        env.pop("PYTHONSTARTUP", None)
        log = (root / "redis.log").open("wb")
        redis = subprocess.Popen(
            [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(root), "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        worker = client = None
        try:
            wait_redis(port)
            worker = subprocess.Popen(
                [str(python), "-m", "celery", "-A", "tasks", "worker", "--pool", "prefork",
                 "--concurrency", "2", "--loglevel", "WARNING", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            client = subprocess.Popen(
                [str(python), str(root / "client.py"), str(jobs), str(latency_jobs), str(warmup)],
                cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            assert client.stdin is not None and client.stdout is not None
            pids = {"celery_worker": worker.pid, "redis": redis.pid}

            def phase() -> dict[str, Any]:
                assert client is not None and client.stdout is not None
                line = client.stdout.readline()
                if not line:
                    raise RuntimeError(f"Celery client ended early; log:\n{_tail(root)}")
                data: dict[str, Any] = json.loads(line)
                return data

            phase()  # warm
            parts: dict[str, dict[str, float]] = {}
            for name in ("a", "b"):
                cpu0, t0 = cpu_of(pids), time.perf_counter()
                client.stdin.write(b"go\n")
                client.stdin.flush()
                last = phase()
                cpu1 = cpu_of(pids)
                parts[name] = {
                    "wall_s": time.perf_counter() - t0,
                    **{k: cpu1[k] - cpu0[k] for k in pids},
                }
            client.wait(timeout=60)
        finally:
            for proc in (client, worker, redis):
                if proc is not None:
                    stop(proc)
            log.close()
    return _summarise(last, parts, celery_version(python))


def _tail(root: Path) -> str:
    text = (root / "redis.log").read_text(errors="replace")
    return "\n".join(text.splitlines()[-30:])


def _summarise(
    data: dict[str, Any], parts: dict[str, dict[str, float]], version: str
) -> dict[str, Any]:
    tp, lat = data["throughput"], data["latency"]
    times_ms = sorted(1000 * float(t) for t in lat["round_trip_s"])

    def pct(q: float) -> float:
        rank = max(1, min(len(times_ms), round(q / 100 * len(times_ms) + 0.5)))
        return round(times_ms[rank - 1], 2)

    def cpu_ms(part: str, jobs: int, client_cpu: float) -> dict[str, float]:
        p = parts[part]
        return {
            "celery_worker": round(1000 * p["celery_worker"] / jobs, 3),
            "redis": round(1000 * p["redis"] / jobs, 3),
            "client": round(1000 * client_cpu / jobs, 3),
        }

    return {
        "celery": version,
        "setup": "redis-server (no fsync), Celery prefork x2, acks_late, results read back",
        "throughput": {
            "jobs": tp["jobs"],
            "ok": tp["ok"],
            "wall_s": round(tp["wall_s"], 3),
            "jobs_per_s": round(tp["jobs"] / tp["wall_s"], 1),
            "cpu_ms_per_job": cpu_ms("a", tp["jobs"], tp["client_cpu_s"]),
        },
        "latency": {
            "jobs": lat["jobs"],
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "cpu_ms_per_job": cpu_ms("b", lat["jobs"], lat["client_cpu_s"]),
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--latency-jobs", type=int, default=300)
    a = p.parse_args()
    load = [round(x, 2) for x in os.getloadavg()]
    result = run(a.jobs, a.latency_jobs)
    result["load_avg_at_start"] = load
    print(json.dumps(result, indent=2))
    tp, lat = result["throughput"], result["latency"]
    say(
        f"Celery {result['celery']}: {tp['jobs_per_s']} jobs/s ({tp['ok']}/{tp['jobs']} ok), "
        f"round trip p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms; load {load}"
    )


if __name__ == "__main__":
    main()
