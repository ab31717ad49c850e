"""Group commit on PostgreSQL loses nothing it acknowledged: as
`tests/integration/test_writer_durability.py`, a process writing through the `Writer`
(four lanes; each batch's COMMIT sent with the lane's next BEGIN) prints each id once
`run` returned and is SIGKILLed mid-stream; every printed id must be in the database,
each with its counter update, and the server holds no transaction of the dead process
afterwards (it aborted the begun and the running ones)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from csml.store.db import make_engine

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]

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


def test_sigkill_loses_no_acknowledged_write(db_url: str) -> None:
    src = Path(__file__).resolve().parents[3] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, db_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert child.stdout is not None
    acked: list[str] = []
    deadline = time.monotonic() + 90
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

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            for _ in range(2000):  # until the server noticed the dead client's sockets
                left = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar_one()
                conn.rollback()
                if not left:
                    break
                time.sleep(0.01)
            assert left == 0
            stored = {row[0] for row in conn.execute(text("SELECT id FROM acked"))}
            tally = conn.execute(text("SELECT v FROM tally WHERE k = 1")).scalar_one()
    finally:
        engine.dispose()
    missing = [a for a in acked if a not in stored]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    assert tally == len(stored)  # each stored row's counter update committed with it
