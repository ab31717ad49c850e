"""Sample a running process with py-spy and summarise where its time goes.

py-spy (`pip install py-spy`) writes "raw" collapsed stacks: one line per
distinct stack, frames separated by `;`, then a space and a sample count.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def py_spy_path() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Recorder:
    """`py-spy record` attached to `pid` until `stop()`."""

    def __init__(self, pid: int, out: Path, rate: int = 250, gil_only: bool = False) -> None:
        exe = py_spy_path()
        if exe is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.out = out
        cmd = [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(out),
            "--threads",
            "--nonblocking",
        ]
        if gil_only:
            cmd.append("--gil")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _frames(stack: str) -> list[str]:
    """Frames outermost first, as 'func (module)'; thread labels dropped."""
    out = []
    for raw in stack.split(";"):
        m = _FRAME.match(raw.strip())
        if m is None:
            continue
        out.append(f"{m['func']} ({_short(m['file'])})")
    return out


def _short(path: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# Leaf-frame categories, first match wins: (name, substrings of the leaf frame).
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("sqlite BEGIN IMMEDIATE (lock wait)", ("_on_begin",)),
    ("sqlite COMMIT (fsync of the WAL)", ("do_commit", "_commit_impl")),
    ("sqlite statement execution", ("do_execute", "do_executemany", "cursor.execute")),
    ("threading/GIL hand-off", ("threading.py", "queue.py")),
    ("sqlalchemy (Python)", ("sqlalchemy/",)),
    ("pydantic", ("pydantic",)),
    ("jsonschema", ("jsonschema",)),
    ("starlette/fastapi", ("starlette/", "fastapi/")),
    ("uvicorn/httptools", ("uvicorn/", "httptools")),
    ("anyio/asyncio", ("anyio/", "asyncio/")),
    ("prometheus_client", ("prometheus_client",)),
    ("csml", ("csml/",)),
]

# Frames too generic to be worth listing as "inclusive" hot spots.
_GENERIC = (
    "runpy",
    "typer/",
    "click/",
    "uvicorn/main.py",
    "uvicorn/server.py",
    "_compat.py",
    "__main__.py",
    "cli/main.py",
    "cli/operator.py",
    "Thread.",
    "_bootstrap",
    "base_events",
    "events.py",
    "WorkerThread.run",
    "thread (",
)


def _bucket(frames: list[str]) -> str:
    """A coarse category for one sample: a few key frames anywhere, else the leaf's library."""
    joined = ";".join(frames)
    for name, needles in BUCKETS[:3]:
        if any(n in joined for n in needles):
            return name
    leaf = frames[-1] if frames else ""
    for name, needles in BUCKETS[3:]:
        if any(n in leaf for n in needles):
            return name
    return "other (" + leaf.split(" (", 1)[-1]


def summarise(raw: Path, top: int = 30) -> dict[str, object]:
    """Shares of samples: by category, by leaf function, and inclusive by function."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = _frames(stack)
        total += n
        buckets[_bucket(frames)] += n
        if frames:
            leaves[frames[-1]] += n
        for f in set(frames):
            if not any(g in f for g in _GENERIC):
                inclusive[f] += n

    def pct(counter: Counter[str]) -> dict[str, float]:
        return {k: round(100 * v / max(1, total), 1) for k, v in counter.most_common(top)}

    return {
        "samples": total,
        "by_bucket_pct": pct(buckets),
        "top_leaf_pct": pct(leaves),
        "inclusive_pct": pct(inclusive),
    }
