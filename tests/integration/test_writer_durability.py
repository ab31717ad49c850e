"""Group commit loses nothing it acknowledged: a process writing through the `Writer` from
threads and coroutines prints each id once `run` returned, is SIGKILLed mid-stream, and
every printed id must be in the SQLite file afterwards."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from csml.store.db import sqlite_url
from tests.integration.acking_writer import acknowledged_until_killed

pytestmark = pytest.mark.timeout(120)


def test_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    acked = acknowledged_until_killed(sqlite_url(tmp_path))

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
