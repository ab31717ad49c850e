"""Group commit loses nothing it acknowledged: a process writing through the `Writer` from
threads and coroutines prints each id once `run` returned, is SIGKILLed mid-stream, and
every printed id must be in the SQLite file afterwards."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

# The child: 4 threads and 16 coroutines write rows through one Writer, forever.
CHILD = r"""
import asyncio, sys, threading
from pathlib import Path
from sqlalchemy import text
from csml.store.db import make_engine, sqlite_url
from csml.store.writer import Writer

engine = make_engine(sqlite_url(Path(sys.argv[1])))
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


def test_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert child.stdout is not None
    acked: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(acked) < 1500 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked.append(line.strip())
    finally:
        child.send_signal(signal.SIGKILL)  # mid-stream: batches queued, running, committing
        rest, err = child.communicate(timeout=30)
    acked += [line.strip() for line in rest.splitlines() if line.strip()]
    assert child.returncode == -signal.SIGKILL, err
    assert len(acked) >= 1500, f"the child acknowledged only {len(acked)} writes: {err}"
    assert len(set(acked)) == len(acked)
    assert any(a.startswith("t") for a in acked) and any(a.startswith("c") for a in acked)

    db = sqlite3.connect(f"file:{tmp_path / 'csml.db'}?mode=ro", uri=True)  # replays the WAL
    try:
        stored = {row[0] for row in db.execute("SELECT id FROM acked")}
        (tally,) = db.execute("SELECT v FROM tally WHERE k = 1").fetchone()
        (integrity,) = db.execute("PRAGMA integrity_check").fetchone()
    finally:
        db.close()
    missing = [a for a in acked if a not in stored]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    assert tally == len(stored)  # each stored row's counter update committed with it
    assert integrity == "ok"
