"""Group commit on PostgreSQL loses nothing it acknowledged: as
`tests/integration/test_writer_durability.py`, a process writing through the `Writer`
(four lanes; each batch's COMMIT sent with the lane's next BEGIN) prints each id once
`run` returned and is SIGKILLed mid-stream; every printed id must be in the database,
each with its counter update, and the server holds no transaction of the dead process
afterwards (it aborted the begun and the running ones)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from csml.store.db import make_engine
from tests.integration.acking_writer import acknowledged_until_killed

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


def test_sigkill_loses_no_acknowledged_write(db_url: str) -> None:
    acked = acknowledged_until_killed(db_url, seconds=90)

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
