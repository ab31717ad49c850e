"""The writer thread's GIL hand-offs per lone write, with the event loop idle or busy.

    PYTHONPATH=src /work/venv/bin/python bench/writer_handoffs.py [--ops 200] [--busy]

One event loop awaits `Writer.run_async` of bench/writer.py's submit-sized op (a rank
UPDATE ... RETURNING and a job INSERT), one at a time, on a fresh SQLite store made by
csml's `make_engine` (WAL, synchronous=FULL) in the system's temporary folder. With
`--busy`, another thread runs Python without pause meanwhile: the worst case of a busy
coordinator, whose event loop wants the GIL whenever the writer thread lets go of it
(pysqlite does around each step, reset and a few other calls of every statement), so
each such let-go costs the writer a wait for the GIL back (up to Python's switch
interval, 5 ms) and a context switch. Prints, per op, the writer thread's voluntary and
involuntary context switches and CPU-ms (`/proc/self/task/<tid>`), and the wall time.
Counts, not timings, are the point: compare two trees in pairs (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import writer as writer_bench  # noqa: E402

from cluster import task_counters  # noqa: E402
from csml.store.writer import Writer  # noqa: E402


def thread_counts(tid: int) -> dict[str, float]:
    """A thread of this process: its context switches and CPU-ms (`cluster.task_counters`)."""
    cpu, voluntary, nonvoluntary = task_counters(os.getpid(), tid)
    return {"voluntary": voluntary, "nonvoluntary": nonvoluntary, "cpu_ms": cpu * 1000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ops", type=int, default=200, help="timed ops (after 20 untimed)")
    p.add_argument("--busy", action="store_true", help="a thread running Python meanwhile")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="csml-handoffs-") as base:
        engine, _ = writer_bench.sqlite_engine(base)
        [owner] = writer_bench.seed(engine, 1)
        writer = Writer(engine)
        tids: list[int] = []
        writer.run(lambda _conn: tids.append(threading.get_native_id()))
        stop = threading.Event()

        def spin() -> None:
            n = 0
            while not stop.is_set():
                n += 1

        spinner = threading.Thread(target=spin, daemon=True)
        if a.busy:
            spinner.start()
        op = writer_bench.submit_op(owner, 0)

        async def timed() -> tuple[dict[str, float], dict[str, float], float]:
            for _ in range(20):
                await writer.run_async(op)
            before, t0 = thread_counts(tids[0]), time.perf_counter()
            for _ in range(a.ops):
                await writer.run_async(op)
            return before, thread_counts(tids[0]), time.perf_counter() - t0

        before, after, wall = asyncio.run(timed())
        stop.set()
        if a.busy:
            spinner.join()
        writer.close()
        engine.dispose()
    per = {k: round((after[k] - before[k]) / a.ops, 3) for k in before}
    print(
        f"load {os.getloadavg()[0]:.2f}; {'busy' if a.busy else 'idle'} loop; per op: writer "
        f"voluntary {per['voluntary']} + involuntary {per['nonvoluntary']} switches, "
        f"CPU {per['cpu_ms']} ms; wall {wall / a.ops * 1000:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
