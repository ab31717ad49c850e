"""In-process cost of the coordinator's store operations (no HTTP, no other processes).

    /work/venv/bin/python bench/store_ops.py [--n 300] [--base-dir /dev/shm] [--statements]
        [--postgres]

For each operation one job goes through (auth, submit, get, claim, complete), prints
the SQL statements it sends and its median CPU and wall time per call, on a fresh
SQLite store made by csml's own `build_core` (WAL, synchronous=FULL; `--postgres`: a
throwaway PostgreSQL server's). It shows what the coordinator pays per job before any
HTTP or thread-pool overhead. `--statements` adds the CPU of each hot statement sent by
SQLAlchemy Core and by the store's `Prepared` (`csml.store.prepared`), alternately.
"""

from __future__ import annotations

import argparse
import sys
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


def make_core(base_dir: str | None, database_url: str | None = None) -> Core:
    data_dir = Path(tempfile.mkdtemp(prefix="csml-ops-", dir=base_dir))
    # No submission quotas (0: none), as bench/request_cost.py: --n submits per identity.
    settings = Settings(data_dir=data_dir, submission_rate_limit=0, max_active_jobs=0)
    if database_url is not None:
        settings = settings.model_copy(update={"database_url": database_url})
    return build_core(settings)


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


def run(
    n: int, base_dir: str | None, statements: bool = False, database_url: str | None = None
) -> None:
    core = make_core(base_dir, database_url)
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
    if statements:
        statement_costs(core, identity.id, worker.id, n)


def statement_costs(core: Core, owner_id: str, worker_id: str, n: int) -> None:
    """CPU µs per hot statement, sent by SQLAlchemy Core (`Connection.execute`, rows
    fetched) and by the store's `Prepared` (`csml.store.prepared`), alternately, on one
    connection: the writes in a transaction rolled back after each round (rank, insert,
    claim, served rank, end), the reads (probe, loads, leases) on a `read_each`
    connection. CPU time of this thread only (`time.thread_time`)."""
    try:
        from csml.store.prepared import Prepared
    except ImportError:  # a tree without it
        print("\n(no csml.store.prepared here: per-statement costs skipped)")
        return
    from datetime import timedelta

    from csml.store import jobs as store
    from csml.store import jobs_end, jobs_write
    from csml.store.db import read_each

    engine = core.engine
    job_id = core.queue.submit(owner_id, SPEC, None, {}).id
    sums: dict[tuple[str, str], float] = {}

    def timed(way: str, name: str, prepared: Prepared, params: dict[str, Any], conn: Any) -> Any:
        t0 = time.thread_time()
        if way == "core":
            rows = conn.execute(prepared.stmt, params).all() if name != "serve" else None
            if name == "serve":
                conn.execute(prepared.stmt, params)
        else:
            rows = prepared.rows(conn, params) if name != "serve" else prepared.run(conn, params)
        sums[way, name] = sums.get((way, name), 0.0) + time.thread_time() - t0
        return rows

    for i in range(n):
        for way in ("core", "prepared") if i % 2 else ("prepared", "core"):
            now = utcnow()
            lease = ids.new_id()
            with engine.connect() as conn:
                conn.begin()
                rank = {"b_app": "echo", "b_owner": owner_id}
                [(fair,)] = timed(
                    way, "rank upsert", jobs_write._RANK_UPSERT[engine.dialect.name], rank, conn
                )
                new = {
                    "id": ids.new_id(), "owner_id": owner_id, "app": "echo",
                    "operation": "echo", "params": {"i": i}, "limits": {},
                    "state": "queued", "fair_rank": fair, "created_at": now, "attempts": 0,
                    "max_attempts": 3, "progress_fraction": 0.0, "progress_message": "",
                    "requires_key": None, "warm_key": None, "trusted_only": False,
                    "min_reputation": None, "verify_runs": 0,
                }  # fmt: skip
                timed(way, "insert job", jobs_write._INSERT_JOB, new, conn)
                take = {
                    "b_worker": worker_id, "b_app": "echo", "max_jobs": 1, "b_lease": lease,
                    "b_until": now + timedelta(seconds=60), "b_now": now, "b_met": [],
                }  # fmt: skip
                plain = jobs_write._take_statement("plain", False, False, False)
                [taken] = timed(way, "claim take", plain, take, conn)
                serve = {"b_app": "echo", "b_top": taken[7]}
                timed(way, "serve", jobs_write._SERVE, serve, conn)
                end = {
                    "b_job": taken[1], "b_lease": lease, "b_worker": worker_id,
                    "b_state": "succeeded", "b_now": now, "b_error": None,
                    "b_result": {"i": i}, "b_models": [],
                }  # fmt: skip
                timed(way, "end_held", jobs_end._end_held_statement(True), end, conn)
                conn.rollback()
            with read_each(engine) as conn:
                probe = {"worker_id": worker_id, "app": "echo", "met": []}
                timed(way, "probe", store._probe(False, False, False), probe, conn)
                owned = {"owner_id": owner_id, "ident": job_id}
                timed(way, "load owned", store._OWNED[True], owned, conn)
                timed(way, "leases", store._LEASES, {"ids": [job_id]}, conn)
    print(f"\nper statement, CPU µs of this thread, mean of {n} (Core execute vs Prepared):")
    names = list(dict.fromkeys(name for _way, name in sums))
    total = {"core": 0.0, "prepared": 0.0}
    for name in names:
        core_us, fast_us = (1e6 * sums[way, name] / n for way in ("core", "prepared"))
        total["core"] += core_us
        total["prepared"] += fast_us
        ratio = core_us / fast_us
        print(f"  {name:14s} Core {core_us:7.1f}   Prepared {fast_us:7.1f}   x{ratio:4.2f}")
    print(f"  {'all':14s} Core {total['core']:7.1f}   Prepared {total['prepared']:7.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="calls per operation")
    p.add_argument("--base-dir", help="parent folder of the temporary store")
    p.add_argument(
        "--statements", action="store_true", help="also CPU per hot statement, Core vs Prepared"
    )
    p.add_argument(
        "--postgres",
        action="store_true",
        help="on a throwaway PostgreSQL server (tests/pg_server.py) instead of SQLite",
    )
    a = p.parse_args()
    if not a.postgres:
        run(a.n, a.base_dir, a.statements)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.pg_server import create_database, running_postgres

    with running_postgres() as pg:
        create_database(pg, "csml_ops")
        run(a.n, a.base_dir, a.statements, pg.url_for("csml_ops"))


if __name__ == "__main__":
    main()
