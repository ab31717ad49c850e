"""A real CSML cluster on loopback for benchmarks: coordinator and worker processes.

Everything runs as separate `python -m csml ...` processes, exactly as an operator
would start them; the data directory lives in a temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from csml.client import Client

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- CPU accounting from /proc ---------------------------------------------------


def proc_cpu_seconds(pid: int, *, reaped_children: bool = True) -> float:
    """User+system CPU of a process (all its threads), plus its reaped children's."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17 (1-based).
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux >= 3.5 exposes them per thread)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids.extend(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return kids


def tree_pids(pid: int) -> list[int]:
    """A process and its live descendants (`child_pids`, followed down)."""
    tree, stack = [], [pid]
    while stack:
        p = stack.pop()
        tree.append(p)
        with contextlib.suppress(OSError):  # exited meanwhile: no children to follow
            stack.extend(child_pids(p))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live descendants, plus whatever they reaped."""
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            total += proc_cpu_seconds(p)
            stack.extend(child_pids(p))
        except OSError:
            continue  # exited meanwhile: its CPU shows up in its parent's cutime
    return total


def tree_cpu_by_depth(pid: int) -> list[float]:
    """CPU of a process tree split by depth: [0] the process itself, [1] its children,
    [2] their children, ... What a process reaped is counted one level below it (a
    worker's zygote reaps its job children: their CPU lands at depth 2)."""
    depths: list[float] = []

    def add(depth: int, seconds: float) -> None:
        while len(depths) <= depth:
            depths.append(0.0)
        depths[depth] += seconds

    stack = [(pid, 0)]
    while stack:
        p, depth = stack.pop()
        try:
            own = proc_cpu_seconds(p, reaped_children=False)
            reaped = proc_cpu_seconds(p) - own
            kids = child_pids(p)
        except OSError:
            continue
        add(depth, own)
        add(depth + 1, reaped)
        stack.extend((k, depth + 1) for k in kids)
    return depths


def tree_schedstat(pid: int, *, descendants: bool = True) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) summed over the threads of
    a process and (with `descendants`) of its live descendants, from
    /proc/PID/task/TID/schedstat. The second says how long the machine's load held the
    process back."""
    run = wait = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                fields = (task / "schedstat").read_text().split()
                run += int(fields[0]) / 1e9
                wait += int(fields[1]) / 1e9
            if descendants:
                stack.extend(child_pids(p))
        except OSError:
            continue  # exited meanwhile
    return run, wait


def thread_names(pid: int) -> dict[int, str]:
    """{native thread id: Python thread name} of a process, from `py-spy dump` (Python
    3.11 does not name its OS threads); {} when py-spy is missing or cannot attach."""
    from pyspy import py_spy_path

    exe = py_spy_path()
    if exe is None:
        return {}
    try:
        dump = subprocess.run(
            [exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in dump.splitlines():
        if line.startswith("Thread ") and '"' in line:
            tid, name = line.split()[1], line.split('"')[1]
            with contextlib.suppress(ValueError):
                out[int(tid, 0)] = name
    return out


def task_counters(pid: int, tid: int) -> tuple[float, int, int]:
    """One thread's (CPU seconds from schedstat, voluntary and involuntary context
    switches) so far, from /proc/PID/task/TID."""
    task = Path(f"/proc/{pid}/task/{tid}")
    cpu = int((task / "schedstat").read_text().split()[0]) / 1e9
    fields = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
    return cpu, int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"])


def thread_counters(pids: list[int]) -> dict[tuple[int, int], tuple[str, float, int, int]]:
    """Per thread of these processes: (name, CPU seconds from schedstat, voluntary and
    involuntary context switches) so far (`task_counters`). Names: `thread_names`, with
    anyio's and the default executor's numbered workers folded into one name each; "?" if
    unknown."""
    out = {}
    for pid in pids:
        names = thread_names(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                tid = int(task.name)
                name = names.get(tid, "?").rstrip("0123456789_").rstrip("-") or "?"
                out[(pid, tid)] = (name, *task_counters(pid, tid))
    return out


def thread_deltas(
    before: dict[tuple[int, int], tuple[str, float, int, int]],
    after: dict[tuple[int, int], tuple[str, float, int, int]],
    jobs: int,
) -> dict[str, dict[str, float]]:
    """By thread name over every coordinator: CPU-ms and context switches per job (a
    thread that started meanwhile counts from zero, one that ended is left out)."""
    sums: dict[str, list[float]] = {}
    for key, (name, cpu, vol, invol) in after.items():
        name = before.get(key, (name,))[0] if name == "?" else name
        _, cpu0, vol0, invol0 = before.get(key, (name, 0.0, 0, 0))
        s = sums.setdefault(name, [0.0, 0.0, 0.0, 0.0])
        s[0] += 1
        s[1] += cpu - cpu0
        s[2] += vol - vol0
        s[3] += invol - invol0
    per = max(1, jobs)
    return {
        name: {
            "threads": s[0],
            "cpu_ms": round(1000 * s[1] / per, 3),
            "voluntary": round(s[2] / per, 2),
            "involuntary": round(s[3] / per, 2),
        }
        for name, s in sorted(sums.items(), key=lambda kv: -kv[1][1])
    }


def schedstat_window(pids: dict[str, int]) -> dict[str, tuple[float, float]]:
    """`tree_schedstat` of each named process, and of this one alone (its threads)."""
    out = {name: tree_schedstat(pid) for name, pid in pids.items()}
    out["this process"] = tree_schedstat(os.getpid(), descendants=False)
    return out


def schedstat_ms_per_job(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], jobs: int
) -> dict[str, dict[str, float]]:
    """Per process: CPU and run-queue wait, ms per job, between two `schedstat_window`s."""
    return {
        name: {
            "on_cpu": round(1000 * (run - before[name][0]) / max(1, jobs), 2),
            "runnable_waiting": round(1000 * (wait - before[name][1]) / max(1, jobs), 2),
        }
        for name, (run, wait) in after.items()
        if name in before
    }


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class CpuWindow:
    """CPU seconds used by named processes (and the whole machine) over a window."""

    pids: dict[str, int]
    start: dict[str, float] = field(default_factory=dict)
    depths0: dict[str, list[float]] = field(default_factory=dict)
    busy0: tuple[int, int] = (0, 0)
    t0: float = 0.0
    own0: float = 0.0

    def __enter__(self) -> CpuWindow:
        self.start = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        self.depths0 = {name: tree_cpu_by_depth(pid) for name, pid in self.pids.items()}
        self.busy0 = machine_busy_ticks()
        self.own0 = _own_cpu()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.used = {
            name: tree_cpu_seconds(pid) - self.start[name] for name, pid in self.pids.items()
        }
        self.used["bench client (this process)"] = _own_cpu() - self.own0
        busy1 = machine_busy_ticks()
        self.machine_busy = (busy1[0] - self.busy0[0]) / max(1, busy1[1] - self.busy0[1])
        self.depths: dict[str, list[float]] = {}
        for name, pid in self.pids.items():
            now, before = tree_cpu_by_depth(pid), self.depths0[name]
            before = before + [0.0] * (len(now) - len(before))
            self.depths[name] = [max(0.0, a - b) for a, b in zip(now, before, strict=False)]

    def add(self, name: str, seconds: float) -> None:
        """Count a process measured some other way (e.g. a command's rusage) as ours,
        not as "everything else"."""
        self.used[name] = self.used.get(name, 0.0) + seconds

    def by_depth(self, name: str) -> list[float]:
        """CPU seconds of one named tree over the window, per depth (see tree_cpu_by_depth)."""
        return [round(s, 3) for s in self.depths.get(name, [])]

    def report(self) -> dict[str, object]:
        """CPU seconds and share of one core per process over the window.

        "everything else" is what other processes on the machine (other users,
        the kernel) took meanwhile: the benchmark shares the CPU with them.
        """
        busy = self.machine_busy * self.wall * (os.cpu_count() or 1)
        others = max(0.0, busy - sum(self.used.values()))
        return {
            "wall_s": round(self.wall, 3),
            "machine_busy_pct_all_cores": round(100 * self.machine_busy, 1),
            "everything_else_cpu_s": round(others, 3),
            "processes": {
                name: {
                    "cpu_s": round(sec, 3),
                    "pct_of_one_core": round(100 * sec / self.wall, 1),
                }
                for name, sec in self.used.items()
            },
        }


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- the cluster -----------------------------------------------------------------


class Cluster:
    """Coordinator plus workers, as subprocesses, in a throwaway data directory."""

    def __init__(self, root: Path, settings: dict[str, str] | None = None) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **(settings or {}),
            "CSML_DATA_DIR": str(self.data_dir),
            # A benchmark is one heavy user: per-identity abuse limits would throttle it.
            "CSML_SUBMISSION_RATE_LIMIT": "0",
            "CSML_MAX_ACTIVE_JOBS": "0",
            "CSML_IDENTITY_RATE_LIMIT": "0",
            "CSML_CONFIG": str(root / "user-config.toml"),
        }
        self.log_dir = root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def db_path(self) -> Path:
        return self.data_dir / "csml.db"

    def _log(self, name: str) -> IO[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        return log

    def csml(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "csml", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return out.stdout.strip()

    def start_coordinator(self) -> None:
        self.coordinator = subprocess.Popen(
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
            env=self.env,
            stdout=self._log("coordinator"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_healthy(self.url, self.coordinator)

    def start_workers(
        self,
        app: str,
        count: int,
        slots: int,
        *,
        urls: list[str] | None = None,
        join_token: str | None = None,
        prefetch: int = 0,
    ) -> None:
        """`count` worker processes of `slots` slots, each claiming up to `prefetch`
        jobs beyond its free slots; with `urls`, spread round-robin over those
        coordinators (all on one store) instead of this cluster's own."""
        token = join_token or self.csml("join-token", "create", "--any-app", "--label", "bench")
        targets = urls or [self.url]
        for i in range(count):
            n = len(self.workers)
            self.workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "csml",
                        "worker",
                        "--app",
                        app,
                        "--coordinator",
                        targets[i % len(targets)],
                        "--join-token",
                        token,
                        "--slots",
                        str(slots),
                        "--prefetch",
                        str(prefetch),
                    ],
                    env=self.env,
                    stdout=self._log(f"worker-{app}-{n}"),
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        self.wait_workers(app, count, url=targets[0])

    def wait_workers(
        self, app: str, count: int, timeout: float = 60, url: str | None = None
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            apps = {a["name"]: a for a in httpx.get(f"{url or self.url}/v1/apps").json()}
            if app in apps and apps[app]["workers"] >= count:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{count} {app} workers did not join in {timeout} s:\n{self.logs()}")

    def new_user(self, timeout: float = 120.0) -> Client:
        client = Client(self.url, "", timeout=timeout)
        client.create_identity()
        return client

    def pids(self) -> dict[str, int]:
        named = {} if self.coordinator is None else {"coordinator": self.coordinator.pid}
        for i, w in enumerate(self.workers):
            named[f"worker {i} (+zygote, jobs)"] = w.pid
        return named

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in self.log_dir.glob("*.log"))

    def stop_workers(self) -> None:
        for w in self.workers:
            _terminate(w, signal.SIGTERM)
        for w in self.workers:
            _reap(w)

    def kill_coordinator(self) -> None:
        """SIGKILL: nothing the coordinator held only in memory survives."""
        if self.coordinator is not None:
            _terminate(self.coordinator, signal.SIGKILL)
            _reap(self.coordinator)

    def stop(self) -> None:
        self.stop_workers()
        if self.coordinator is not None:
            _terminate(self.coordinator, signal.SIGTERM)
            _reap(self.coordinator)
        for log in self._logs:
            log.close()
        self._logs.clear()


def _terminate(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)


def _reap(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the coordinator exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"coordinator at {url} did not become healthy in {timeout} s")


# -- request counts from the coordinator's own metrics -----------------------------

_METRIC = "csml_http_request_duration_seconds"


def scrape_requests(url: str) -> dict[str, tuple[float, float]]:
    """{"METHOD route": (count, total seconds)} from the coordinator's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, tuple[float, float]] = {}
    for line in text.splitlines():
        if not line.startswith((f"{_METRIC}_count{{", f"{_METRIC}_sum{{")):
            continue
        name, _, value = line.rpartition(" ")
        labels = dict(
            part.split("=", 1) for part in name[name.index("{") + 1 : -1].split(",") if part
        )
        key = f"{labels['method'].strip(chr(34))} {labels['route'].strip(chr(34))}"
        count, total = out.get(key, (0.0, 0.0))
        if name.startswith(f"{_METRIC}_count"):
            count += float(value)
        else:
            total += float(value)
        out[key] = (count, total)
    return out


_BY_KIND = 'csml_store_statements_by_kind_total{kind="'


def scrape_store(url: str) -> dict[str, float]:
    """The coordinator's store traffic so far: SQL statements, write commits, and
    statements by kind (keys "kind:SELECT jobs", ...)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for name in ("statements", "write_commits"):
        prefix = f"csml_store_{name}_total "
        out[name] = next(
            (float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)),
            float("nan"),
        )
    for line in text.splitlines():
        if line.startswith(_BY_KIND):
            labels, _, value = line.rpartition(" ")
            out["kind:" + labels[len(_BY_KIND) : -2]] = float(value)
    return out


def store_deltas(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, Any]:
    """Per job: SQL statements and write commits (one fsync each on SQLite) the store saw,
    and statements by kind (those of at least 0.01 per job, most first)."""
    n = max(1, jobs)
    kinds = {
        key[5:]: round((after[key] - before.get(key, 0.0)) / n, 2)
        for key in after
        if key.startswith("kind:")
    }
    return {
        "statements_per_job": round((after["statements"] - before["statements"]) / n, 2),
        "write_commits_per_job": round((after["write_commits"] - before["write_commits"]) / n, 2),
        "statements_by_kind_per_job": dict(
            sorted(((k, v) for k, v in kinds.items() if v >= 0.01), key=lambda kv: -kv[1])
        ),
    }


def request_deltas(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], jobs: int
) -> dict[str, dict[str, float]]:
    """Per route: requests per job and mean server-side time (middleware to response)."""
    rows = {}
    for key, (count, total) in after.items():
        c0, t0 = before.get(key, (0.0, 0.0))
        n = count - c0
        if n <= 0 or key.endswith("/metrics"):
            continue
        rows[key] = {
            "per_job": round(n / max(1, jobs), 2),
            "mean_ms": round(1000 * (total - t0) / n, 2),
        }
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["per_job"]))
