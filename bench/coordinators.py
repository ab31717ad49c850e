"""Acceptance (e): PostgreSQL with 1, 2 and 4 coordinators, free and CPU-capped.

    /work/venv/bin/python bench/coordinators.py            # both parts, about 8 minutes
    /work/venv/bin/python bench/coordinators.py --quick    # small counts, smoke test
    /work/venv/bin/python bench/coordinators.py --only capped --quota 0.25

A throwaway PostgreSQL server is started (`tests/pg_server.py`, as the tests do). For
each coordinator count N (a fresh, migrated database each time):

- N coordinator processes (`python -m csml server`, the `fleet` of
  tests/integration/postgres/test_scale.py) on the one database;
- `--workers` real echo worker processes (`python -m csml worker --app echo`, sandboxed
  job children as in production) with `--slots` each, spread round-robin over the
  coordinators; their number stays the same, so only the coordinators vary;
- `--clients` SDK clients (`csml.client.Client`, one identity each), spread round-robin,
  each looping `submit("echo", "echo")` + `wait()` and checking its result, until
  `--jobs` jobs are done or `--seconds` have passed (whichever first; warm-up untimed).

Reported per N: jobs/s; jobs per coordinator CPU-second (user+system CPU of the
coordinator processes from /proc over the window); CPU of every process and of
everything else on the machine; sampled lock waits: every `--sample-ms` (50 ms) one
connection reads `pg_stat_activity` (backends of this database with
`wait_event_type = 'Lock'`) and `pg_locks` (not granted): samples with a wait /
samples, the most waiters seen, which lock events and statements waited.

The capped part runs the same with each coordinator moved into its own cgroup with
the same CPU quota (`--quota`, 0.25 CPU by default): cgroup v2 `cpu.max` when
/sys/fs/cgroup/cgroup.controllers offers `cpu`, else cgroup v1 `cpu.cfs_quota_us` /
`cpu.cfs_period_us` under the `cpu` controller's mount; the cgroups are made under the
bench's own cgroup, the coordinator pid is written to `cgroup.procs` right after it
started, and the cgroups are removed afterwards (their processes moved back first).
If no cpu controller is writable, the reason is printed and the part skipped.
Throttling counts (`cpu.stat`) are reported per coordinator.

Targets (issue 11, (e)): uncapped, lock waits ~ 0 (here: <= 1 % of samples) and jobs per
coordinator CPU-second of 2 and 4 coordinators within 10 % of one's; capped, 2
coordinators >= 1.7x the jobs/s of one (4 reported).

Results: stdout and bench/results/coordinators-<timestamp>.json (or --json-out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.postgres.test_scale import fleet  # noqa: E402
from tests.pg_server import PostgresServer, create_database, running_postgres  # noqa: E402

from cluster import (  # noqa: E402
    CLK_TCK,
    Cluster,
    CpuWindow,
    request_deltas,
    scrape_requests,
    scrape_store,
    store_deltas,
    thread_counters,
    thread_deltas,
    tree_schedstat,
)
from csml.client import Client  # noqa: E402
from csml.coordinator.config import Settings  # noqa: E402
from csml.coordinator.tokens import create_join_token  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
TARGET_LOCK_FRACTION = 0.01
TARGET_EFFICIENCY = 0.90
TARGET_CAPPED_2_OVER_1 = 1.7
CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average {os.getloadavg()}"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- CPU caps through cgroups --------------------------------------------------------


class CpuCaps:
    """Cgroups with one CPU quota each, under this process's own cgroup.

    `version` is "v2", "v1" or None (then `why` says why not)."""

    def __init__(self, cpus: float) -> None:
        self.cpus = cpus
        self.version: str | None = None
        self.why = ""
        self.base = Path()
        self.made: list[Path] = []
        try:
            self._detect()
        except OSError as exc:
            self.version, self.why = None, f"cgroups not usable: {exc}"

    def _detect(self) -> None:
        controllers = CGROUP_ROOT / "cgroup.controllers"
        own = _own_cgroups()
        if controllers.exists() and "cpu" in controllers.read_text().split():
            self.base = CGROUP_ROOT / own.get("", "/").lstrip("/")
            subtree = self.base / "cgroup.subtree_control"
            if "cpu" not in subtree.read_text().split():
                subtree.write_text("+cpu")
            self.version = "v2"
        else:
            mount = _v1_cpu_mount()
            if mount is None:
                self.why = (
                    "no cgroup v2 with the cpu controller and no cgroup v1 `cpu` mount "
                    "(see /proc/mounts)"
                )
                return
            path = next((p for k, p in own.items() if "cpu" in k.split(",")), "/")
            self.base = mount / path.lstrip("/")
            self.version = "v1"
        probe = self.make("probe")
        self.remove(probe)

    def make(self, name: str) -> Path:
        path = self.base / f"csml-bench-{os.getpid()}-{name}"
        path.mkdir()
        self.made.append(path)
        quota = round(self.cpus * PERIOD_US)
        if self.version == "v2":
            (path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(quota))
        return path

    @staticmethod
    def add(path: Path, pid: int) -> None:
        """Move a process (all its threads) into the cgroup."""
        (path / "cgroup.procs").write_text(str(pid))

    def throttling(self, path: Path) -> dict[str, float]:
        stat = dict(
            (line.split()[0], float(line.split()[1]))
            for line in (path / "cpu.stat").read_text().splitlines()
            if len(line.split()) == 2
        )
        if self.version == "v2":
            return {
                "periods": stat.get("nr_periods", 0),
                "throttled_periods": stat.get("nr_throttled", 0),
                "throttled_s": stat.get("throttled_usec", 0) / 1e6,
            }
        return {
            "periods": stat.get("nr_periods", 0),
            "throttled_periods": stat.get("nr_throttled", 0),
            "throttled_s": stat.get("throttled_time", 0) / 1e9,
        }

    def remove(self, path: Path) -> None:
        """Move whatever is left back to the parent, then delete the cgroup."""
        for _ in range(20):
            try:
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):  # it may have exited meanwhile
                        (self.base / "cgroup.procs").write_text(pid)
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        if path in self.made:
            self.made.remove(path)

    def remove_all(self) -> None:
        for path in list(self.made):
            self.remove(path)


def _own_cgroups() -> dict[str, str]:
    """{controllers: path} of this process ("" for the v2 hierarchy)."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        out[controllers] = path
    return out


def _v1_cpu_mount() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "cgroup" and "cpu" in parts[3].split(","):
            return Path(parts[1])
    return None


# -- lock waits, sampled -------------------------------------------------------------

LOCK_SAMPLE = """
SELECT pid, state, wait_event_type, wait_event,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 90),
       extract(epoch FROM now() - xact_start), pg_blocking_pids(pid)
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""
NOT_GRANTED = "SELECT count(*) FROM pg_locks WHERE NOT granted"


@dataclass
class LockSampler:
    """Reads pg_stat_activity and pg_locks every `interval` s on its own connection."""

    conninfo: str
    interval: float = 0.05
    samples: int = 0
    with_waits: int = 0
    waiter_samples: int = 0
    max_waiters: int = 0
    not_granted_samples: int = 0
    events: Counter[str] = field(default_factory=Counter)
    queries: Counter[str] = field(default_factory=Counter)
    blockers: Counter[str] = field(default_factory=Counter)  # the holders' last statements
    roots: Counter[str] = field(default_factory=Counter)  # the chains' first holders
    root_ages: list[float] = field(default_factory=list)  # their transactions' ages, s
    in_transaction: Counter[str] = field(default_factory=Counter)  # open ones: whose turn
    cycles: int = 0  # samples with a chain of waits that has no root: a deadlock
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> LockSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            while not self._stop.is_set():
                t = time.monotonic()
                backends = {r[0]: r for r in conn.execute(LOCK_SAMPLE).fetchall()}
                waiting = [
                    (r[3], r[4], self._holders(backends, r[6]), self._root(backends, r[0]))
                    for r in backends.values()
                    if r[2] == "Lock"
                ]
                not_granted = conn.execute(NOT_GRANTED).fetchone()
                self.samples += 1
                self.in_transaction.update(
                    str(r[1]) for r in backends.values() if r[5] is not None and r[1] != "idle"
                )
                if waiting:
                    self.with_waits += 1
                    self.waiter_samples += len(waiting)
                    self.max_waiters = max(self.max_waiters, len(waiting))
                    self.events.update(str(e) for e, _, _, _ in waiting)
                    self.queries.update(str(q) for _, q, _, _ in waiting)
                    self.blockers.update(b for _, _, b, _ in waiting)
                    self.cycles += any(root is None for _, _, _, root in waiting)
                    for root in {root for _, _, _, root in waiting if root is not None}:
                        row = backends[root]
                        self.roots[f"{row[1]}: {row[4]}"] += 1
                        self.root_ages.append(float(row[5] or 0.0))
                if not_granted and not_granted[0]:
                    self.not_granted_samples += 1
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))

    @staticmethod
    def _holders(backends: dict[int, Any], pids: list[int]) -> str:
        """What the backends holding a waiter up are doing: state and last statement."""
        return " | ".join(
            f"{backends[p][1]}: {backends[p][4]}" if p in backends else "(other database)"
            for p in pids
        )

    @staticmethod
    def _root(backends: dict[int, Any], pid: int) -> int | None:
        """The first backend of `pid`'s chain of lock waits that waits on no lock itself
        (the holder the others queue behind), or None (a cycle: a deadlock)."""
        seen = {pid}
        while True:
            row = backends.get(pid)
            if row is None or row[2] != "Lock" or not row[6]:
                return pid if row is not None else None
            pid = row[6][0]
            if pid in seen:
                return None
            seen.add(pid)

    def report(self) -> dict[str, Any]:
        ages = sorted(self.root_ages)
        return {
            "samples": self.samples,
            "samples_with_lock_waits": self.with_waits,
            "fraction_with_lock_waits": round(self.with_waits / max(1, self.samples), 4),
            "mean_waiting_backends": round(self.waiter_samples / max(1, self.samples), 3),
            "max_waiting_backends": self.max_waiters,
            "samples_with_pg_locks_not_granted": self.not_granted_samples,
            "wait_events": dict(self.events.most_common(5)),
            "waiting_statements": dict(self.queries.most_common(3)),
            "blocking_statements": dict(self.blockers.most_common(3)),
            "root_holders": dict(self.roots.most_common(4)),
            "samples_with_a_deadlock": self.cycles,
            # Backends in an open transaction, by state, over all samples: "idle in
            # transaction" is the client's turn (its Python, the GIL, the CPU), "active"
            # the server's (a statement running or its result on the way).
            "open_transactions_by_state": dict(self.in_transaction.most_common()),
            "root_transaction_age_ms_p50_max": [
                round(1000 * ages[len(ages) // 2], 1) if ages else None,
                round(1000 * ages[-1], 1) if ages else None,
            ],
        }


# -- one run -------------------------------------------------------------------------


@dataclass
class Tally:
    done: int = 0
    ok: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def fresh_database(pg: PostgresServer, root: Path) -> tuple[str, str, str]:
    """A new database, migrated (before coordinators race to do it); URL, name, join token."""
    name = f"csml_coord_{secrets.token_hex(4)}"
    create_database(pg, name)
    url = pg.url_for(name)
    settings = Settings(database_url=url, data_dir=root / "shared-data")
    from csml.coordinator.app import build_core

    build_core(settings).engine.dispose()
    return url, name, create_join_token(settings, "bench", apps=["echo"])


def client_loop(client: Client, tally: Tally, jobs: int, deadline: float, k: int) -> None:
    i = 0
    while time.monotonic() < deadline:
        with tally.lock:
            if tally.done >= jobs:
                return
            tally.done += 1
        job = client.submit("echo", "echo", params={"k": k, "i": i})
        job.wait(timeout=120)
        good = (
            job.state.value == "succeeded"
            and (job.result or {}).get("params", {}).get("i") == i
            and (job.result or {}).get("params", {}).get("k") == k
        )
        with tally.lock:
            tally.ok += good
        i += 1


def run_clients(clients: list[Client], jobs: int, seconds: float) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds
    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [
            pool.submit(client_loop, c, tally, jobs, deadline, k) for k, c in enumerate(clients)
        ]
        for f in futures:
            f.result()
    return tally


@contextmanager
def capped(caps: CpuCaps | None, pids: list[int]) -> Iterator[list[Path]]:
    groups: list[Path] = []
    try:
        if caps is not None:
            for i, pid in enumerate(pids):
                group = caps.make(f"coordinator-{i}")
                groups.append(group)
                caps.add(group, pid)
        yield groups
    finally:
        if caps is not None:
            for g in groups:
                caps.remove(g)


def one_run(
    pg: PostgresServer, root: Path, n: int, args: argparse.Namespace, caps: CpuCaps | None
) -> dict[str, Any]:
    url, dbname, token = fresh_database(pg, root)
    with fleet(url, root, n) as procs, capped(caps, [c.proc.pid for c in procs]) as groups:
        urls = [c.url for c in procs]
        workers = Cluster(root / "workers")
        try:
            workers.start_workers("echo", args.workers, args.slots, urls=urls, join_token=token)
            clients = []
            for k in range(args.clients):
                c = Client(urls[k % n], timeout=120)
                c.create_identity()
                clients.append(c)
            run_clients(clients, 2 * len(clients), 120)  # warm-up, untimed
            pids = {f"coordinator {i}": c.proc.pid for i, c in enumerate(procs)}
            pids["postgres (all backends)"] = pg.process.pid
            pids.update(workers.pids())
            throttle0 = [caps.throttling(g) for g in groups] if caps else []
            load0 = load()
            store0 = [scrape_store(u) for u in urls]
            notify0 = [scrape_notify(u) for u in urls]
            requests0 = [scrape_requests(u) for u in urls]
            switches0 = context_switches([c.proc.pid for c in procs])
            split0 = cpu_split([c.proc.pid for c in procs])
            threads0 = thread_counters([c.proc.pid for c in procs]) if args.threads else {}
            with (
                profiled(args, [c.proc.pid for c in procs], root) as profiles,
                LockSampler(pg.conninfo(dbname), args.sample_ms / 1000) as locks,
                CpuWindow(pids) as cpu,
            ):
                tally = run_clients(clients, args.jobs, args.seconds)
            switches1 = context_switches([c.proc.pid for c in procs])
            split1 = cpu_split([c.proc.pid for c in procs])
            threads1 = thread_counters([c.proc.pid for c in procs]) if args.threads else {}
            store1 = [scrape_store(u) for u in urls]
            notify1 = [scrape_notify(u) for u in urls]
            requests1 = [scrape_requests(u) for u in urls]
            throttle1 = [caps.throttling(g) for g in groups] if caps else []
            for c in clients:
                c.close()
        finally:
            workers.stop()
    coord_cpu = [cpu.used[f"coordinator {i}"] for i in range(n)]
    out: dict[str, Any] = {
        "coordinators": n,
        "jobs": tally.done,
        "ok": tally.ok,
        "wall_s": round(cpu.wall, 3),
        "jobs_per_s": round(tally.done / cpu.wall, 1),
        "coordinator_cpu_s": [round(s, 3) for s in coord_cpu],
        "coordinator_cpu_ms_per_job": round(1000 * sum(coord_cpu) / max(1, tally.done), 2),
        "jobs_per_coordinator_cpu_s": round(tally.done / max(1e-9, sum(coord_cpu)), 1),
        "store": store_deltas(_summed(store0), _summed(store1), tally.done),
        "context_switches_per_job": {
            k: round((switches1[k] - switches0[k]) / max(1, tally.done), 2) for k in switches0
        },
        "coordinator_ms_per_job": {
            k: round(1000 * (split1[k] - split0[k]) / max(1, tally.done), 3) for k in split0
        },
        "notify_per_job": {
            k: round((v - _summed(notify0).get(k, 0.0)) / max(1, tally.done), 2)
            for k, v in sorted(_summed(notify1).items())
        },
        "requests": request_deltas(
            _summed_requests(requests0), _summed_requests(requests1), tally.done
        ),
        "lock_waits": locks.report(),
        "cpu": cpu.report(),
        "load_before": load0,
        "load_after": load(),
    }
    if profiles:
        out["profiles"] = profiles
    if args.threads:
        out["threads_per_job"] = thread_deltas(threads0, threads1, tally.done)
    if caps:
        out["cpu_quota_per_coordinator"] = caps.cpus
        out["throttling"] = [
            {k: round(b[k] - a[k], 3) for k in a} for a, b in zip(throttle0, throttle1, strict=True)
        ]
    lw = out["lock_waits"]
    print(
        f"  {n} coordinator(s){' capped' if caps else ''}: {out['jobs']} jobs "
        f"({out['ok']} ok) in {out['wall_s']} s = {out['jobs_per_s']} jobs/s; "
        f"{out['jobs_per_coordinator_cpu_s']} jobs per coordinator CPU-s; lock waits in "
        f"{lw['samples_with_lock_waits']}/{lw['samples']} samples "
        f"({lw['samples_with_a_deadlock']} in a deadlock); "
        f"{out['store']['statements_per_job']} statements, "
        f"{out['store']['write_commits_per_job']} write commits, "
        f"{sum(r['per_job'] for r in out['requests'].values()):.2f} requests per job; "
        "everything else "
        f"{out['cpu']['everything_else_cpu_s']} CPU-s; load {out['load_before']} -> "
        f"{out['load_after']}",
        flush=True,
    )
    for what in ("waiting_statements", "root_holders"):
        for statement, times in lw[what].items():
            print(f"    {what.split('_')[0]} {times}x: {statement}", flush=True)
    print(f"    open transactions sampled, by state: {lw['open_transactions_by_state']}")
    routes = ", ".join(f"{k} {r['per_job']}" for k, r in out["requests"].items())
    print(f"    notifications per job (all coordinators): {out['notify_per_job']}")
    print(f"    coordinator threads' context switches per job: {out['context_switches_per_job']}")
    print(f"    requests per job: {routes}", flush=True)
    split = out["coordinator_ms_per_job"]
    print(
        f"    coordinators' ms per job: user {split['user']}, system {split['system']}, "
        f"runnable but waiting for a CPU {split['runnable_waiting']}",
        flush=True,
    )
    for name, t in out.get("threads_per_job", {}).items():
        print(f"    thread {name}: {t}", flush=True)
    print(
        f"    root holders' transaction age, ms (p50, max): {lw['root_transaction_age_ms_p50_max']}"
    )
    return out


@contextmanager
def profiled(args: argparse.Namespace, pids: list[int], root: Path) -> Iterator[list[Any]]:
    """With `--profile`, py-spy on every coordinator for the block: their summaries (and
    the raw stacks' paths) land in the list once the block ends."""
    out: list[Any] = []
    if not args.profile:
        yield out
        return
    from pyspy import Recorder, summarise

    folder = args.profile_dir or root
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{len(pids)}-{secrets.token_hex(3)}"
    raws = [folder / f"coordinator-{tag}-{i}.pyspy.txt" for i in range(len(pids))]
    recorders = [
        Recorder(pid, raw, gil_only=args.profile == "gil")
        for pid, raw in zip(pids, raws, strict=True)
    ]
    time.sleep(0.5)  # let py-spy attach
    try:
        yield out
    finally:
        for recorder in recorders:
            recorder.stop()
        for raw in raws:
            if raw.exists():
                out.append({"mode": args.profile, "raw_stacks": str(raw), **summarise(raw)})


def cpu_split(pids: list[int]) -> dict[str, float]:
    """Seconds so far, summed over these processes: CPU in user mode (`user`: Python,
    libpq, parsing) and in the kernel (`system`: syscalls, socket I/O, futex wake-ups),
    from /proc/PID/stat; and time their threads were runnable but waited for a CPU
    (`runnable_waiting`: `cluster.tree_schedstat`'s run delay of their own threads; a
    thread that ended meanwhile is not counted)."""
    out = {"user": 0.0, "system": 0.0, "runnable_waiting": 0.0}
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out["user"] += int(fields[11]) / CLK_TCK
            out["system"] += int(fields[12]) / CLK_TCK
        out["runnable_waiting"] += tree_schedstat(pid, descendants=False)[1]
    return out


def context_switches(pids: list[int]) -> dict[str, int]:
    """Voluntary and involuntary context switches of every thread of these processes so
    far (/proc/PID/task/*/status; a thread that ended meanwhile is not counted)."""
    out = {"voluntary": 0, "involuntary": 0}
    for pid in pids:
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            with contextlib.suppress(OSError):
                for line in status.read_text().splitlines():
                    name, _, value = line.partition(":")
                    if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                        key = "voluntary" if name.startswith("vol") else "involuntary"
                        out[key] += int(value)
    return out


def scrape_notify(url: str) -> dict[str, float]:
    """A coordinator's wake-up counters (`csml_notify_*`, `csml_relay_*` in /metrics)."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(("csml_notify_", "csml_relay_")) and name.endswith("_total"):
            out[name[len("csml_") : -len("_total")]] = float(value)
    return out


def _summed(scrapes: list[dict[str, float]]) -> dict[str, float]:
    """Every coordinator's store counters added up (a statement kind one coordinator never
    sent counts 0 there)."""
    keys = {k for s in scrapes for k in s}
    return {k: sum(s.get(k, 0.0) for s in scrapes) for k in keys}


def _summed_requests(
    scrapes: list[dict[str, tuple[float, float]]],
) -> dict[str, tuple[float, float]]:
    """Every coordinator's requests by route added up: (count, total seconds)."""
    out: dict[str, tuple[float, float]] = {}
    for scrape in scrapes:
        for key, (count, total) in scrape.items():
            c, t = out.get(key, (0.0, 0.0))
            out[key] = (c + count, t + total)
    return out


def series(
    pg: PostgresServer, root: Path, args: argparse.Namespace, caps: CpuCaps | None, tag: str
) -> dict[str, Any]:
    runs = {str(n): one_run(pg, root / f"{tag}-{n}", n, args, caps) for n in args.counts}
    one = runs.get("1")
    if one:
        for r in runs.values():
            r["jobs_per_s_over_one"] = round(r["jobs_per_s"] / one["jobs_per_s"], 3)
            r["efficiency_over_one"] = round(
                r["jobs_per_coordinator_cpu_s"] / one["jobs_per_coordinator_cpu_s"], 3
            )
    return runs


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    free = report.get("uncapped", {})
    for n, r in free.items():
        frac = r["lock_waits"]["fraction_with_lock_waits"]
        rows.append(_row(f"(e) {n} coord: samples with lock waits", "<= 0.01", frac, frac <= 0.01))
        if n != "1" and "efficiency_over_one" in r:
            eff = r["efficiency_over_one"]
            rows.append(
                _row(
                    f"(e) {n} coord: jobs/coord-CPU-s vs one",
                    f">= {TARGET_EFFICIENCY}",
                    eff,
                    eff >= TARGET_EFFICIENCY,
                )
            )
        rows.append(_row(f"(e) {n} coord: jobs/s", "-", r["jobs_per_s"], None))
    cap = report.get("capped", {})
    if isinstance(cap, dict) and "1" in cap:
        for n, r in cap.items():
            if n == "1":
                rows.append(_row("(e) capped 1 coord: jobs/s", "-", r["jobs_per_s"], None))
                continue
            target = TARGET_CAPPED_2_OVER_1 if n == "2" else None
            ratio = r["jobs_per_s_over_one"]
            rows.append(
                _row(
                    f"(e) capped {n} coord / 1, jobs/s",
                    f">= {target}" if target else "-",
                    ratio,
                    ratio >= target if target else None,
                )
            )
    return rows


def _row(metric: str, target: str, reached: Any, ok: bool | None) -> dict[str, Any]:
    status = "-" if ok is None else ("PASS" if ok else "MISS")
    return {"metric": metric, "target": target, "reached": reached, "status": status}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    p.add_argument("--jobs", type=int, help="most jobs per run [4000; quick 150]")
    p.add_argument("--seconds", type=float, help="most seconds per run [40; quick 10]")
    p.add_argument("--counts", default="1,2,4", help="coordinator counts")
    p.add_argument("--clients", type=int, default=16, help="SDK client threads")
    p.add_argument("--workers", type=int, default=4, help="echo worker processes")
    p.add_argument("--slots", type=int, default=4, help="slots per worker")
    p.add_argument("--quota", type=float, default=0.25, help="CPUs per coordinator when capped")
    p.add_argument("--sample-ms", type=float, default=50, help="lock sampling interval")
    p.add_argument("--only", default="uncapped,capped", help="uncapped, capped or both")
    p.add_argument("--json-out", type=Path, help="write the JSON here")
    p.add_argument(
        "--profile",
        choices=("gil", "active"),
        help="py-spy on every coordinator during each measured window (perturbs figures)",
    )
    p.add_argument(
        "--threads",
        action="store_true",
        help="CPU and context switches per job by coordinator thread (names via py-spy dump)",
    )
    p.add_argument(
        "--profile-dir", type=Path, help="keep the raw py-spy stacks here [a temporary folder]"
    )
    a = p.parse_args(argv)
    a.jobs = a.jobs or (150 if a.quick else 4000)
    a.seconds = a.seconds or (10 if a.quick else 40)
    a.counts = [int(x) for x in a.counts.split(",")]
    parts = {s.strip() for s in a.only.split(",")}
    # One machine: the per-address identity limit would throttle the bench's clients.
    os.environ["CSML_IDENTITY_RATE_LIMIT"] = "0"
    report: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "uptime_at_start": uptime(),
            "shared": "yes: other engineers' tests and a CI run share these cores",
        },
        "config": {k: v for k, v in vars(a).items() if k != "json_out"},
    }
    caps: CpuCaps | None = None
    with tempfile.TemporaryDirectory(prefix="csml-coord-") as tmp, running_postgres() as pg:
        report["postgresql"] = pg.version
        root = Path(tmp)
        try:
            if "uncapped" in parts:
                print("uncapped:", flush=True)
                report["uncapped"] = series(pg, root, a, None, "free")
            if "capped" in parts:
                caps = CpuCaps(a.quota)
                if caps.version is None:
                    print(f"capped: skipped: {caps.why}", flush=True)
                    report["capped"] = {"skipped": caps.why}
                else:
                    print(f"capped ({a.quota} CPU each, cgroup {caps.version}):", flush=True)
                    report["capped"] = series(pg, root, a, caps, "capped")
                    report["cgroup"] = {"version": caps.version, "parent": str(caps.base)}
        finally:
            if caps is not None:
                caps.remove_all()
    report["summary"] = verdicts(report)
    report["machine"]["uptime_at_end"] = uptime()
    print(f"\n{report['machine']['uptime_at_start']}  (shared machine)")
    for r in report["summary"]:
        print(f"  {r['metric']:<44} {r['target']:>8} {r['reached']!s:>10}  {r['status']}")
    print(report["machine"]["uptime_at_end"])
    out = a.json_out or BENCH_DIR / "results" / f"coordinators-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"written {out}")
    return 0 if all(r["status"] != "MISS" for r in report["summary"]) else 1


if __name__ == "__main__":
    sys.exit(main())
