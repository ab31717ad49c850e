"""Prepared statements (`csml.store.prepared`) on SQLite: each sends the SQL and driver
values SQLAlchemy Core sends for the same statement and parameters, returns the same rows
(values and types: JSON, timestamps, booleans, bytes, floats), is counted in the
engine's statement counters with its kind, raises SQLAlchemy's wrapped errors, and
begins a transaction exactly when `Connection.execute` would. The store's hot statements
(submission, claim, heartbeat, completion, loads, probe) are each checked against Core
on a store with jobs in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc, insert

from csml.store import jobs as store
from csml.store.db import make_engine, read_each, snapshot, sqlite_url
from csml.store.prepared import Prepared
from tests.prepared_checks import (
    INSERT,
    ROWS,
    THINGS,
    check_round_trips,
    check_store_statements,
    create,
    recorded,
)
from tests.unit.inproc import HttpWorker, InProcessCoordinator


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    made = make_engine(sqlite_url(tmp_path))
    create(made)
    yield made
    made.dispose()


def test_types_round_trip_as_through_core(engine: Any) -> None:
    check_round_trips(engine)


def test_a_driver_error_is_sqlalchemys_and_the_writes_before_it_stay(engine: Any) -> None:
    with engine.connect() as conn:
        conn.begin()
        [row] = Prepared(INSERT).rows(conn, ROWS[0])
        with pytest.raises(exc.IntegrityError) as raised:
            Prepared(INSERT).rows(conn, {**ROWS[1], "seq": row[0]})  # the same key
        assert raised.value.orig is not None  # what `db.is_conflict` reads
        assert conn.in_transaction()
        assert conn.execute(THINGS.select()).all()[0][0] == row[0]
        conn.rollback()


def test_a_statement_begins_as_execute_would(engine: Any) -> None:
    """In a snapshot, the first statement begins the read transaction (SQLite: BEGIN);
    on a `read_each` connection nothing is sent but the statement."""
    select_all = Prepared(THINGS.select())
    with engine.connect() as conn:
        conn.execute(insert(THINGS), ROWS[0])
        conn.commit()
    for way, opened in ((snapshot, ["BEGIN"]), (read_each, [])):
        with way(engine) as conn, recorded(engine) as sent:
            assert len(select_all.rows(conn, {})) == 1
            assert conn.in_transaction()
            assert [s for s, _p in sent] == [*opened, str(THINGS.select().compile(engine))]


def test_plans_are_made_per_parameter_names_and_padded_list_lengths(engine: Any) -> None:
    from tests.prepared_checks import BY_NAMES

    by_names = Prepared(BY_NAMES)
    with engine.connect() as conn:
        conn.begin()
        for row in ROWS:
            conn.execute(insert(THINGS), row)
        assert [r[1] for r in by_names.rows(conn, {"names": ["a", "b"]})] == ["a", "b"]
        assert [r[1] for r in by_names.rows(conn, {"names": ["c"]})] == ["c"]
        assert by_names.rows(conn, {"names": []}) == []
        assert [r[1] for r in by_names.rows(conn, {"names": ["b", "a"]})] == ["a", "b"]
        for n in range(3, 40):  # lengths 4, 8, 16, 32 and 64: five plans more
            names = ["c", "a", *[f"x{i}" for i in range(n - 2)]]
            assert [r[1] for r in by_names.rows(conn, {"names": names})] == ["a", "c"]
        conn.rollback()
    assert len(by_names._plans) == 3 + 5
    assert by_names.padded({"names": ["a", "b", "c"]}) == {"names": ["a", "b", "c", "c"]}
    assert by_names.padded({"names": ["a", "b"]}) == {"names": ["a", "b"]}


# -- the store's hot statements, each against Core on a store with jobs ----------------


def test_the_store_hot_statements_send_and_return_what_core_does(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    engine = coordinator.core.engine
    job_id = coordinator.new_user().submit("echo", "echo", params={"x": 1}).id
    with read_each(engine) as conn:
        row = store.by_id(conn, job_id)
    assert row is not None
    check_store_statements(engine, row.owner_id, echo_worker.id, job_id)


def test_rows_read_by_position_are_the_rows_read_by_name(
    coordinator: InProcessCoordinator,
) -> None:
    """A job loaded through a `Prepared` statement (rows by position) is the job Core's
    named row gives, files and all."""
    engine = coordinator.core.engine
    job_id = coordinator.new_user().submit("echo", "echo", params={"x": [1, "ü"]}).id
    with read_each(engine) as conn:
        fast = store.by_id(conn, job_id)
        row = conn.execute(store._BY_ID.stmt, {"job_id": job_id}).one()
    assert fast is not None
    m = row._mapping
    assert fast == store.JobRow(
        **{k: m[k] for k in store._JOB_FIELDS}, files=store.files_of(m["files_json"])
    )


def test_what_it_cannot_send_as_core_would_is_refused(engine: Any) -> None:
    """A parameter SQLAlchemy renders into the SQL (`literal_execute`), or a column
    default it computes per row (a callable), is refused, never sent differently."""
    from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, select

    table = Table(
        "prepared_defaults",
        MetaData(),
        Column("seq", Integer, primary_key=True),
        Column("name", String(20), default=lambda: "computed"),
    )
    table.create(engine)
    literal = select(THINGS.c.seq).where(
        THINGS.c.name.in_(bindparam("names", expanding=True, literal_execute=True))
    )
    with engine.connect() as conn:
        with pytest.raises(TypeError, match="literal_execute"):
            Prepared(literal).rows(conn, {"names": ["a"]})
        with pytest.raises(TypeError, match="scalar column defaults"):
            Prepared(insert(table)).run(conn, {"seq": 1})
        assert Prepared(insert(table)).run(conn, {"seq": 1, "name": "given"}) == 1
        conn.rollback()
