"""Where (c)'s coordinator CPU goes, by route and step, on the real coordinator.

Runs `bench/core.py --only c --images N --no-anchor` (this tree's code: run it with
`PYTHONPATH=src`) and attaches `py-spy record` (`--native`: with native frames, so the
leaves name the system calls and C functions) to its coordinator as soon as it has
started, until the bench ends; or, with `--raw FILE`, only reads the stacks of
an earlier run. The samples are split by where they come from, the first match of:
the user routes (`submit_job`: the multipart submission; `download_output`: the output
GET), the worker routes (`claim`, `complete_batch`/`complete`), the owners' result
streams (`events`), the start-up and the bench's set-up (`set-up`: left out of the
shares), the group-commit writer thread (`writer`), the thread pool's other
work (`thread pool`: completions' inline outputs written and fsync'd, fsyncs of staged
files, sync endpoints), the answers' socket writes outside a route's handler (`answer
writes`), the lean dispatch's own Python (`dispatch`) and HTTP parsing and the event
loop (`http/loop`). Idle waits (epoll, futexes, condition waits) and the start-up's
imports are left out: the shares are of the CPU the coordinator spent, the Pool(2)
baseline's part of the run included (the coordinator is idle then).

py-spy's native sampling stops the process for each sample: the coordinator's CPU
figure of such a run is inflated (x1.5-2, less without `--native`); the shares, not the
milliseconds, are the result; and in one run of three it killed the coordinator
(`--timeout` then ends the run). Without `--native`, uvloop's own work (C) shows as
its caller, `Runner.run`, which is also where the loop waits: left out as idle, so
`http/loop` is undercounted. The CPU per image of a run without py-spy gives the
scale. A thread inside `fsync`/`fdatasync` is sampled as running although it mostly
waits for the disk: the `writer` and `thread pool` shares overstate their CPU by those
leaves (`top_leaves`); `share_pct_without_fsync` leaves them out (with `--native`; without
it, the leaves are the Python callers: SQLite's commit, `fsync_paths`).

    PYTHONPATH=src /work/venv/bin/python bench/photo_spy.py [--images 100] [--rate 250] [--native]
    /work/venv/bin/python bench/photo_spy.py --raw /tmp/coordinator.raw
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from pyspy import py_spy_path

BENCH = Path(__file__).resolve().parent
SETUP = "set-up"
"""The bench's set-up and scrapes (identities, worker registration, app listing,
`/metrics`, validators FastAPI builds on a route's first call): counted apart, left out
of the shares."""

# (bucket, frame names: a sample whose stack holds one of them goes to the bucket);
# first match wins.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    (SETUP, ("create_identity", "register", "list_apps", "metrics", "create_schema_validator")),
    (SETUP, ("lifespan", "build_middleware_stack")),
    ("submit_job", ("submit_job",)),
    ("download_output", ("download_output",)),
    ("claim", ("claim",)),
    ("complete", ("complete_batch", "complete")),
    ("events", ("_stream", "stream_events")),
    ("writer", ("Writer._main",)),
    ("thread pool", ("WorkerThread.run",)),
    ("answer writes", ("RequestResponseCycle.send",)),
    ("dispatch", ("HotRoutes._serve", "HotRoutes.__call__", "FastAPI.__call__")),
]

# Leaf frames of a thread that waits (not CPU).
IDLE_LEAVES = ("epoll", "futex", "cond_wait", "cond_timedwait", "sem_wait", "sem_timedwait")
IDLE_LEAF_NAMES = {
    *("poll", "select", "do_futex_wait", "__new_sem_wait_slow"),
    # Without --native: the Python frames of the waits (the loop's is uvloop's `run`).
    *("Condition.wait", "Event.wait", "Queue.get", "Writer._take", "Runner.run"),
}
# Leaves of a thread that mostly waits for the disk (sampled as running).
FSYNC_LEAVES = {"fsync", "fdatasync", "do_commit", "fsync_paths", "fsync_folders_of"}
# Frames of the start-up (imports, building the app) or of a blocked lock acquisition.
SKIP_FRAMES = {"_find_and_load", "_compile_bytecode", "create_app", "PyThread_acquire_lock_timed"}


def frame_names(stack: str) -> list[str]:
    """A collapsed stack's function names, outermost first (files and lines dropped)."""
    return [f.split(" (", 1)[0].strip() for f in stack.split(";")]


def bucket_of(names: list[str]) -> str | None:
    """The bucket of one sample (None: an idle wait or the start-up)."""
    leaf = names[-1] if names else ""
    if leaf in IDLE_LEAF_NAMES or any(word in leaf for word in IDLE_LEAVES):
        return None
    if SKIP_FRAMES.intersection(names):
        return None
    present = set(names)
    if "Typer.__call__" in present and "Server.run" not in present:
        return SETUP  # the main thread before its event loop runs: the start-up
    for bucket, frames in BUCKETS:
        if present.intersection(frames):
            return bucket
    return "http/loop"


def summarise(raw: Path) -> dict[str, object]:
    """Samples per bucket, with each bucket's share and its most frequent leaves."""
    buckets: Counter[str] = Counter()
    busy: Counter[str] = Counter()  # less the samples inside fsync/fdatasync
    leaves: dict[str, Counter[str]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        names = frame_names(stack)
        bucket = bucket_of(names)
        if bucket is None:
            continue
        buckets[bucket] += int(count)
        if names[-1] not in FSYNC_LEAVES:
            busy[bucket] += int(count)
        leaves.setdefault(bucket, Counter())[names[-1]] += int(count)
    setup = buckets.pop(SETUP, 0)
    busy.pop(SETUP, 0)
    total = sum(buckets.values())
    total_busy = sum(busy.values())
    return {
        "samples": total,
        "set_up_samples_left_out": setup,
        "share_pct": {b: round(100 * n / total, 1) for b, n in buckets.most_common()},
        "share_pct_without_fsync": {
            b: round(100 * n / total_busy, 1) for b, n in busy.most_common()
        },
        "top_leaves": {b: dict(leaves[b].most_common(4)) for b, _ in buckets.most_common()},
    }


def coordinator_of(bench_pid: int, timeout: float = 120.0) -> int | None:
    """The pid of the coordinator the bench started (`csml server`), once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(
            ["pgrep", "-P", str(bench_pid), "-f", "csml server"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.2)
    return None


def alive(pid: int) -> bool:
    """Whether process `pid` runs (not gone, not a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Interrupt `proc` (its `finally` blocks run: core.py stops its cluster), then kill."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def record(images: int, rate: int, raw: Path, native: bool, timeout: float) -> dict[str, object]:
    """Run (c) with py-spy on its coordinator; core.py's own figures for the run. The
    sampling stops when the coordinator is gone (core.py stops it after its part); a run
    past `timeout` seconds is interrupted (a coordinator that died under the sampling
    leaves core.py waiting for its jobs: py-spy's `--native` killed one in session 17)."""
    spy = py_spy_path()
    if spy is None:
        raise SystemExit("py-spy is not installed")
    out = raw.with_suffix(".core.txt")
    with out.open("w") as log:
        run = [sys.executable, str(BENCH / "core.py"), "--only", "c", "--no-anchor"]
        bench = subprocess.Popen(
            [*run, "--images", str(images)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
        pid = coordinator_of(bench.pid)
        recorder = None
        if pid is not None:
            spying = [spy, "record", "--pid", str(pid), "--rate", str(rate)]
            recorder = subprocess.Popen(
                [*spying, *(["--native"] if native else []), "--format", "raw", "-o", str(raw)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        started = time.monotonic()
        gone_at: float | None = None
        while bench.poll() is None:
            now = time.monotonic() - started
            if gone_at is None and pid is not None and not alive(pid):
                gone_at = round(now, 1)  # stopped after its part, or died: nothing to sample
                if recorder is not None:
                    stop(recorder)
            if now > timeout:
                stop(bench)
                break
            time.sleep(0.5)
        if recorder is not None:
            stop(recorder)
    figures: dict[str, object] = {
        "core_output": str(out),
        "coordinator_gone_at_s": gone_at,
        "timed_out": bench.returncode != 0,
    }
    for line in out.read_text().splitlines():
        key, _, value = line.strip().partition(": ")
        if key in ("csml_cpu_ms_per_image", "cpu_ratio_csml_over_baseline"):
            figures[key] = json.loads(value)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="py-spy --native (see above)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the run")
    parser.add_argument("--raw", type=Path, help="summarise these stacks only (no run)")
    args = parser.parse_args()
    if args.raw is not None:
        print(json.dumps(summarise(args.raw), indent=1))
        return
    folder = Path(tempfile.mkdtemp(prefix="csml-photo-spy-"))
    raw = folder / "coordinator.raw"
    result = {
        "load_before": os.getloadavg(),
        **record(args.images, args.rate, raw, args.native, args.timeout),
        "load_after": os.getloadavg(),
        "raw_stacks": str(raw),
    }
    if raw.exists():
        result.update(summarise(raw))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
