"""A process writing through the `Writer` until it is SIGKILLed, for the durability tests of
group commit (SQLite: `test_writer_durability.py`, PostgreSQL:
`postgres/test_writer_durability_pg.py`): 4 threads and 16 coroutines write a row and a
counter update each through one `Writer`, and print each row's id once `run` returned
(acknowledged). `acknowledged_until_killed` runs it, kills it mid-stream and returns the
ids it printed; the caller checks its database holds every one of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# The child: 4 threads and 16 coroutines write rows through one Writer, forever.
CHILD = r"""
import asyncio, sys, threading
from sqlalchemy import text
from csml.store.db import make_engine
from csml.store.writer import Writer

engine = make_engine(sys.argv[1])
with engine.begin() as conn:
    conn.execute(text("CREATE TABLE acked (id TEXT PRIMARY KEY, n INTEGER NOT NULL)"))
    conn.execute(text("CREATE TABLE tally (k INTEGER PRIMARY KEY, v INTEGER NOT NULL)"))
    conn.execute(text("INSERT INTO tally VALUES (1, 0)"))
writer = Writer(engine)
out = threading.Lock()

def op(ident):
    def write(conn):
        conn.execute(text("INSERT INTO acked VALUES (:i, 0)"), {"i": ident})
        return conn.execute(
            text("UPDATE tally SET v = v + 1 WHERE k = 1 RETURNING v")
        ).scalar_one()
    return write

def ack(ident):
    with out:
        sys.stdout.write(ident + "\n")
        sys.stdout.flush()

def thread_main(t):
    i = 0
    while True:
        ident = f"t{t}-{i}"
        writer.run(op(ident))
        ack(ident)
        i += 1

async def coroutine_main(c):
    i = 0
    while True:
        ident = f"c{c}-{i}"
        await writer.run_async(op(ident))
        ack(ident)
        i += 1

async def main():
    await asyncio.gather(*(coroutine_main(c) for c in range(16)))

for t in range(4):
    threading.Thread(target=thread_main, args=(t,), daemon=True).start()
asyncio.run(main())
"""


def acknowledged_until_killed(url: str, writes: int = 1500, seconds: float = 60) -> list[str]:
    """Run the child on the database at `url` until it acknowledged `writes` writes (or
    `seconds` passed), SIGKILL it mid-stream (batches queued, running, committing) and
    return every id it acknowledged, checked unique, from threads and coroutines both."""
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert child.stdout is not None
    acked: list[str] = []
    deadline = time.monotonic() + seconds
    try:
        while len(acked) < writes and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked.append(line.strip())
    finally:
        child.send_signal(signal.SIGKILL)
        rest, err = child.communicate(timeout=30)
    acked += [line.strip() for line in rest.splitlines() if line.strip()]
    assert child.returncode == -signal.SIGKILL, err
    assert len(acked) >= writes, f"the child acknowledged only {len(acked)} writes: {err}"
    assert len(set(acked)) == len(acked)
    assert any(a.startswith("t") for a in acked) and any(a.startswith("c") for a in acked)
    return acked
