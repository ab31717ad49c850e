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

from csml import ids
from csml.store import jobs as store
from csml.store import jobs_end, jobs_write
from csml.store.db import counters
from csml.store.jobs import FileRow
from csml.store.prepared import Prepared
from csml.store.tables import UTCDateTime, utcnow

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
        sent.append((statement, comparable(parameters)))

    sa_event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa_event.remove(engine, "before_cursor_execute", record)


def comparable(value: Any) -> Any:
    """A driver value as something `==` compares by content: psycopg's `Json` and `Binary`
    wrappers (what SQLAlchemy's bind processors hand it) compare by identity."""
    if hasattr(value, "obj") and type(value).__module__.startswith("psycopg"):
        return (type(value), comparable(value.obj), getattr(value, "dumps", None))
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(comparable(v) for v in value)
    return value


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
    differ: set[int] = frozenset(),  # type: ignore[assignment]
    rowcount: bool = True,
) -> list[tuple[Any, ...]]:
    """Run `stmt` once by `Connection.execute` and once as a `Prepared`, each in a
    transaction rolled back afterwards (after `setup`, which may write), and assert they
    sent the same SQL and driver parameters, returned the same rows (and row count), and
    counted the same statements and kinds. Core is given the IN-lists as the `Prepared`
    pads them (`Prepared.padded`); that padding changes no row is checked too. The rows.
    `differ`: columns left out of the rows' comparison (values drawn from a sequence).
    `rowcount=False`: the row counts are not compared (Core reports -1 for an INSERT on
    psycopg, where the driver, which `Prepared.run` returns, says 1)."""
    outcomes = []
    fast = Prepared(stmt)
    for way in ("core", "prepared", "unpadded"):
        with engine.connect() as conn:
            conn.begin()
            if setup is not None:
                setup(conn)
            tally = counters(engine)
            statements, kinds = tally.statements, dict(tally.by_kind)
            with recorded(engine) as sent:
                if way != "prepared":
                    given = dict(params if way == "unpadded" else fast.padded(params))
                    result = conn.execute(stmt, given)
                    rows = [tuple(r) for r in result] if returns else []
                    count = None if returns else result.rowcount
                else:
                    if returns:
                        rows, count = fast.rows(conn, params), None
                    else:
                        rows, count = [], fast.run(conn, params)
            counted = tally.statements - statements
            grown = {k: v - kinds.get(k, 0) for k, v in tally.by_kind.items() if v != kinds.get(k)}
            conn.rollback()
        kept = [[v for i, v in enumerate(row) if i not in differ] for row in rows]
        outcomes.append((sent, typed(kept), count, counted, grown))
    core, prepared, unpadded = outcomes
    assert unpadded[1:] == core[1:], "padded IN-lists changed the rows"
    assert prepared[0] == core[0], f"SQL or driver parameters differ: {core[0]} != {prepared[0]}"
    assert prepared[1] == core[1], f"rows differ: {core[1]} != {prepared[1]}"
    assert not rowcount or prepared[2] == core[2], "row counts differ"
    assert prepared[3:] == core[3:] == (1, prepared[4]), "counters differ"
    return rows


def check_round_trips(engine: Engine) -> None:
    """Inserts, selects (expanding and tuple IN-lists, empty ones too) and updates of every
    type the store uses come out as through Core."""
    for row in ROWS:
        # The seq comes from a sequence on PostgreSQL, which a rollback does not rewind.
        back = same_as_core(engine, INSERT, row, differ={0})
        assert len(back) == 1
        assert back[0][1:7] == tuple(row[k] for k in ("name", "doc", "at", "flag", "blob", "ratio"))
        assert back[0][7] == "plain"  # the column default, as Core binds it
    with engine.connect() as conn:  # committed: each check below rolls back what it writes
        for row in ROWS:
            conn.execute(insert(THINGS), row)
        conn.commit()
    for names in (["a", "b", "c"], ["b"], [], ["a", "zz", "c", "c"]):
        same_as_core(engine, BY_NAMES, {"names": names})
    for pairs in ([("a", True), ("b", False)], [("c", None)], []):
        same_as_core(engine, BY_PAIRS, {"pairs": pairs})
    touched = same_as_core(
        engine,
        TOUCH,
        {"b_name": "a", "b_doc": {"new": [1, "two"]}, "b_at": datetime(2027, 1, 2, tzinfo=PARIS)},
    )
    assert touched[0][3] is False
    same_as_core(engine, BUMP, {"b_name": "b"}, returns=False)


# -- the store's hot statements ------------------------------------------------------


def _new_job(owner: str, fair_rank: int) -> jobs_write.NewJob:
    return jobs_write.NewJob(
        id=ids.new_id(),
        owner_id=owner,
        app="echo",
        operation="echo",
        params={"n": fair_rank, "text": "é☃"},
        limits={"cpu_seconds": 5},
        fair_rank=fair_rank,
        created_at=utcnow(),
        max_attempts=3,
    )


FILE = FileRow("input", "a.bin", 3, "ab" * 32, "application/octet-stream", "blob1")


def check_store_statements(engine: Engine, owner: str, worker: str, job_id: str) -> None:
    """Each of the store's `Prepared` hot statements against Core, on a store where
    `owner` has the queued echo job `job_id` and `worker` is a live echo worker. Two
    more jobs (one with an input file) are queued and committed first; each check then
    runs in a transaction rolled back (so both ways see the same rows; sequences, which
    a rollback does not rewind, are used by the job insert only)."""
    dialect = engine.dialect.name
    now = utcnow()
    later = now + timedelta(seconds=30)
    lease = ids.new_id()
    with engine.connect() as conn:
        conn.begin()
        for new, files in ((_new_job(owner, 5), [FILE]), (_new_job(owner, 6), [])):
            jobs_write.insert_job(conn, new, files, None)
        conn.commit()

    def taken(conn: Connection) -> None:
        got = jobs_write.take(conn, worker, "echo", 3, lease, now, later)
        assert job_id in {c.id for c in got} and len(got) == 3

    take = {
        "b_worker": worker,
        "b_app": "echo",
        "max_jobs": 3,
        "b_lease": lease,
        "b_until": later,
        "b_now": now,
        "b_met": [],
    }
    plain = jobs_write._take_statement("plain", False, False, False).stmt
    rows = same_as_core(engine, plain, take)
    assert len(rows) == 3
    credited = jobs_write._take_statement("credited", False, False, False).stmt
    assert same_as_core(engine, credited, take) == []  # nobody has credit
    warm = {**take, "b_warm": ["w1", "w2"], "b_window": 8}
    same_as_core(engine, jobs_write._take_statement("warm", False, False, False).stmt, warm)
    # The input files come back with the claim (one JSON array per job): only the job
    # queued with one has any.
    assert sorted(len(store.files_of(r[11])) for r in rows) == [0, 0, 1]
    assert [f for r in rows for f in store.files_of(r[11])] == [FILE]
    same_as_core(engine, jobs_write._SERVE.stmt, {"b_app": "echo", "b_top": 6}, returns=False)
    one_file = {
        "job_seq": rows[0][0],
        **{k: getattr(FILE, k) for k in ("kind", "size", "sha256", "media_type", "blob")},
        "name": "b.bin",
        "model_id": None,
    }
    same_as_core(engine, jobs_write._INSERT_FILE.stmt, one_file, returns=False, rowcount=False)
    stamp = {"worker_id": worker, "b_now": now}
    same_as_core(engine, jobs_write._STAMP_WORKER.stmt, stamp, returns=False)
    rank = {"b_app": "echo", "b_owner": owner}
    same_as_core(engine, jobs_write._RANK_UPSERT[dialect].stmt, rank)
    new = _new_job(owner, 9)
    insert_params = {
        "id": new.id,
        "owner_id": owner,
        "app": "echo",
        "operation": "echo",
        "params": new.params,
        "limits": new.limits,
        "state": "queued",
        "fair_rank": 9,
        "created_at": now,
        "attempts": 0,
        "max_attempts": 3,
        "progress_fraction": 0.0,
        "progress_message": "",
        "requires_key": None,
        "warm_key": None,
        "trusted_only": False,
        "min_reputation": None,
        "verify_runs": 0,
    }
    same_as_core(engine, jobs_write._INSERT_JOB.stmt, insert_params, differ={0})
    beats = {"leases": [(job_id, lease), (job_id, "other")], "b_worker": worker, "b_until": later}
    held = same_as_core(engine, jobs_write._EXTEND.stmt, beats, setup=taken)
    assert [r[0] for r in held] == [job_id]
    same_as_core(engine, store._LEASES.stmt, {"ids": [job_id, "nope"]}, setup=taken)
    for ended in ("succeeded", "failed"):
        end: dict[str, Any] = {
            "b_job": job_id,
            "b_lease": lease,
            "b_worker": worker,
            "b_state": ended,
            "b_now": later,
            "b_error": None if ended == "succeeded" else "it broke",
            "b_result": {"ok": [1, 2.5], "ü": None} if ended == "succeeded" else None,
            "b_models": [] if ended == "succeeded" else ["train"],
        }
        statement = jobs_end._end_held_statement(ended == "succeeded").stmt
        [back] = same_as_core(engine, statement, end, setup=taken)
        assert store.plain_row(back).state == ended
    # Several completions in one statement (`end_held_many`): two ended, one with a lease
    # that is not the job's left as it is; the rows it returns come back by id.
    many: dict[str, Any] = {"b_worker": worker, "b_now": later, "b_models": ["train"]}
    for i, (r, state, held_lease) in enumerate(
        zip(rows, ("succeeded", "failed", "succeeded"), (lease, lease, "other"), strict=True)
    ):
        many |= {f"j{i}": r[1], f"l{i}": held_lease, f"s{i}": state}
        many |= {f"r{i}": {"i": i, "ü": [True]} if state == "succeeded" else None}
        many |= {f"e{i}": "it broke" if state == "failed" else None}
    statement = jobs_end._end_held_many_statement(3).stmt
    ended_many = [store.plain_row(b) for b in same_as_core(engine, statement, many, setup=taken)]
    assert sorted((e.id, e.state) for e in ended_many) == sorted(
        [(rows[0][1], "succeeded"), (rows[1][1], "failed")]
    )
    for locking in (jobs_end._TO_COMPLETE, jobs_end._LOCK_TO_COMPLETE):
        ids_ = {"ids": [job_id, "nope", *[r[1] for r in rows]]}  # 4 ids: padded to 4
        locked = same_as_core(engine, locking.stmt, ids_, setup=taken)
        assert len(locked) == 3 and all(r[5] == "running" for r in locked)
    ending = jobs_end._end_statement(("error", "finished_at", "result", "state"))
    finish = {
        "b_error": None,
        "b_finished_at": later,
        "b_result": {"r": [True, None]},
        "b_state": "succeeded",
        "job_seq": rows[0][0],
    }
    same_as_core(engine, ending.stmt, finish, setup=taken, returns=False)
    probe = store._probe(False, False, False).stmt
    for met in ([], ["k1", "k2"]):
        [(head_seq, _newest)] = same_as_core(
            engine, probe, {"worker_id": worker, "app": "echo", "met": met}
        )
        assert head_seq is not None
    owned = {"owner_id": owner, "ident": job_id}
    for statement in (store._OWNED[True].stmt, store._OWNED_LOCKED[True].stmt):
        [loaded] = same_as_core(engine, statement, owned, setup=taken)
        assert store._job(loaded).id == job_id
    same_as_core(engine, store._OWNED[False].stmt, {**owned, "ident": job_id[:12] + "%"})
    same_as_core(engine, store._BY_ID.stmt, {"job_id": job_id})
    changed = {"owner_id": owner, "keys": [job_id, "nope"]}
    same_as_core(engine, store._OWNED_IN["id"].stmt, changed, setup=taken)
