"""What the stored-bytes quota costs a submit, by how many jobs the identity keeps.

    /work/venv/bin/python bench/stored_bytes.py [--kept 0,1000,5000] [--n 200] [--postgres]

For each count of kept jobs (finished jobs with an input and an output file and a small
params object each, seeded straight into the store), submits `--n` jobs through the
real `JobQueue.submit` of a store made by csml's own `build_core` (SQLite: WAL,
synchronous=FULL, on the data folder; `--postgres`: a throwaway server from
tests/pg_server.py) and prints, per submit: the SQL statements sent, CPU ms and wall ms
(means), and the CPU µs of the quota's read alone (`jobs_quota.stored_bytes`). The same
submits with `max_stored_bytes=0` (no stored-bytes check) give the floor. Active-jobs
counting is off (`max_active_jobs=0`) so that only the stored-bytes term grows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csml import ids  # noqa: E402
from csml.coordinator.app import build_core  # noqa: E402
from csml.coordinator.config import Settings  # noqa: E402
from csml.coordinator.state import Core  # noqa: E402
from csml.schemas import JobSpec  # noqa: E402
from csml.store import jobs_quota  # noqa: E402
from csml.store.jobs import FILES, JOBS  # noqa: E402
from csml.store.tables import Identity, utcnow  # noqa: E402

SPEC = JobSpec(app="echo", operation="echo", params={"i": 1})


def make_core(url: str | None, base_dir: str | None, max_stored_bytes: int) -> Core:
    data = Path(tempfile.mkdtemp(prefix="csml-stored-", dir=base_dir))
    settings: dict[str, Any] = {
        "data_dir": data,
        "max_active_jobs": 0,
        "max_stored_bytes": max_stored_bytes,
        "submission_rate_limit": 0,
    }
    if url:
        settings["database_url"] = url
    return build_core(Settings(**settings))


def seed(core: Core, kept: int) -> str:
    """An identity with `kept` finished jobs (an input and an output file each)."""
    owner = ids.new_id()
    now = utcnow()
    with core.engine.begin() as conn:
        conn.execute(insert(Identity).values(id=owner, token_hash=ids.new_id(), created_at=now))
        for start in range(0, kept, 500):
            rows = []
            for i in range(start, min(kept, start + 500)):
                rows.append(
                    {
                        "id": ids.new_id(),
                        "owner_id": owner,
                        "app": "echo",
                        "operation": "echo",
                        "params": {"i": i},
                        "limits": {},
                        "state": "succeeded",
                        "fair_rank": i,
                        "created_at": now,
                        "finished_at": now,
                        "attempts": 1,
                        "max_attempts": 1,
                        "progress_fraction": 1.0,
                        "progress_message": "",
                    }
                )
            seqs = [
                conn.execute(insert(JOBS).returning(JOBS.c.seq), row).scalar_one() for row in rows
            ]
            files = [
                {
                    "job_seq": seq,
                    "kind": kind,
                    "name": "f",
                    "size": 1000,
                    "sha256": "0" * 64,
                    "media_type": "application/octet-stream",
                    "blob": f"jobs/{seq}/{kind}/f",
                    "model_id": None,
                }
                for seq in seqs
                for kind in ("input", "output")
            ]
            conn.execute(insert(FILES), files)
    return owner


class Statements:
    def __init__(self, core: Core) -> None:
        self.count = 0
        event.listen(core.engine, "before_cursor_execute", self._on)

    def _on(self, *_: Any) -> None:
        self.count += 1


def per_call(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call, mean of n calls."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return 1000 * (time.process_time() - c0) / n, 1000 * (time.perf_counter() - w0) / n


def measure(url: str | None, base_dir: str | None, kept: int, n: int, limit: int) -> None:
    core = make_core(url, base_dir, limit)
    try:
        owner = seed(core, kept)
        counted = Statements(core)
        for _ in range(20):  # warm the statement caches
            core.queue.submit(owner, SPEC, None, {})
        before = counted.count
        cpu, wall = per_call(lambda: core.queue.submit(owner, SPEC, None, {}), n)
        statements = (counted.count - before) / n
        with core.engine.connect() as conn:
            stored = jobs_quota.stored_bytes(conn, owner)
            read_cpu, _ = per_call(lambda: jobs_quota.stored_bytes(conn, owner), n)
        check = "on " if limit else "off"
        print(
            f"  kept {kept:6d}  stored-bytes check {check}  {statements:5.2f} statements"
            f"  CPU {cpu:6.3f} ms  wall {wall:6.3f} ms   quota read alone"
            f" {1000 * read_cpu:7.1f} µs CPU  (stored {stored} bytes)"
        )
    finally:
        core.writer.close()
        core.engine.dispose()


@contextmanager
def postgres() -> Iterator[Callable[[], str]]:
    from tests.pg_server import create_database, running_postgres

    with running_postgres() as server:
        made = [0]

        def fresh() -> str:
            made[0] += 1
            name = f"stored_{made[0]}"
            create_database(server, name)
            return server.url_for(name)

        yield fresh


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kept", default="0,1000,5000", help="kept jobs, comma-separated")
    p.add_argument("--n", type=int, default=200, help="submits measured per row")
    p.add_argument("--postgres", action="store_true", help="on a throwaway PostgreSQL")
    p.add_argument("--base-dir", help="parent folder of the temporary data folders")
    a = p.parse_args()
    kept = [int(k) for k in a.kept.split(",")]
    with postgres() if a.postgres else nullcontext(None) as make_url:
        print(f"submit cost by kept jobs ({'PostgreSQL' if a.postgres else 'SQLite'}):")
        for k in kept:
            for limit in (10 << 30, 0):
                measure(make_url() if make_url else None, a.base_dir, k, a.n, limit)
    with open("/proc/loadavg") as f:
        print(f"load average: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
