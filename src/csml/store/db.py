"""Engine and sessions for SQLite (embedded default) and PostgreSQL.

Invariants: a SQLite database is owner-only (0600, and so its -wal and -shm; see
`csml.store.private`), deletes overwrite what they free (`secure_delete`), and
`scrub_wal` moves the write-ahead log into the database and truncates it, so that
erased rows survive in no file (PostgreSQL's WAL, VACUUM and backups are its
operator's: see `scrub_wal`). The log is checkpointed into the database by the connection
whose commit takes it past 4,000 pages (`wal_autocheckpoint`; ~16 MiB of 4 KiB pages),
and restarts from its beginning once no reader needs it: its file grows to about that size
and stays there until `scrub_wal` truncates it.

Every engine made here counts what it sends (`StoreCounters`: statements, statements
by kind, write commits), so the coordinator's /metrics and the benchmarks can say what a
job costs the store. Counting is a few dictionary and integer increments per statement
and per commit; a statement's kind (`statement_kind`: its verb and first table, e.g.
"UPDATE jobs") is worked out once per distinct SQL string, and the kinds are few
(bounded by the statements in the code, not by the parameters).

Reads: `snapshot(engine)` is a read transaction (SQLite: a plain `BEGIN`, a WAL
snapshot that never waits for writers; PostgreSQL: the driver's `BEGIN`), for a read of
several statements that must agree. `read_each(engine)` runs every statement in its own
implicit transaction (SQLite autocommit, PostgreSQL `AUTOCOMMIT`): no `BEGIN`, no
`ROLLBACK`, no round trip for them; each statement is atomic and sees one committed
state, but two statements may see two. Use it for a read of one statement (or of
statements that need not agree); it never writes.
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy import exc as exc_module
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from csml.store.private import private_sqlite

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 7301
WRITE_OPTION = "csml_write"  # pg advisory lock key: one coordinator migrates at a time
EACH_OPTION = "csml_read_each"  # a read connection whose statements each commit alone


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'csml.db'}"


@dataclass
class StoreCounters:
    """What one engine has sent since it was made (monotonic; read without a lock, so a
    reader may see a count one statement behind)."""

    statements: int = 0
    write_commits: int = 0  # on SQLite in WAL with synchronous=FULL: one fsync each
    by_kind: dict[str, int] = field(default_factory=dict)


_VERB = re.compile(r"\s*(BEGIN(?: IMMEDIATE)?|SELECT|INSERT INTO|UPDATE|DELETE FROM|[A-Z]+)")
_TABLE = re.compile(r'(?:FROM|INTO|UPDATE)\s+"?([A-Za-z_][A-Za-z0-9_]*)')
_KINDS: dict[str, str] = {}
_KINDS_MAX = 4096  # distinct SQL strings remembered (IN-lists of many lengths are distinct)


def _outer_table(sql: str) -> str | None:
    """The first table the statement itself names (outside parentheses: a job load's
    files subquery in its select list is not what it reads), else the first named in a
    subquery (a statement of scalar subqueries only)."""
    found = list(_TABLE.finditer(sql))
    if not found:
        return None
    depth, at = 0, 0
    for match in found:
        for ch in sql[at : match.start()]:
            depth += ch == "("
            depth -= ch == ")"
        at = match.start()
        if depth == 0:
            return match.group(1)
    return found[0].group(1)


def statement_kind(sql: str) -> str:
    """A statement's verb and the first table it names: "SELECT job_files",
    "INSERT jobs", "BEGIN IMMEDIATE". Computed once per distinct string."""
    kind = _KINDS.get(sql)
    if kind is None:
        verb = _VERB.match(sql)
        name = verb.group(1).split()[0] if verb else "?"
        if verb and verb.group(1).startswith("BEGIN"):
            name = verb.group(1)
        table = _outer_table(sql)
        kind = f"{name} {table}" if table and not name.startswith("BEGIN") else name
        if len(_KINDS) >= _KINDS_MAX:
            _KINDS.clear()
        _KINDS[sql] = kind
    return kind


_COUNTERS: weakref.WeakKeyDictionary[Engine, StoreCounters] = weakref.WeakKeyDictionary()


def counters(engine: Engine) -> StoreCounters:
    """The counters of an engine made by `make_engine` (zeros for any other)."""
    return _COUNTERS.get(engine) or StoreCounters()


def _count(engine: Engine) -> None:
    tally = _COUNTERS.setdefault(engine, StoreCounters())

    @event.listens_for(engine, "before_cursor_execute")
    def _on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        tally.statements += 1
        kind = statement_kind(statement)
        tally.by_kind[kind] = tally.by_kind.get(kind, 0) + 1

    @event.listens_for(engine, "commit")
    def _on_commit(conn: Any) -> None:
        if conn.get_execution_options().get(WRITE_OPTION, False):
            tally.write_commits += 1


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            private_sqlite(Path(database))
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8
        )
        _tune_sqlite(engine)
    else:
        # LIFO: the connection returned last is checked out next, so reads keep using
        # the few connections in use (their server backends warm, psycopg's prepared
        # statements too) and those stay under `PING_IDLE_SECONDS` idle; FIFO rotated
        # every read through the whole pool, so the fewer reads a coordinator served
        # (one of several sharing the load), the more checkouts found a connection
        # idle long enough to need a ping.
        engine = create_engine(url, pool_size=10, max_overflow=20, pool_use_lifo=True)
        _ping_when_idle(engine)
    _count(engine)
    return engine


PING_IDLE_SECONDS = 1.0  # a pooled PostgreSQL connection idle this long is pinged first


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection at checkout only if it sat idle `PING_IDLE_SECONDS` or
    more (SQLAlchemy's `pool_pre_ping` pings at every checkout: a round trip and ~50 µs
    of CPU per read, most of a one-statement read's cost, for connections used a few
    milliseconds ago).

    Stale connections stay safe: a connection that idled (where a server restart, an
    idle-session timeout or a proxy drops it unseen) is pinged, and if the ping fails
    the pool is invalidated and a new connection is made, as `pool_pre_ping` does (the
    caller sees nothing). A connection used within the last second that died since
    (the server restarted under load) fails its statement once: SQLAlchemy invalidates
    it and every pooled connection older than the failure, so the following checkouts
    connect afresh (one failed request per connection then in use, as the writer's lane
    already fails one batch and reconnects: `csml.store.writer`)."""
    dialect = engine.dialect

    @event.listens_for(engine.pool, "checkin")
    def _idle_from(_dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine.pool, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < PING_IDLE_SECONDS:
            return  # fresh, or used a moment ago
        try:
            dialect.do_ping(dbapi_conn)
        except Exception as exc:  # dead: the pool reconnects (every older one too)
            raise exc_module.InvalidatePoolError() from exc


_IDLE_SINCE = "csml_idle_since"


def _tune_sqlite(engine: Engine) -> None:
    """WAL with full fsync, and write transactions that take the lock up front.

    pysqlite begins transactions lazily, so two connections may both read and
    then race to write; BEGIN IMMEDIATE makes each write transaction
    serialisable. Read-only sessions begin plainly and never wait for writers.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        # Checkpoint when the log holds 4,000 pages (SQLite's default: 1,000): a page
        # written many times between two checkpoints (the queue's, the counters', their
        # indexes') is copied into the database once per checkpoint: bench/writer.py's
        # no-op-sized writes wrote ~60 % fewer database pages and fsync'd the database 4x
        # less often (bench/README.md, session 17).
        cur.execute("PRAGMA wal_autocheckpoint=4000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA secure_delete=ON")  # erased rows do not linger in free pages
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Reads take no lock (WAL gives them a snapshot); writes lock up front; a
        # `read_each` connection stays in autocommit (the connection's
        # isolation_level is None: each statement is its own transaction).
        options = conn.get_execution_options()
        if options.get(EACH_OPTION, False):
            return
        begin = "BEGIN IMMEDIATE" if options.get(WRITE_OPTION, False) else "BEGIN"
        dbapi = conn.connection.dbapi_connection
        if dbapi is not None and not dbapi.in_transaction:
            conn._cursor_execute(_Script(dbapi), begin, ())  # see `_Script`
        else:  # a transaction already open: the driver's error, as before
            send_raw(conn, begin)


class _Script:
    """A DB-API cursor stand-in that sends one statement without parameters or rows by
    `executescript`, for SQLAlchemy's raw path (`Connection._cursor_execute`: counted by
    `StoreCounters`, seen by every `before_cursor_execute` listener, errors wrapped).

    Why (a SQLite BEGIN): pysqlite's `execute` lets go of the GIL four times for one
    statement (around `sqlite3_step`, `sqlite3_column_count`, `sqlite3_reset` and
    `sqlite3_last_insert_rowid`), `executescript` once (prepare, step and finalize in one
    go). A thread that lets go of the GIL while another thread waits for it (the event
    loop, for the writer thread: a busy coordinator's loop nearly always) waits for it
    again until that thread lets go in turn (its next blocking call, or Python's switch
    interval, 5 ms): a hand-off, a context switch each way. `executescript` COMMITs an
    open transaction first, so it is used only when the connection holds none (the
    caller checks `in_transaction`)."""

    __slots__ = ("dbapi",)

    def __init__(self, dbapi: Any) -> None:
        self.dbapi = dbapi

    def execute(self, statement: str, parameters: Any = ()) -> None:
        self.dbapi.executescript(statement)

    def close(self) -> None:
        pass


def send_raw(conn: Connection, statement: str) -> None:
    """Send a statement without parameters on the connection's DB-API cursor, through
    SQLAlchemy's raw path (`_cursor_execute`: counted by `StoreCounters` and seen by
    every `before_cursor_execute` listener, errors wrapped as `exec_driver_sql` would),
    without `exec_driver_sql`'s execution context and result (~4x the cost of the
    statement itself, for a BEGIN)."""
    cursor = conn.connection.cursor()
    try:
        conn._cursor_execute(cursor, statement, ())
    finally:
        cursor.close()


def scrub_wal(engine: Engine) -> bool:
    """On SQLite, copy every committed page from the write-ahead log into the database and
    truncate the log to zero bytes (`wal_checkpoint(TRUNCATE)`), so that rows deleted
    before this call survive in no file: the database overwrote them (`secure_delete`) and
    the log that held their earlier versions is empty. Waits (busy timeout) for readers
    of older snapshots; False if one still held the log, or on PostgreSQL, where the WAL,
    VACUUM, replicas and backups are the operator's to manage.
    """
    if engine.dialect.name != "sqlite":
        return False
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        busy, _, _ = cur.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        cur.close()
    finally:
        raw.close()
    return int(busy) == 0


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A pooled connection for a read whose statements see one committed state (a read
    transaction, begun at its first statement; never a write lock)."""
    with engine.connect() as conn:
        yield conn


@contextmanager
def read_each(engine: Engine) -> Iterator[Connection]:
    """A pooled connection for reads outside any explicit transaction: each statement
    is atomic and sees a committed state of its own (see the module docstring). No
    `BEGIN`/`ROLLBACK` is sent: on SQLite the connection is already in autocommit
    (`_tune_sqlite`) and its `begin` event sends nothing; on PostgreSQL the connection
    is switched to `AUTOCOMMIT` (a driver flag, reset when it goes back to the pool)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(**{EACH_OPTION: True})
        else:
            conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commits on success, rolls back on any error."""
    with factory() as session, session.begin():
        session.connection(execution_options={WRITE_OPTION: True})
        yield session


def insert_ignore(session: Session, model: type[Any], **values: Any) -> None:
    """INSERT that does nothing when the primary key exists (both backends)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        session.execute(pg_insert(model).values(**values).on_conflict_do_nothing())
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        session.execute(sqlite_insert(model).values(**values).on_conflict_do_nothing())


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision(s)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.connect() as conn:
        is_pg = conn.dialect.name == "postgresql"
        if is_pg:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "heads")
            conn.commit()
        finally:
            if is_pg:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
                conn.commit()


CONFLICT_SQLSTATES = ("40P01", "40001")  # deadlock detected, serialization failure


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` is PostgreSQL aborting a statement to break a deadlock (or a
    serialization failure): the operation's savepoint was rolled back, and running the
    operation again is safe and usually succeeds."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) in CONFLICT_SQLSTATES
