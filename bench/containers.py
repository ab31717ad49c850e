"""(c) End-to-end throughput through the container cluster vs the same processes run natively.

Both sides run the same topology: PostgreSQL, one coordinator, one echo worker (4 slots)
and one OpenCV worker (2 slots). Natively they are `python -m csml ...` processes on
loopback with PostgreSQL from tests/pg_server.py; in containers they are the images of
scripts/build-images.sh on a Podman network (198.19.x.0/24), reached from the host at their
container addresses. The same client threads (one identity each, on the host) submit and
wait for:

- echo: `--echo-jobs` echo jobs (the platform's own cost per job: HTTP, store, fork);
- opencv: `--images` detect_faces jobs on scikit-image's astronaut photo (compute-bound).

Both clusters run at once and the measured rounds alternate between them, so load from
anything else on the machine falls on both alike. Prints jobs/s per side (median of the
rounds) and the ratio container/native (target >= 0.8), and writes them to
bench/results/containers-<timestamp>.json.

    /work/venv/bin/python bench/containers.py [--echo-jobs 150] [--images 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster import free_port, wait_healthy  # noqa: E402
from tests.e2e.containers.podman_cluster import FAST, ContainerCluster, ensure_images  # noqa: E402
from tests.pg_server import running_postgres  # noqa: E402

from csml.client import Client  # noqa: E402

SETTINGS = {
    **FAST,
    "CSML_POW_DIFFICULTY": "0",
    "CSML_SUBMISSION_RATE_LIMIT": "0",
    "CSML_MAX_ACTIVE_JOBS": "0",
    "CSML_IDENTITY_RATE_LIMIT": "0",
}
WORKERS = {"echo": 4, "opencv": 2}
PHOTO = Path(str(__import__("skimage").__file__)).parent / "data" / "astronaut.png"


def run_load(url: str, threads: int, jobs: int, submit: Callable[[Client], Any]) -> float:
    """`jobs` jobs over `threads` client threads, each submit + wait; returns jobs/s."""
    clients = []
    for _ in range(threads):
        c = Client(url, "", insecure_http=True)
        c.create_identity()
        clients.append(c)
    counter = iter(range(jobs))
    lock = threading.Lock()
    errors: list[str] = []

    def loop(c: Client) -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            job = submit(c)
            job.wait(timeout=300)
            if job.state.value != "succeeded":
                errors.append(f"{job.id[:12]} {job.state.value}: {job.error}")

    start = time.perf_counter()
    pool = [threading.Thread(target=loop, args=(c,)) for c in clients]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError(f"{len(errors)} jobs failed: {errors[:3]}")
    return jobs / elapsed


def echo_job(c: Client) -> Any:
    return c.submit("echo", "echo", params={"n": 1})


def opencv_job(c: Client) -> Any:
    return c.submit("opencv", "detect_faces", files={"image": PHOTO})


def wait_apps(url: str, apps: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with Client(url, "", insecure_http=True) as c:
        while time.monotonic() < deadline:
            live = {a.name for a in c.apps() if a.workers >= 1}
            if live >= set(apps):
                return
            time.sleep(0.3)
    raise RuntimeError(f"workers for {apps} did not join")


@contextlib.contextmanager
def native(root: Path) -> Iterator[str]:
    procs: list[subprocess.Popen[bytes]] = []
    with running_postgres(root / "pg") as pg:
        env = {**os.environ, **SETTINGS, "CSML_DATA_DIR": str(root / "data"),
               "CSML_DATABASE_URL": pg.url}  # fmt: skip
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        token = subprocess.run(
            [sys.executable, "-m", "csml", "join-token", "create", "--any-app"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        log = open(root / "native.log", "ab")  # noqa: SIM115
        try:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "csml", "server", "--port", str(port)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
            wait_healthy(url, timeout=60)
            for app, slots in WORKERS.items():
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "csml", "worker", "--app", app, "--slots", str(slots),
                     "--coordinator", url],
                    env={**env, "CSML_JOIN_TOKEN": token}, stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
            wait_apps(url, list(WORKERS))
            yield url
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
            log.close()


@contextlib.contextmanager
def containers(root: Path) -> Iterator[str]:
    cluster = ContainerCluster(root, SETTINGS)
    try:
        cluster.start_network()
        cluster.start_postgres()
        url = cluster.start_coordinator("coord1")
        for app, slots in WORKERS.items():
            cluster.start_worker(app, "coord1", f"{app}-1", slots=slots)
        wait_apps(url, list(WORKERS))
        yield url
    finally:
        cluster.stop()


def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Both clusters run at once; rounds alternate between them (which goes first too), so
    load from anything else on the machine falls on both sides alike."""
    loads = {
        "echo_jobs_per_s": (args.echo_jobs, echo_job),
        "opencv_jobs_per_s": (args.images, opencv_job),
    }
    rates: dict[str, dict[str, list[float]]] = {side: {k: [] for k in loads} for side in urls}
    for url in urls.values():  # warm-up: connections, zygotes, caches
        run_load(url, args.threads, 10, echo_job)
        run_load(url, args.threads, 4, opencv_job)
    for r in range(args.rounds):
        sides = list(urls) if r % 2 == 0 else list(reversed(urls))
        for metric, (jobs, submit) in loads.items():
            for side in sides:
                rates[side][metric].append(run_load(urls[side], args.threads, jobs, submit))
        print(f"round {r + 1}: " + "   ".join(
            f"{side} echo {rates[side]['echo_jobs_per_s'][-1]:.1f}/s "
            f"opencv {rates[side]['opencv_jobs_per_s'][-1]:.2f}/s" for side in urls
        ), flush=True)  # fmt: skip
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--echo-jobs", type=int, default=150, help="Echo jobs per round.")
    parser.add_argument("--images", type=int, default=16, help="OpenCV jobs per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--no-build", action="store_true", help="Use the images as built.")
    args = parser.parse_args()
    if not args.no_build:
        print(f"images up to date in {ensure_images():.0f} s", flush=True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="csml-bench-") as tmp:
        root = Path(tmp)
        (root / "n").mkdir()
        (root / "c").mkdir()
        with native(root / "n") as nurl, containers(root / "c") as curl:
            rates = measure({"native": nurl, "container": curl}, args)
    med = {side: {k: statistics.median(v) for k, v in m.items()} for side, m in rates.items()}
    ratios = {k: med["container"][k] / med["native"][k] for k in med["native"]}
    summary = {
        "median_jobs_per_s": med,
        "ratio_container_over_native": ratios,
        "target_ratio": 0.8,
        "pass": all(r >= 0.8 for r in ratios.values()),
        "rounds": rates,
        "params": vars(args),
        "loadavg_1m_before_after": [load_before, os.getloadavg()[0]],
        "cpus": os.cpu_count(),
    }
    for side in ("native", "container"):
        print(f"{side:<10} echo {med[side]['echo_jobs_per_s']:7.1f} jobs/s   "
              f"opencv {med[side]['opencv_jobs_per_s']:6.2f} jobs/s  (medians)")  # fmt: skip
    print(f"{'ratio':<10} echo {ratios['echo_jobs_per_s']:7.2f}          "
          f"opencv {ratios['opencv_jobs_per_s']:6.2f}   (target >= 0.8: "
          f"{'PASS' if summary['pass'] else 'MISS'})")  # fmt: skip
    out = ROOT / "bench" / "results" / f"containers-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"written {out.relative_to(ROOT)}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
