"""Checks that a `Prepared` statement sends and returns exactly what SQLAlchemy Core's
`Connection.execute` sends and returns for the same statement and parameters: the same
SQL text, the same values handed to the driver (after type processing), the same rows
back (values and their Python types), the same statement counters. Shared by the
SQLite tests (`tests/unit/test_prepared.py`) and the PostgreSQL ones
(`tests/integration/postgres/test_prepared_pg.py`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

from csml.store.db import counters
from csml.store.prepared import Prepared
from csml.store.tables import UTCDateTime

META = MetaData()
THINGS = Table(
    "prepared_things",
    META,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("name", String(40), nullable=False),
    Column("doc", JSON),
    Column("at", UTCDateTime),
    Column("flag", Boolean),
    Column("blob", LargeBinary),
    Column("ratio", Float),
    Column("note", String(40), default="plain"),  # a scalar Python-side default
)

PARIS = timezone(timedelta(hours=2))
ROWS: list[dict[str, Any]] = [
    {
        "name": "a",
        "doc": {"k": [1, 2.5, None, True], "ü": "ß ☃", "nested": {"x": {}}},
        "at": datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=PARIS),
        "flag": True,
        "blob": b"\x00\xffbytes\n",
        "ratio": 0.25,
    },
    {
        "name": "b",
        "doc": None,
        "at": datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC),
        "flag": False,
        "blob": b"",
        "ratio": 3.0,
    },
    {"name": "c", "doc": [], "at": None, "flag": None, "blob": None, "ratio": None},
]

INSERT = insert(THINGS).returning(*THINGS.c)
BY_NAMES = (
    select(THINGS)
    .where(THINGS.c.name.in_(bindparam("names", expanding=True)))
    .order_by(THINGS.c.seq)
)
BY_PAIRS = (
    select(THINGS.c.seq, THINGS.c.at)
    .where(tuple_(THINGS.c.name, THINGS.c.flag).in_(bindparam("pairs", expanding=True)))
    .order_by(THINGS.c.seq)
)
TOUCH = (
    update(THINGS)
    .where(THINGS.c.name == bindparam("b_name"), THINGS.c.flag.is_not(None))
    .values(doc=bindparam("b_doc"), at=bindparam("b_at"), flag=~THINGS.c.flag)
    .returning(THINGS.c.seq, THINGS.c.doc, THINGS.c.at, THINGS.c.flag, THINGS.c.note)
)
BUMP = update(THINGS).where(THINGS.c.name == bindparam("b_name")).values(ratio=THINGS.c.ratio + 1)


def create(engine: Engine) -> None:
    META.create_all(engine)


Sent = list[tuple[str, Any]]


@contextmanager
def recorded(engine: Engine) -> Iterator[Sent]:
    """What the engine hands its driver meanwhile: (SQL, parameters) per statement."""
    sent: Sent = []

    def record(_c: object, _cur: object, statement: str, parameters: Any, *_: object) -> None:
        sent.append((statement, parameters))

    sa_event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa_event.remove(engine, "before_cursor_execute", record)


def typed(rows: Any) -> list[list[tuple[type, Any]]]:
    """Rows as lists of (type, value): equal only if the values and their types are."""
    return [[(type(v), v) for v in row] for row in rows]


Setup = Callable[[Connection], None]


def same_as_core(
    engine: Engine,
    stmt: Any,
    params: Mapping[str, Any],
    *,
    setup: Setup | None = None,
    returns: bool = True,
) -> list[tuple[Any, ...]]:
    """Run `stmt` once by `Connection.execute` and once as a `Prepared`, each in a
    transaction rolled back afterwards (after `setup`, which may write), and assert they
    sent the same SQL and driver parameters, returned the same rows (and row count), and
    counted the same statements and kinds. The rows."""
    outcomes = []
    for way in ("core", "prepared"):
        with engine.connect() as conn:
            conn.begin()
            if setup is not None:
                setup(conn)
            tally = counters(engine)
            statements, kinds = tally.statements, dict(tally.by_kind)
            with recorded(engine) as sent:
                if way == "core":
                    result = conn.execute(stmt, dict(params))
                    rows = [tuple(r) for r in result] if returns else []
                    count = None if returns else result.rowcount
                else:
                    fast = Prepared(stmt)
                    if returns:
                        rows, count = fast.rows(conn, params), None
                    else:
                        rows, count = [], fast.run(conn, params)
            counted = tally.statements - statements
            grown = {k: v - kinds.get(k, 0) for k, v in tally.by_kind.items() if v != kinds.get(k)}
            conn.rollback()
        outcomes.append((sent, typed(rows), count, counted, grown))
    core, prepared = outcomes
    assert prepared[0] == core[0], "SQL or driver parameters differ"
    assert prepared[1] == core[1], f"rows differ: {core[1]} != {prepared[1]}"
    assert prepared[2] == core[2], "row counts differ"
    assert prepared[3:] == core[3:] == (1, prepared[4]), "counters differ"
    return [tuple(v for _t, v in row) for row in prepared[1]]


def insert_rows(conn: Connection) -> None:
    for row in ROWS:
        conn.execute(insert(THINGS), row)


def check_round_trips(engine: Engine) -> None:
    """Inserts, selects (expanding and tuple IN-lists, empty ones too) and updates of every
    type the store uses come out as through Core."""
    for row in ROWS:
        back = same_as_core(engine, INSERT, row)
        assert len(back) == 1
        assert back[0][1:7] == tuple(row[k] for k in ("name", "doc", "at", "flag", "blob", "ratio"))
        assert back[0][7] == "plain"  # the column default, as Core binds it
    for names in (["a", "b", "c"], ["b"], [], ["a", "zz", "c", "c"]):
        same_as_core(engine, BY_NAMES, {"names": names}, setup=insert_rows)
    for pairs in ([("a", True), ("b", False)], [("c", None)], []):
        same_as_core(engine, BY_PAIRS, {"pairs": pairs}, setup=insert_rows)
    touched = same_as_core(
        engine,
        TOUCH,
        {"b_name": "a", "b_doc": {"new": [1, "two"]}, "b_at": datetime(2027, 1, 2, tzinfo=PARIS)},
        setup=insert_rows,
    )
    assert touched[0][3] is False
    same_as_core(engine, BUMP, {"b_name": "b"}, setup=insert_rows, returns=False)
