"""In-process cost of the coordinator's store operations (no HTTP, no other processes).

    /work/venv/bin/python bench/store_ops.py [--n 300] [--base-dir /dev/shm]

For each operation one job goes through (auth, submit, get, claim, complete), prints
the SQL statements it sends and its median CPU and wall time per call, on a fresh
SQLite store made by csml's own `build_core` (WAL, synchronous=FULL). It shows what
the coordinator pays per job before any HTTP or thread-pool overhead.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

from csml import ids
from csml.coordinator.app import build_core
from csml.coordinator.auth import identity_from
from csml.coordinator.config import Settings
from csml.coordinator.state import Core
from csml.schemas import ClaimedJob, JobCompletion, JobSpec
from csml.store.tables import Identity, JoinToken, Worker, utcnow

SPEC = JobSpec(app="echo", operation="echo", params={"i": 1})


def make_core(base_dir: str | None) -> Core:
    data_dir = Path(tempfile.mkdtemp(prefix="csml-ops-", dir=base_dir))
    # No submission quotas (0: none), as bench/request_cost.py: --n submits per identity.
    return build_core(Settings(data_dir=data_dir, submission_rate_limit=0, max_active_jobs=0))


def seed(core: Core) -> tuple[str, Identity, Worker]:
    """An identity (and its token) and a registered echo worker."""
    token = ids.new_secret("csml")
    now = utcnow()
    identity = Identity(id=ids.new_id(), token_hash=ids.hash_secret(token), created_at=now)
    join = JoinToken(id=ids.new_id(), token_hash=ids.new_id(), label="", created_at=now)
    worker = Worker(
        id=ids.new_id(),
        token_hash=ids.new_id(),
        join_token_id=join.id,
        app="echo",
        slots=1,
        sandbox="",
        registered_at=now,
        last_heartbeat=now,
    )
    with core.sessions() as session, session.begin():
        session.add_all([identity, join])
        session.add(worker)
    return token, identity, worker


class StatementLog:
    """Records the SQL an engine sends (and commits/rollbacks) while enabled."""

    def __init__(self, core: Core) -> None:
        self.lines: list[str] = []
        self.enabled = False
        engine = core.engine
        event.listen(engine, "before_cursor_execute", self._stmt)
        event.listen(engine, "commit", lambda *_: self._add("COMMIT"))
        event.listen(engine, "rollback", lambda *_: self._add("ROLLBACK"))

    def _stmt(self, _conn: Any, _cur: Any, statement: str, *_: Any) -> None:
        self._add(" ".join(statement.split())[:110])

    def _add(self, line: str) -> None:
        if self.enabled:
            self.lines.append(line)

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, list[str]]:
        self.lines, self.enabled = [], True
        try:
            return fn(), self.lines
        finally:
            self.enabled = False


def cost(fn: Callable[[int], Any], n: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call, averaged over n calls."""
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(i)
    return 1000 * (time.process_time() - c0) / n, 1000 * (time.perf_counter() - w0) / n


def run(n: int, base_dir: str | None) -> None:
    core = make_core(base_dir)
    queue = core.queue
    token, identity, worker = seed(core)
    log = StatementLog(core)

    def complete(claimed: ClaimedJob) -> None:
        done = JobCompletion(lease_id=claimed.lease_id, state="succeeded", result={"i": 1})
        queue.complete(worker, claimed.id, done)

    # One job through every step, showing its SQL.
    job, sql = log.capture(lambda: queue.submit(identity.id, SPEC, None, {}))
    steps: list[tuple[str, list[str]]] = [("submit", sql)]
    steps.append(("auth (identity)", log.capture(lambda: identity_from(core, token))[1]))
    steps.append(("get", log.capture(lambda: queue.get(identity.id, job.id))[1]))
    claimed, sql = log.capture(lambda: queue.claim(worker, 1))
    steps.append(("claim", sql))
    steps.append(("claim, nothing queued", log.capture(lambda: queue.claim(worker, 1))[1]))
    steps.append(("complete", log.capture(lambda: complete(claimed[0]))[1]))
    for name, lines in steps:
        print(f"== {name}: {len(lines)} statements")
        for line in lines:
            print(f"     {line}")

    # Costs per call.
    jobs = [queue.submit(identity.id, SPEC, None, {}) for _ in range(5)]
    results: dict[str, tuple[float, float]] = {}
    results["auth (identity)"] = cost(lambda i: identity_from(core, token), n)
    submitted: list[Any] = []
    results["submit"] = cost(
        lambda i: submitted.append(queue.submit(identity.id, SPEC, None, {})), n
    )
    results["get"] = cost(lambda i: queue.get(identity.id, jobs[i % len(jobs)].id), n)
    claims: list[list[ClaimedJob]] = []
    results["claim (1 job)"] = cost(lambda i: claims.append(queue.claim(worker, 1)), n)
    results["complete"] = cost(lambda i: complete(claims[i][0]), n)
    results["claim, nothing queued"] = cost(lambda i: queue.claim(worker, 1), n)
    print(f"\nper call, mean of {n} (data in {core.settings.data_dir}):")
    for name, (cpu, wall) in results.items():
        print(f"  {name:24s} CPU {cpu:7.3f} ms   wall {wall:7.3f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="calls per operation")
    p.add_argument("--base-dir", help="parent folder of the temporary store")
    a = p.parse_args()
    run(a.n, a.base_dir)


if __name__ == "__main__":
    main()
