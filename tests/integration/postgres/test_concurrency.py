"""Several coordinators sharing one PostgreSQL database: every job is claimed exactly once.

First two `build_core` instances in this process (two engines, two pools), then
two real coordinator processes (`python -m csml server`) driven over HTTP.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from csml.apps.registry import installed_apps
from csml.coordinator.config import Settings
from csml.coordinator.state import Core
from csml.coordinator.tokens import create_join_token
from csml.schemas import JobCompletion, WorkerRegistration
from csml.store.tables import Job
from tests.cluster import free_port, wait_healthy
from tests.integration.postgres.support import (
    MakeCore,
    bulk_queue,
    new_identity,
    new_worker,
    submit,
)

# Starts a private PostgreSQL server (initdb) for the session's first test; concurrent
# coordinators, waits of up to 150 s.
pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(300)]


class Claims:
    """Thread-safe record of who claimed what, under which lease."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.per_job: Counter[str] = Counter()
        self.holders: dict[str, tuple[str, str]] = {}  # job id -> (worker id, lease id)
        self.leases: Counter[str] = Counter()  # claims per lease id (one claim call each)
        self.errors: list[str] = []

    def add(self, worker_id: str, jobs: list[tuple[str, str]]) -> None:
        with self._lock:
            for job_id, lease_id in jobs:
                self.per_job[job_id] += 1
                self.holders[job_id] = (worker_id, lease_id)
            for lease_id in {lease for _, lease in jobs}:
                self.leases[lease_id] += 1

    def error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)


def run_all(targets: list[Callable[[], None]], timeout: float) -> None:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout} s"


def check_claimed_once(core: Core, submitted: set[str], claims: Claims) -> None:
    assert claims.errors == []
    twice = {j: n for j, n in claims.per_job.items() if n != 1}
    assert twice == {}, f"{len(twice)} jobs claimed more than once"
    lost = submitted - set(claims.per_job)
    assert not lost, f"{len(lost)} jobs were never claimed"
    assert set(claims.per_job) == submitted
    # One lease per claim call: no two calls handed out the same lease.
    assert all(n == 1 for n in claims.leases.values())
    with core.sessions() as session:
        rows = session.execute(select(Job.id, Job.state, Job.attempts, Job.worker_id, Job.lease_id))
        db = {r.id: r for r in rows}
    assert set(db) == submitted
    for job_id, row in db.items():
        assert (row.state, row.attempts) == ("running", 1), (job_id, row)
        assert (row.worker_id, row.lease_id) == claims.holders[job_id]


def test_two_coordinators_in_one_process(make_core: MakeCore) -> None:
    """Two engines on one database: 16 claimers drain a queue that is still being filled."""
    # ~200 queued jobs per identity: past the default limit, which submit checks.
    cores = [make_core(queue_capacity=100_000, max_active_jobs=0) for _ in range(2)]
    owners = [new_identity(cores[0]) for _ in range(4)]
    workers = [new_worker(cores[0]) for _ in range(8)]
    queued_up_front, per_submitter, submitters_per_core, claimers_per_core = 600, 50, 2, 8
    submitted: set[str] = set(bulk_queue(cores[0], owners, queued_up_front))
    lock = threading.Lock()
    submitters_left = [2 * submitters_per_core]
    claims = Claims()

    def submitter(core: Core, k: int) -> Callable[[], None]:
        def run() -> None:
            try:
                for i in range(per_submitter):
                    job_id = submit(core, owners[(k + i) % len(owners)], n=i, k=k)
                    with lock:
                        submitted.add(job_id)
            except Exception as exc:
                claims.error(f"submit: {exc!r}")
            finally:
                with lock:
                    submitters_left[0] -= 1

        return run

    def claimer(core: Core, k: int) -> Callable[[], None]:
        worker = workers[k % len(workers)]
        rng = random.Random(k)

        def run() -> None:
            try:
                while True:
                    with lock:
                        done = submitters_left[0] == 0
                    jobs = core.queue.claim(worker, rng.randint(1, 4))
                    claims.add(worker.id, [(j.id, j.lease_id) for j in jobs])
                    if not jobs:
                        if done:  # every submission committed before this empty claim began
                            return
                        time.sleep(0.02)
            except Exception as exc:
                claims.error(f"claim: {exc!r}")

        return run

    targets = [
        submitter(cores[c], c * submitters_per_core + s)
        for c in range(2)
        for s in range(submitters_per_core)
    ] + [
        claimer(cores[c], c * claimers_per_core + k)
        for c in range(2)
        for k in range(claimers_per_core)
    ]
    run_all(targets, timeout=120)
    assert len(submitted) == queued_up_front + 2 * submitters_per_core * per_submitter
    check_claimed_once(cores[0], submitted, claims)


# -- two coordinator processes over HTTP ----------------------------------------


class Coordinator:
    def __init__(self, name: str, env: dict[str, str], logs: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "csml",
                    "server",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait(self) -> None:
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop_all(procs: list[Coordinator]) -> None:
    """SIGTERM to each, then wait for each: they shut down side by side."""
    for c in procs:
        c.terminate()
    for c in procs:
        c.wait()


@pytest.fixture
def coordinators(
    db_url: str, tmp_path: Path, make_core: MakeCore
) -> Iterator[tuple[list[Coordinator], Core, str]]:
    shared = tmp_path / "shared-data"
    # Migrate and register the installed apps first (see the start-up race in test_store).
    core = make_core(queue_capacity=100_000)
    join_token = create_join_token(
        Settings(database_url=db_url, data_dir=shared), "tests", apps=["echo"]
    )
    env = {
        **os.environ,
        "CSML_DATABASE_URL": db_url,
        "CSML_DATA_DIR": str(shared),
        "CSML_QUEUE_CAPACITY": "100000",
        "CSML_POW_DIFFICULTY": "0",  # raw POST /v1/identities
        "CSML_SUBMISSION_RATE_LIMIT": "0",  # ~100 HTTP submissions per identity in seconds
        "CSML_MAX_ACTIVE_JOBS": "0",  # ~400 bulk-queued jobs per identity
        "CSML_LEASE_SECONDS": "3600",  # no lease may end during the test
        "CSML_REAP_INTERVAL_SECONDS": "0.5",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    with ExitStack() as stack:
        procs: list[Coordinator] = []
        stack.callback(stop_all, procs)
        for name in ("coordinator-a", "coordinator-b"):
            procs.append(Coordinator(name, env, logs))
        for c in procs:
            try:
                wait_healthy(c.url, timeout=60)
            except AssertionError:
                pytest.fail(f"{c.url} did not start:\n{c.log()}")
        yield procs, core, join_token
        for c in procs:
            assert c.proc.poll() is None, f"{c.url} died:\n{c.log()}"


def test_two_coordinator_processes_over_http(
    coordinators: tuple[list[Coordinator], Core, str],
) -> None:
    procs, core, join_token = coordinators
    total_jobs, http_jobs = 2000, 400
    submitters_per_coord, claimers_per_coord, workers_per_coord = 2, 8, 4
    manifest = installed_apps()["echo"].manifest()

    # Workers join, identities are created, on both coordinators.
    workers: list[list[tuple[str, str]]] = []  # per coordinator: (worker id, token)
    identities: list[tuple[str, str]] = []  # (id, token)
    for c in procs:
        with httpx.Client(base_url=c.url, timeout=30) as http:
            joined = []
            for _ in range(workers_per_coord):
                body = WorkerRegistration(app=manifest, slots=4, sandbox="tests")
                r = http.post(
                    "/v1/workers",
                    json=body.model_dump(mode="json"),
                    headers={"Authorization": f"Bearer {join_token}"},
                )
                assert r.status_code == 201, r.text
                joined.append((r.json()["worker_id"], r.json()["worker_token"]))
            workers.append(joined)
            for _ in range(2):
                r = http.post("/v1/identities")
                assert r.status_code == 201, r.text
                identities.append((r.json()["id"], r.json()["token"]))
    tokens = [t for _, t in identities]

    # Most jobs are queued up front (one transaction); the rest arrive over HTTP,
    # through both coordinators, while the claimers drain the queue.
    submitted: set[str] = set(bulk_queue(core, [i for i, _ in identities], total_jobs - http_jobs))
    lock = threading.Lock()
    submitters_left = [len(procs) * submitters_per_coord]
    claims = Claims()
    per_submitter = http_jobs // (len(procs) * submitters_per_coord)

    def submitter(ci: int, k: int) -> Callable[[], None]:
        def run() -> None:
            try:
                with httpx.Client(base_url=procs[ci].url, timeout=30) as http:
                    for i in range(per_submitter):
                        r = http.post(
                            "/v1/jobs",
                            json={"app": "echo", "operation": "echo", "params": {"n": i, "k": k}},
                            headers={"Authorization": f"Bearer {tokens[(ci + i) % len(tokens)]}"},
                        )
                        if r.status_code != 202:
                            claims.error(f"submit {r.status_code}: {r.text[:300]}")
                            return
                        with lock:
                            submitted.add(r.json()["id"])
            except Exception as exc:
                claims.error(f"submit: {exc!r}")
            finally:
                with lock:
                    submitters_left[0] -= 1

        return run

    def claimer(ci: int, k: int) -> Callable[[], None]:
        worker_id, token = workers[ci][k % workers_per_coord]
        rng = random.Random(k)

        def run() -> None:
            try:
                with httpx.Client(base_url=procs[ci].url, timeout=30) as http:
                    while True:
                        with lock:
                            done = submitters_left[0] == 0
                        r = http.post(
                            f"/v1/workers/{worker_id}/claim",
                            json={"max_jobs": rng.randint(1, 4), "wait": 0},
                            headers={"Authorization": f"Bearer {token}"},
                        )
                        if r.status_code != 200:
                            claims.error(f"claim {r.status_code}: {r.text[:300]}")
                            return
                        jobs = r.json()["jobs"]
                        claims.add(worker_id, [(j["id"], j["lease_id"]) for j in jobs])
                        if not jobs:
                            if done:
                                return
                            time.sleep(0.02)
            except Exception as exc:
                claims.error(f"claim: {exc!r}")

        return run

    started = time.monotonic()
    run_all(
        [
            submitter(ci, ci * submitters_per_coord + s)
            for ci in range(len(procs))
            for s in range(submitters_per_coord)
        ]
        + [
            claimer(ci, ci * claimers_per_coord + k)
            for ci in range(len(procs))
            for k in range(claimers_per_coord)
        ],
        timeout=150,
    )
    elapsed = time.monotonic() - started
    assert len(submitted) == total_jobs, claims.errors[:5]
    check_claimed_once(core, submitted, claims)
    # Both coordinators did real work.
    holders = Counter(claims.holders[j][0] for j in submitted)
    for ci in range(len(procs)):
        assert sum(holders[w] for w, _ in workers[ci]) > 0
    # A job claimed through one coordinator completes through the other.
    sample = sorted(submitted)[:20]
    by_worker = {w: (ci, t) for ci, ws in enumerate(workers) for w, t in ws}
    for job_id in sample:
        worker_id, lease_id = claims.holders[job_id]
        ci, token = by_worker[worker_id]
        other = procs[1 - ci]
        r = httpx.post(
            f"{other.url}/v1/workers/{worker_id}/jobs/{job_id}/complete",
            json=JobCompletion(lease_id=lease_id, state="succeeded", result={"ok": 1}).model_dump(),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert r.status_code == 204, r.text
        again = httpx.post(
            f"{procs[ci].url}/v1/workers/{worker_id}/jobs/{job_id}/complete",
            json=JobCompletion(lease_id=lease_id, state="succeeded", result={"ok": 2}).model_dump(),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert again.status_code == 409, again.text
    with core.sessions() as session:
        done_count = session.scalar(
            select(func.count()).select_from(Job).where(Job.state == "succeeded")
        )
    assert done_count == len(sample)
    print(f"\n{total_jobs} jobs submitted and claimed over HTTP in {elapsed:.1f} s")
