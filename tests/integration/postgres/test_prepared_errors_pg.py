"""Errors of statements sent together (`prepared.rows_together`, libpq's pipeline mode)
on a real PostgreSQL server: the driver raises them at the pipeline's Sync, outside
SQLAlchemy's execution, and `prepared` maps them by SQLAlchemy's public API as
`Connection.execute` would: a unique violation is `IntegrityError` on a connection that
stays valid (its transaction rolled back, it serves on); a connection the server dropped
is an `OperationalError` with `connection_invalidated`, the connection invalidated so
that its next use reconnects."""

from __future__ import annotations

import pytest
from sqlalchemy import exc, text

from csml.coordinator.state import Core
from csml.store.prepared import Prepared, rows_together
from tests.prepared_checks import INSERT, ROWS, create

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


def test_a_conflict_sent_together_is_an_integrity_error_on_a_valid_connection(
    core: Core,
) -> None:
    create(core.engine)
    with core.engine.connect() as conn:
        conn.begin()
        [[row]] = rows_together(conn, [(Prepared(INSERT), ROWS[0])])
        conn.commit()
        conn.begin()
        with pytest.raises(exc.IntegrityError) as raised:
            rows_together(
                conn,
                [(Prepared(INSERT), ROWS[1]), (Prepared(INSERT), {**ROWS[2], "seq": row[0]})],
            )
        assert getattr(raised.value.orig, "sqlstate", None) == "23505"
        assert raised.value.connection_invalidated is False
        assert "INSERT INTO prepared_things" in str(raised.value.statement)
        assert not conn.invalidated
        conn.rollback()
        assert conn.exec_driver_sql("SELECT count(*) FROM prepared_things").scalar() == 1


def test_a_dropped_connection_sent_together_is_invalidated(core: Core) -> None:
    create(core.engine)
    with core.engine.connect() as conn, core.engine.connect() as killer:
        conn.begin()
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        killer.commit()
        with pytest.raises(exc.OperationalError) as raised:
            rows_together(conn, [(Prepared(INSERT), ROWS[0]), (Prepared(INSERT), ROWS[1])])
        assert raised.value.connection_invalidated is True
        assert conn.invalidated
        conn.rollback()
        # The next use connects afresh.
        assert conn.exec_driver_sql("SELECT count(*) FROM prepared_things").scalar() == 0
