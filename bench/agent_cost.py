"""What a worker agent costs per no-op job, and whether its slots wait for claims.

Starts the echo cluster of `core.py` (a coordinator and one echo worker of `--slots`
slots claiming up to `--prefetch` jobs beyond them: (a)'s 2 + 8), real processes on
loopback, a fresh one per round, and measures the worker agent's own process (not its
zygote nor job children, which are reported apart):

- `drain` (default): the agent is stopped (SIGSTOP) once it has joined, `--jobs` echo
  jobs of `--owners` identities are queued (`submit_many`, round-robin), then it is
  continued and drains them while the coordinator always has jobs queued. Its slots
  should never idle then: `slot_idle_ms_per_job` is `slots x span - busy` per job, with
  span from the continue to the last job's `finished_at` and busy the slot-seconds the
  agent counted (`AgentStats.busy_s`, from its "left the cluster" log line; it ran no
  other job). `queued_idle_ms_per_job`: free slots while a claimed job waited locally.
- `flow`: as (a), `--owners` client threads each loop submit + wait (after a warm-up of
  2 jobs each); the agent's counters then include the warm-up.

Per job: the agent's CPU (user, system), its context switches (every thread, from
/proc: the thread hand-offs), the zygote's and job children's CPU, the coordinator's,
requests by route (coordinator `/metrics`), and the agent's claims. From the agent's
counters (an agent older than session 12 logs none of these: 0): `wakes_per_job`, slot
threads woken for a turn (thread hand-offs); `starved_ms_per_job`, slot-time with
nothing queued here while a claim answered at once was in flight; `quick_claim_ms`,
the mean round trip of those claims. Where a job's time from its claim's answer to
its completion's receipt goes, means: `queued_here_ms` (waiting here for a slot
thread: the prefetch), `slot_ms` (a slot thread holding it: the child's turn and the
hand-offs around it), `ride_wait_ms` (its completion waiting for the claim it rides to
be sent) and `ride_flight_ms` (that claim's round trip); `alone_ms`, a completion sent
alone from handed to answered, and `handed_to_receipt_ms` over every completion (riding
or alone: a wait moved from a claim to a lone request shows there). CPU and counts are robust to
the machine's load; wall is not. Medians over `--rounds`; `uptime` before and after.

    /work/venv/bin/python bench/agent_cost.py [--mode drain|flow] [--jobs 2000] [--rounds 3]
    /work/venv/bin/python bench/agent_cost.py --profile gil   # py-spy the agent, last round

With `--profile gil|active`, py-spy samples the agent during the last round; the raw
stacks stay in the temporary folder, whose path is printed (summarise them with
`bench/pyspy.py`'s `summarise`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cluster import (
    Cluster,
    request_deltas,
    scrape_requests,
    tree_cpu_by_depth,
    tree_cpu_seconds,
)
from csml.client import Client, Job

CLK_TCK = os.sysconf("SC_CLK_TCK")


def agent_usage(pid: int) -> tuple[float, float, int]:
    """(user s, system s, context switches of all its threads) of the agent alone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
        except OSError:
            continue  # a thread ended meanwhile
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, switches


def left_stats(cluster: Cluster) -> dict[str, Any]:
    """The agent's counters from its "left the cluster" log line (JSON)."""
    for path in cluster.log_dir.glob("worker-echo-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"left the cluster"' in line:
                return dict(json.loads(line))
    raise RuntimeError("the worker did not log its counters:\n" + cluster.logs())


def _check(job: Job | Any, index: int) -> tuple[bool, float]:
    """(Succeeded with its own result, its finished_at as a Unix time.)"""
    if not isinstance(job, Job):
        return False, 0.0
    job.wait(timeout=300)
    result = job.result or {}
    ok = job.state.value == "succeeded" and result.get("params", {}).get("i") == index
    finished = job.data.finished_at
    return ok, finished.timestamp() if finished is not None else 0.0


def _submit_all(clients: list[Client], n: int, chunk: int) -> list[tuple[int, Any]]:
    """`n` echo jobs, round-robin over the clients, `chunk` per submit_many."""
    per: list[list[int]] = [[] for _ in clients]
    for i in range(n):
        per[i % len(clients)].append(i)

    def submit(k: int) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        idx = per[k]
        for s in range(0, len(idx), chunk):
            part = idx[s : s + chunk]
            items = [{"params": {"i": i, "tag": "bench"}} for i in part]
            out.extend(zip(part, clients[k].submit_many("echo", "echo", items), strict=True))
        return out

    with ThreadPoolExecutor(len(clients)) as pool:
        return [x for xs in pool.map(submit, range(len(clients))) for x in xs]


def _flow(clients: list[Client], n: int) -> list[tuple[bool, float]]:
    lock = threading.Lock()
    counter = iter(range(n))

    def loop(client: Client) -> list[tuple[bool, float]]:
        out: list[tuple[bool, float]] = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return out
            out.append(_check(client.submit("echo", "echo", params={"i": i, "tag": "bench"}), i))

    with ThreadPoolExecutor(len(clients)) as pool:
        return [x for xs in pool.map(loop, clients) for x in xs]


SYSCALL_EVENTS = "raw_syscalls:sys_enter,syscalls:sys_enter_futex"


def _perf_counts(path: Path) -> dict[str, float]:
    """`perf stat -x,`'s counts by event name."""
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            out[parts[2]] = float(parts[0])
    return out


def _print_strace(path: Path, jobs: int) -> None:
    """`strace -c`'s table as calls per job (most first), and the total."""
    rows: list[tuple[float, str]] = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            rows.append((int(parts[3]) / jobs, parts[-1]))
    for per_job, name in sorted(rows, reverse=True):
        if per_job >= 0.01:
            print(f"    {name:24} {per_job:8.2f}")
    print(f"    {'total':24} {sum(r[0] for r in rows):8.2f}")


def one_round(a: argparse.Namespace, root: Path, profile: bool) -> dict[str, float]:
    with Cluster(root, {"CSML_QUEUE_CAPACITY": str(max(1000, a.jobs))}) as cluster:
        cluster.start_coordinator()
        cluster.start_workers("echo", 1, a.slots, prefetch=a.prefetch)
        assert cluster.coordinator is not None
        coord, agent = cluster.coordinator.pid, cluster.workers[0].pid
        clients = [cluster.new_user() for _ in range(a.owners)]
        if a.mode == "drain":
            os.kill(agent, signal.SIGSTOP)
            try:
                submitted = _submit_all(clients, a.jobs, a.chunk)
            except BaseException:
                os.kill(agent, signal.SIGCONT)
                raise
        else:
            _flow(clients, 2 * a.owners)  # warm-up: connections, children
        counter = None
        if a.syscalls:
            # perf's tracepoints count every call of every agent thread at little cost
            # (strace slows the agent down enough to change what it does).
            counted = root / "agent.perf.csv"
            counter = subprocess.Popen(
                ["perf", "stat", "-x,", "-o", str(counted), "-e", SYSCALL_EVENTS, "-p", str(agent)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
        tracer = None
        if a.strace and profile:
            # Counts system calls of every agent thread (not the zygote's nor children's:
            # no -f, attached to each thread of the agent) until the drain ends.
            traced = root / "agent.strace.txt"
            threads = [f"-p{t.name}" for t in Path(f"/proc/{agent}/task").iterdir()]
            tracer = subprocess.Popen(
                ["strace", "-c", "-o", str(traced), *threads],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
        recorder = None
        if profile and a.profile:
            from pyspy import Recorder

            raw = root / "agent.pyspy.txt"
            recorder = Recorder(agent, raw, gil_only=a.profile == "gil")
            time.sleep(0.5)
        req0 = scrape_requests(cluster.url)
        use0, depth0 = agent_usage(agent), tree_cpu_by_depth(agent)
        coord0 = tree_cpu_seconds(coord)
        t0, wall0 = time.perf_counter(), time.time()
        if a.mode == "drain":
            os.kill(agent, signal.SIGCONT)
            with ThreadPoolExecutor(a.owners) as pool:
                checks = list(pool.map(lambda ij: _check(ij[1], ij[0]), submitted))
        else:
            checks = _flow(clients, a.jobs)
        wall = time.perf_counter() - t0
        use1, depth1 = agent_usage(agent), tree_cpu_by_depth(agent)
        coord1 = tree_cpu_seconds(coord)
        if recorder is not None:
            recorder.stop()
            print(f"  raw profile: {raw}")
        calls: dict[str, float] = {}
        if counter is not None:
            counter.send_signal(signal.SIGINT)
            counter.wait(timeout=60)
            calls = _perf_counts(counted)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=60)
            print(f"  system calls of the agent's threads ({traced}), per job:")
            _print_strace(traced, a.jobs)
        requests = request_deltas(req0, scrape_requests(cluster.url), a.jobs)
        for c in clients:
            c.close()
        cluster.stop_workers()
        stats = left_stats(cluster)
    n = a.jobs
    ok = sum(ok for ok, _ in checks)
    if ok != n:
        raise RuntimeError(f"{n - ok} of {n} jobs did not succeed with their own result")
    depth0 += [0.0] * (len(depth1) - len(depth0))
    span = max(f for _, f in checks) - wall0
    row: dict[str, float] = {
        "jobs_per_s": n / wall,
        "agent_cpu_ms_per_job": 1000 * (use1[0] - use0[0] + use1[1] - use0[1]) / n,
        "agent_user_ms_per_job": 1000 * (use1[0] - use0[0]) / n,
        "agent_system_ms_per_job": 1000 * (use1[1] - use0[1]) / n,
        "agent_switches_per_job": (use1[2] - use0[2]) / n,
        "zygote_cpu_ms_per_job": 1000 * (depth1[1] - depth0[1]) / n if len(depth1) > 1 else 0.0,
        "children_cpu_ms_per_job": 1000 * sum(depth1[2:]) / n - 1000 * sum(depth0[2:]) / n,
        "coordinator_cpu_ms_per_job": 1000 * (coord1 - coord0) / n,
        "claims_per_job": stats["claims"] / max(1, stats["jobs"]),
        "empty_claims_per_job": stats["empty_claims"] / max(1, stats["jobs"]),
        "alone_requests_per_job": stats["alone_batches"] / max(1, stats["jobs"]),
        "wakes_per_job": stats.get("wakes", 0) / max(1, stats["jobs"]),
        "idle_wakes_per_job": stats.get("idle_wakes", 0) / max(1, stats["jobs"]),
        "starved_ms_per_job": 1000 * stats.get("starved_s", 0) / max(1, stats["jobs"]),
        "quick_claim_ms": 1000
        * stats.get("quick_claim_s", 0)
        / max(1, stats.get("quick_claims", 0)),
        "queued_idle_ms_per_job": 1000 * stats["queued_idle_s"] / max(1, stats["jobs"]),
        # Where a job's time from its claim to its completion's receipt goes (means):
        "queued_here_ms": 1000 * stats.get("queued_s", 0) / max(1, stats["jobs"]),
        "slot_ms": 1000 * stats["busy_s"] / max(1, stats["jobs"]),
        "ride_wait_ms": 1000 * stats.get("ride_wait_s", 0) / max(1, stats["riding"]),
        "ride_flight_ms": 1000 * stats.get("ride_flight_s", 0) / max(1, stats["riding"]),
        "alone_ms": 1000 * stats.get("alone_s", 0) / max(1, stats["alone"]),
        # Every completion, riding or alone: handed until its receipt.
        "handed_to_receipt_ms": 1000
        * (stats.get("ride_wait_s", 0) + stats.get("ride_flight_s", 0) + stats.get("alone_s", 0))
        / max(1, stats["riding"] + stats["alone"]),
        "requests_per_job": sum(r["per_job"] for r in requests.values()),
    }
    if calls:
        row["syscalls_per_job"] = calls.get("raw_syscalls:sys_enter", 0.0) / n
        row["futex_calls_per_job"] = calls.get("syscalls:sys_enter_futex", 0.0) / n
    if a.mode == "drain":
        row["span_s"] = span
        row["slot_idle_ms_per_job"] = 1000 * (a.slots * span - stats["busy_s"]) / n
        row["slot_idle_pct"] = 100 * (1 - stats["busy_s"] / (a.slots * span))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("drain", "flow"), default="drain")
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--owners", type=int, default=32, help="identities (client threads in flow)")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=8)
    p.add_argument("--chunk", type=int, default=25, help="jobs per submit_many (drain)")
    p.add_argument("--profile", choices=("gil", "active"))
    p.add_argument(
        "--syscalls", action="store_true", help="count the agent's system calls (perf stat)"
    )
    p.add_argument(
        "--strace", action="store_true", help="the agent's system calls by name (last round)"
    )
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    root = Path(tempfile.mkdtemp(prefix="csml-agent-cost-"))
    rows = []
    for rnd in range(a.rounds):
        profile = (a.profile is not None or a.strace) and rnd == a.rounds - 1
        row = one_round(a, root / f"round-{rnd}", profile)
        rows.append(row)
        print(f"round {rnd} {a.mode}: " + json.dumps({k: round(v, 3) for k, v in row.items()}))
    medians = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
    print(f"medians ({a.mode}, {a.slots} slots + prefetch {a.prefetch}): " + json.dumps(medians))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if not a.keep and not a.profile:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
