"""Prepared statements (`csml.store.prepared`) on PostgreSQL (psycopg): the same SQL
(with its bind casts) and driver values as SQLAlchemy Core, the same rows back (JSON,
timestamps with zones, booleans, bytes, floats, NULLs), the same counters, and each of
the store's hot statements against Core (`tests/prepared_checks.py`); a driver error
comes back wrapped with the SQLSTATE `db.is_conflict` reads."""

from __future__ import annotations

import pytest
from sqlalchemy import exc

from csml.coordinator.state import Core
from csml.store.db import read_each
from csml.store.prepared import Prepared, rows_together
from tests.integration.postgres.support import new_identity, new_worker, submit
from tests.prepared_checks import (
    INSERT,
    ROWS,
    check_round_trips,
    check_store_statements,
    create,
    recorded,
)

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


def test_types_round_trip_as_through_core(core: Core) -> None:
    assert core.engine.dialect.driver == "psycopg"
    create(core.engine)
    check_round_trips(core.engine)


def test_a_driver_error_is_sqlalchemys_with_its_sqlstate(core: Core) -> None:
    create(core.engine)
    with core.engine.connect() as conn:
        conn.begin()
        [row] = Prepared(INSERT).rows(conn, ROWS[0])
        with pytest.raises(exc.IntegrityError) as raised:
            Prepared(INSERT).rows(conn, {**ROWS[1], "seq": row[0]})
        assert getattr(raised.value.orig, "sqlstate", None) == "23505"
        conn.rollback()


def test_read_each_sends_the_statement_alone(core: Core) -> None:
    """A `read_each` connection is in AUTOCOMMIT: a prepared read sends no BEGIN."""
    create(core.engine)
    with read_each(core.engine) as conn, recorded(core.engine) as sent:
        assert Prepared(INSERT).rows(conn, ROWS[2])[0][1] == "c"
        assert len(sent) == 1 and sent[0][0].startswith("INSERT INTO prepared_things")
    with core.engine.connect() as conn:  # it committed by itself
        assert conn.exec_driver_sql("SELECT count(*) FROM prepared_things").scalar() == 1


def test_the_store_hot_statements_send_and_return_what_core_does(core: Core) -> None:
    owner = new_identity(core)
    worker = new_worker(core)
    job_id = submit(core, owner, x=1)
    check_store_statements(core.engine, owner, worker.id, job_id)


def test_statements_sent_together_answer_each_and_stop_at_the_first_error(core: Core) -> None:
    """`rows_together`: each statement's rows in order, counted like the others; when one
    fails, its error (wrapped as SQLAlchemy's, with its SQLSTATE) and none after it ran."""
    create(core.engine)
    with core.engine.connect() as conn:
        conn.begin()
        with recorded(core.engine) as sent:
            first, second = rows_together(
                conn, [(Prepared(INSERT), ROWS[0]), (Prepared(INSERT), ROWS[1])]
            )
        assert len(sent) == 2
        assert (first[0][1], second[0][1]) == ("a", "b") and first[0][0] != second[0][0]
        conn.commit()
    with core.engine.connect() as conn:
        conn.begin()
        with pytest.raises(exc.IntegrityError) as raised:
            rows_together(
                conn,
                [(Prepared(INSERT), {**ROWS[2], "seq": first[0][0]}), (Prepared(INSERT), ROWS[2])],
            )
        assert getattr(raised.value.orig, "sqlstate", None) == "23505"
        conn.rollback()
    with core.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM prepared_things").scalar() == 2
