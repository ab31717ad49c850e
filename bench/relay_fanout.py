"""What one coordinator pays for another's notifications (acceptance (e)'s fan-out).

    /work/venv/bin/python bench/relay_fanout.py [--jobs 3000] [--rate 150] [--listeners 2]
    PYTHONPATH=/path/to/other/src /work/venv/bin/python bench/relay_fanout.py  # compare

A throwaway PostgreSQL (`tests/pg_server.py`); one publisher process and `--listeners`
listener processes, each a `csml.coordinator.notify.Notifier` bound to its own event
loop on the one database (the relay: LISTEN/NOTIFY), as coordinators are. The
publisher announces `--jobs` jobs at `--rate` jobs/s with a job's keys in the order and
rough spacing a coordinator sends them: submit (`app:echo`, `owner:<o>/<job>`), claim
2 ms later (`owner:<o>/<job>`, running), completion 3 ms later (`job:<job>`,
`owner:<o>/<job>!`), for 16 owners. Each listener does what a coordinator with a
busy worker does with them: one claimer waits on `app:echo` (woken, it waits again),
a watcher on `job:` (the lease memo's kind), and a feed following one owner in
`--listeners + 1` (the owners whose streams are on it). Reported: CPU-ms per job of
each listener and of the publisher (from /proc, over the window), and the relay's
counts per job (packets, keys received, transactions sent), with the load.

The processes import csml from PYTHONPATH, so the same command measures two checkouts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OWNERS = 16
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def switches(pid: int) -> int:
    """Context switches (voluntary and involuntary) of every thread of `pid` so far."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


async def listen(url: str, index: int, listeners: int) -> None:
    from csml.coordinator.notify import Notifier, owner_feed
    from csml.store.db import make_engine

    n = Notifier(make_engine(url))
    n.bind(asyncio.get_running_loop())
    watched = [0]

    def watcher(key: str | None) -> None:
        watched[0] += 1

    n.watch("job:", watcher)
    relay = n.relay
    assert relay is not None
    await asyncio.to_thread(relay.listening.wait, 30)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the parent closes stdin: done

    async def claimer() -> None:
        with n.subscribe("app:echo") as event:
            while not stop.is_set():
                await n.wait(event, 0.5)

    async def stream(owner: str) -> None:
        with n.follow(owner_feed(owner)) as feed:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(feed.urgent.wait(), 0.5)
                except TimeoutError:
                    continue
                feed.take()

    followed = [f"o{k}" for k in range(OWNERS) if k % (listeners + 1) == index]
    tasks = [asyncio.ensure_future(claimer())]
    tasks += [asyncio.ensure_future(stream(o)) for o in followed]
    print("ready", flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    counts = {
        k: getattr(relay, k, None) for k in ("packets", "wakes", "received", "publishes", "sent")
    }
    counts["hops"] = getattr(n, "hops", None)
    print(json.dumps(counts), flush=True)
    n.close()


async def publish(url: str, jobs: int, rate: float) -> None:
    from csml.coordinator.notify import Notifier, job_key, owner_change
    from csml.store.db import make_engine

    n = Notifier(make_engine(url))
    n.bind(asyncio.get_running_loop())
    relay = n.relay
    assert relay is not None
    await asyncio.to_thread(relay.listening.wait, 30)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # go

    async def one(i: int) -> None:
        owner, job = f"o{i % OWNERS}", f"j{i}"
        n.notify("app:echo")
        n.notify(owner_change(owner, job))
        await asyncio.sleep(0.002)
        n.notify(owner_change(owner, job))
        await asyncio.sleep(0.003)
        n.notify(job_key(job))
        n.notify(owner_change(owner, job, ending=True))

    t0 = time.monotonic()
    pending = []
    for i in range(jobs):
        pending.append(asyncio.ensure_future(one(i)))
        await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
    await asyncio.gather(*pending)
    await asyncio.sleep(0.3)  # the last deferred keys go out
    counts = {
        k: getattr(relay, k, None) for k in ("packets", "wakes", "received", "publishes", "sent")
    }
    print(json.dumps(counts), flush=True)
    n.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--rate", type=float, default=150.0, help="jobs per second")
    p.add_argument("--listeners", type=int, default=2)
    p.add_argument("--role", choices=["listen", "publish"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "listen":
        asyncio.run(listen(a.url, a.index, a.listeners))
        return 0
    if a.role == "publish":
        asyncio.run(publish(a.url, a.jobs, a.rate))
        return 0

    from tests.pg_server import create_database, running_postgres

    me = [sys.executable, str(Path(__file__).resolve())]
    with running_postgres() as pg:
        create_database(pg, "relay_fanout")
        url = pg.url_for("relay_fanout")
        common = ["--url", url, "--listeners", str(a.listeners)]
        procs = [
            subprocess.Popen(
                [*me, "--role", "listen", "--index", str(i), *common],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(a.listeners)
        ]
        pub = subprocess.Popen(
            [*me, "--role", "publish", "--jobs", str(a.jobs), "--rate", str(a.rate), *common],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for proc in [*procs, pub]:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        load0 = os.getloadavg()[0]
        before = {proc.pid: cpu_s(proc.pid) for proc in [*procs, pub]}
        switched = {proc.pid: switches(proc.pid) for proc in [*procs, pub]}
        t0 = time.monotonic()
        assert pub.stdin is not None
        pub.stdin.write("go\n")
        pub.stdin.flush()
        assert pub.stdout is not None
        published = json.loads(pub.stdout.readline())
        wall = time.monotonic() - t0
        used = {pid: cpu_s(pid) - cpu for pid, cpu in before.items()}
        switched = {pid: switches(pid) - n for pid, n in switched.items()}
        counts = []
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            counts.append(json.loads(proc.stdout.readline()))
        for proc in [*procs, pub]:
            proc.wait(30)
    per_job = 1000 / a.jobs
    report = {
        "jobs": a.jobs,
        "rate": a.rate,
        "wall_s": round(wall, 2),
        "load_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "listener_cpu_ms_per_job": [round(used[p.pid] * per_job, 3) for p in procs],
        "publisher_cpu_ms_per_job": round(used[pub.pid] * per_job, 3),
        "listener_switches_per_job": [round(switched[p.pid] / a.jobs, 2) for p in procs],
        "publisher_switches_per_job": round(switched[pub.pid] / a.jobs, 2),
        "publisher": {k: v / a.jobs if v is not None else None for k, v in published.items()},
        "listeners": [
            {k: round(v / a.jobs, 2) if v is not None else None for k, v in c.items()}
            for c in counts
        ],
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
