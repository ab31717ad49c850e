"""Group commit (csml.store.writer.Writer) versus one transaction per write, in process.

    /work/venv/bin/python bench/writer.py                    # SQLite, threads and asyncio
    /work/venv/bin/python bench/writer.py --postgres         # + a private PostgreSQL (fsync on)
    /work/venv/bin/python bench/writer.py --ops 1000 --writers 1,16 --modes threads

N concurrent writers (threads, each calling `Writer.run`, or coroutines on one event
loop, each awaiting `Writer.run_async`) each write ops the size of a job submit: bump
the submitter's `fair_counters` row (UPDATE ... RETURNING) and INSERT a `jobs` row with
it, on a fresh database migrated to csml's schema (SQLite in WAL with synchronous=FULL
made by csml's own `make_engine`, in a temporary folder under `--base-dir`, by default
the system's temporary folder: put it on the disk of the data folder). Each
configuration runs the group-committing `Writer` (`group`: its default lanes, 1 on
SQLite and `PG_LANES` on PostgreSQL, where `group-1` is one lane) and the per-op
transaction it replaced (`PerOpWriter`: the first implementation, `run_async` through
anyio's thread pool) and prints ops/s, commits per op (csml's `StoreCounters`), per-op latency
p50/p99 and the process's CPU per op, with the load average, the fsync cost of the
disk and the CPU other processes took during each run (the machine may be shared).
Every returned value is checked (the counter values each writer got are distinct and
complete) and every row counted afterwards. Results also go to
bench/results/writer-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import anyio.to_thread
from sqlalchemy import Connection, Engine, Table, func, insert, select, update

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
sys.path.insert(0, str(ROOT))

from csml import ids  # noqa: E402
from csml.store.db import WRITE_OPTION, counters, make_engine, migrate, sqlite_url  # noqa: E402
from csml.store.tables import FairCounter, Identity, Job, utcnow  # noqa: E402
from csml.store.writer import Writer  # noqa: E402

T = TypeVar("T")
JOBS = cast(Table, Job.__table__)
COUNTERS = cast(Table, FairCounter.__table__)
IDENTITIES = cast(Table, Identity.__table__)


class AnyWriter(Protocol):
    def run(self, op: Callable[[Connection], T]) -> T: ...
    async def run_async(self, op: Callable[[Connection], T]) -> T: ...
    def close(self) -> None: ...


class PerOpWriter:
    """The Writer before group commit: one connection, transaction and commit per op."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, op: Callable[[Connection], T]) -> T:
        conn = self.engine.connect().execution_options(**{WRITE_OPTION: True})
        with conn, conn.begin():
            return op(conn)

    async def run_async(self, op: Callable[[Connection], T]) -> T:
        return await anyio.to_thread.run_sync(self.run, op)

    def close(self) -> None:
        pass


IMPLS: dict[str, Callable[[Engine], AnyWriter]] = {
    "per-op": PerOpWriter,
    "group": Writer,  # its default lanes: 1 on SQLite, PG_LANES on PostgreSQL
    "group-1": lambda engine: Writer(engine, lanes=1),
}


# -- the op ------------------------------------------------------------------------


def submit_op(owner: str, n: int) -> Callable[[Connection], int]:
    """A job submit's writes: the owner's fair rank + 1, and the job row with it."""

    def op(conn: Connection) -> int:
        rank = conn.execute(
            update(COUNTERS)
            .where(COUNTERS.c.app == "echo", COUNTERS.c.owner_id == owner)
            .values(last_rank=COUNTERS.c.last_rank + 1)
            .returning(COUNTERS.c.last_rank)
        ).scalar_one()
        conn.execute(
            insert(JOBS).values(
                id=ids.new_id(),
                owner_id=owner,
                app="echo",
                operation="echo",
                params={"i": n, "text": "hello"},
                limits={"timeout_seconds": 60},
                state="queued",
                fair_rank=rank,
                created_at=utcnow(),
                attempts=0,
                max_attempts=3,
            )
        )
        return int(rank)

    return op


def seed(engine: Engine, writers: int) -> list[str]:
    """One identity (and fair counter row) per writer, as each SDK client has its own."""
    owners = [ids.new_id() for _ in range(writers)]
    now = utcnow()
    with engine.begin() as conn:
        for owner in owners:
            conn.execute(
                insert(IDENTITIES).values(id=owner, token_hash=ids.new_id(), created_at=now)
            )
            conn.execute(insert(COUNTERS).values(app="echo", owner_id=owner, last_rank=0))
    return owners


# -- machine -------------------------------------------------------------------------


def fsync_ms(folder: str, rounds: int = 50) -> float:
    """Median cost of write+fsync of 4 KiB where the store lives: the floor of one commit."""
    times = []
    with tempfile.NamedTemporaryFile(dir=folder) as f:
        for _ in range(rounds):
            start = time.perf_counter()
            os.write(f.fileno(), b"x" * 4096)
            os.fsync(f.fileno())
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def busy_cpu_s() -> float:
    """CPU seconds every process on the machine has used (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_window() -> Iterator[dict[str, float]]:
    """CPU of this process and of everything else on the machine during the block."""
    out: dict[str, float] = {}
    own0, all0, wall0 = time.process_time(), busy_cpu_s(), time.perf_counter()
    yield out
    own, total = time.process_time() - own0, busy_cpu_s() - all0
    out["wall_s"] = time.perf_counter() - wall0
    out["own_cpu_s"] = own
    out["everything_else_cpu_s"] = max(0.0, total - own)


# -- one configuration ----------------------------------------------------------------


def run_threads(writer: AnyWriter, owners: list[str], per: int) -> list[list[tuple[int, float]]]:
    results: list[list[tuple[int, float]]] = [[] for _ in owners]
    start = threading.Barrier(len(owners))

    def client(k: int) -> None:
        start.wait()
        mine = results[k]
        for n in range(per):
            t0 = time.perf_counter()
            rank = writer.run(submit_op(owners[k], n))
            mine.append((rank, time.perf_counter() - t0))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(owners))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_coroutines(writer: AnyWriter, owners: list[str], per: int) -> list[list[tuple[int, float]]]:
    async def client(owner: str) -> list[tuple[int, float]]:
        mine = []
        for n in range(per):
            t0 = time.perf_counter()
            rank = await writer.run_async(submit_op(owner, n))
            mine.append((rank, time.perf_counter() - t0))
        return mine

    async def main() -> list[list[tuple[int, float]]]:
        return list(await asyncio.gather(*(client(o) for o in owners)))

    return asyncio.run(main())


def measure(engine: Engine, impl: str, mode: str, writers: int, ops: int) -> dict[str, Any]:
    owners = seed(engine, writers)
    per = max(1, ops // writers)
    with engine.connect() as conn:
        jobs_before = conn.scalar(select(func.count()).select_from(JOBS)) or 0
    writer = IMPLS[impl](engine)
    tally = counters(engine)
    commits0, statements0 = tally.write_commits, tally.statements
    try:
        with cpu_window() as cpu:
            run = run_threads if mode == "threads" else run_coroutines
            results = run(writer, owners, per)
    finally:
        writer.close()
    done = writers * per
    commits = tally.write_commits - commits0
    statements = tally.statements - statements0
    for got in results:  # each writer's ranks: 1..per, each once, in order
        assert [rank for rank, _ in got] == list(range(1, per + 1)), "wrong result"
    with engine.connect() as conn:
        stored = (conn.scalar(select(func.count()).select_from(JOBS)) or 0) - jobs_before
    assert stored == done, f"{stored} rows stored for {done} acknowledged ops"
    latencies = sorted(lat for got in results for _, lat in got)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return {
        "impl": impl,
        "mode": mode,
        "writers": writers,
        "ops": done,
        "ops_per_s": round(done / cpu["wall_s"], 1),
        "commits_per_op": round(commits / done, 4),
        "statements_per_op": round(statements / done, 2),
        "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "latency_p99_ms": round(1000 * p99, 2),
        "cpu_ms_per_op": round(1000 * cpu["own_cpu_s"] / done, 3),
        "wall_s": round(cpu["wall_s"], 3),
        "everything_else_cpu_s": round(cpu["everything_else_cpu_s"], 2),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def bench_backend(
    name: str, engine: Engine, modes: list[str], writer_counts: list[int], ops: int
) -> list[dict[str, Any]]:
    rows = []
    print(f"\n== {name} ({engine.dialect.name})")
    print(
        f"  {'impl':7s} {'mode':8s} {'N':>4s} {'ops/s':>8s} {'commits/op':>10s} "
        f"{'stmts/op':>8s} {'p50 ms':>7s} {'p99 ms':>7s} {'CPU ms/op':>9s} {'others CPU s':>12s}"
    )
    for mode in modes:
        for n in writer_counts:
            impls = ["per-op", "group"] + (["group-1"] if engine.dialect.name != "sqlite" else [])
            for impl in impls:
                row = measure(engine, impl, mode, n, ops)
                row["backend"] = name
                rows.append(row)
                print(
                    f"  {impl:7s} {mode:8s} {n:4d} {row['ops_per_s']:8.1f} "
                    f"{row['commits_per_op']:10.4f} {row['statements_per_op']:8.2f} "
                    f"{row['latency_p50_ms']:7.2f} {row['latency_p99_ms']:7.2f} "
                    f"{row['cpu_ms_per_op']:9.3f} {row['everything_else_cpu_s']:12.2f}",
                    flush=True,
                )
            per_op, group = rows[-len(impls)], rows[-len(impls) + 1]
            ratio = group["ops_per_s"] / per_op["ops_per_s"]
            print(f"  {'':21s} group / per-op: {ratio:.2f}x ops/s")
    return rows


def sqlite_engine(base_dir: str | None) -> tuple[Engine, str]:
    folder = tempfile.mkdtemp(prefix="csml-writer-", dir=base_dir)
    engine = make_engine(sqlite_url(Path(folder)))
    migrate(engine)
    return engine, folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ops", type=int, default=2000, help="ops per configuration (split over N)")
    p.add_argument("--writers", default="1,8,64", help="concurrent writers, comma-separated")
    p.add_argument("--modes", default="threads,asyncio", help="threads, asyncio or both")
    p.add_argument("--base-dir", help="parent folder of the SQLite store (same disk as data)")
    p.add_argument("--postgres", action="store_true", help="also on a private PostgreSQL, fsync on")
    p.add_argument("--pg-url", help="also on this PostgreSQL database (tables are created)")
    p.add_argument(
        "--switch-interval",
        type=float,
        help="sys.setswitchinterval (s; Python's default 0.005): how long a busy thread "
        "keeps the GIL from the writer thread, which gives it up at every statement",
    )
    a = p.parse_args(argv)
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    writer_counts = [int(x) for x in a.writers.split(",")]
    modes = [m.strip() for m in a.modes.split(",")]

    engine, folder = sqlite_engine(a.base_dir)
    machine = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "fsync_ms_median": round(fsync_ms(folder), 3),
        "sqlite_folder": folder,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "switch_interval_s": sys.getswitchinterval(),
    }
    print(
        f"machine: {machine['cores']} cores, Python {machine['python']}, "
        f"load {machine['load_avg_at_start']}, fsync {machine['fsync_ms_median']} ms "
        f"(4 KiB, in {folder}), GIL switch interval {sys.getswitchinterval() * 1000:g} ms"
    )
    rows = bench_backend("sqlite", engine, modes, writer_counts, a.ops)
    engine.dispose()

    pg_urls: list[tuple[str, str]] = [("postgresql", a.pg_url)] if a.pg_url else []
    with contextmanager_postgres(a.postgres) as url:
        if url is not None:
            pg_urls.append(("postgresql (private, fsync on)", url))
        for name, pg_url in pg_urls:
            pg = make_engine(pg_url)
            migrate(pg)
            rows += bench_backend(name, pg, modes, writer_counts, a.ops)
            pg.dispose()

    machine["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload at end {machine['load_avg_at_end']}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"writer-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"machine": machine, "runs": rows}, indent=2))
    print(f"results: {path}")
    return 0


@contextmanager
def contextmanager_postgres(wanted: bool) -> Iterator[str | None]:
    """A throwaway server from tests/pg_server.py, but durable (fsync and synchronous
    commit on, unlike the tests' server), so a commit costs what it costs in production."""
    if not wanted:
        yield None
        return
    from tests import pg_server

    pg_server.SERVER_SETTINGS.update(fsync="on", synchronous_commit="on", full_page_writes="on")
    with pg_server.running_postgres() as server:
        yield server.url


if __name__ == "__main__":
    sys.exit(main())
