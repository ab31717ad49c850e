"""Prepared statements: the hot path's Core statements sent on the DB-API cursor.

SQLAlchemy Core's per-execution machinery (compile-cache lookup, `_init_compiled`,
parameter processing, `CursorResult` and `Row` wrapping) costs ~3x what SQLite itself
spends on a short statement. A `Prepared` keeps the existing Core construct and asks
SQLAlchemy to render it once per dialect (and per set of parameter names and lengths of
the expanding IN-lists: a "plan"); each call then only orders the caller's values,
applies the bind processors SQLAlchemy chose for their types, sends the SQL with
`Connection._cursor_execute` (the path SQLAlchemy itself uses for raw statements) and
applies the result processors to plain tuples.

Invariants:

- The SQL is SQLAlchemy's rendering of the construct for the connection's dialect,
  with bound parameters only (`construct_expanded_state`, as an execution renders it);
  nothing of a caller's values is ever put into the SQL text.
- Values are processed by the same processors SQLAlchemy uses for the statement's
  types (bind: `construct_expanded_state().processors`; result: each returned column's
  type's `result_processor` for the driver's column type code), so JSON, timestamps,
  booleans and bytes go in and come back exactly as through `Connection.execute`
  (`tests/unit/test_prepared.py` compares the two on SQLite, and
  `tests/integration/postgres/test_prepared_pg.py` on PostgreSQL).
- Every statement goes through the engine's `before_cursor_execute` listeners (so the
  `StoreCounters` of `csml.store.db`, `/metrics`' `csml_store_statements_*`, count it
  with its kind) and its errors through SQLAlchemy's handling (wrapped as
  `sqlalchemy.exc.DBAPIError` with `.orig`, the connection invalidated on a
  disconnect), like any other; an error the driver raises after the send (a fetch, a
  pipeline's Sync) is wrapped and invalidates the same way, by SQLAlchemy's public API
  (`_raise_as_execute`; only this connection is invalidated, not the whole pool).
- A statement runs in the connection's transaction; on a connection in none it begins
  one as `Connection.execute` would (autobegin: the dialect's `begin` event decides
  what that sends, e.g. nothing on a `read_each` connection).
- Python-side column defaults are supported only when scalar (a constant), which is
  what SQLAlchemy computes for them at execution; anything else (and `literal_execute`
  parameters, which SQLAlchemy renders into the SQL) is refused when the plan is made
  (`TypeError`), never silently different. One row of parameters per call: there is
  no executemany.
- `rows_together` sends several statements in one round trip (libpq's pipeline mode,
  PostgreSQL): each still runs on its own, in order, with its own snapshot; the first
  error stops those after it and is raised as `rows` would raise it.
- Plans are few: one per call site's parameter names and IN-list length, and IN-lists
  are padded to a power of two (`padded`: the same rows); at most `PLANS_MAX` per
  statement, then forgotten and made again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any, NoReturn, cast

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import ClauseElement, Executable, visitors
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter

PLANS_MAX = 64

_Processor = Callable[[Any], Any]


class _Mark:
    """Stands for a caller's value while a plan is made: where it comes from."""

    __slots__ = ("index", "key", "sub")

    def __init__(self, key: str, index: int | None, sub: int | None) -> None:
        self.key, self.index, self.sub = key, index, sub


class _Plan:
    """One rendering: the SQL, where each bound value comes from, the result processors."""

    __slots__ = ("args", "constants", "getter", "named", "processors", "results", "sql")

    def __init__(
        self, sql: str, named: tuple[str, ...] | None, args: list[tuple[Any, ...]]
    ) -> None:
        self.sql = sql
        self.named = named  # the parameter names (named paramstyle), None: positional
        # per bound value: (key, index, sub, processor) or (None, constant)
        self.args = args
        self.results: list[tuple[int, _Processor]] | None = None  # made at first rows
        # Without IN-lists, the values are picked in one C call (`itemgetter`) from the
        # caller's mapping merged over the constants, then the processors applied.
        self.getter: Callable[[Mapping[str, Any]], Any] | None = None
        self.constants: dict[str, Any] = {}
        self.processors: list[tuple[int, _Processor]] = []
        if all(source[0] is None or source[1] is None for source in args):
            keys: list[str] = []
            for i, source in enumerate(args):
                if source[0] is None:
                    keys.append(f" constant {i}")  # no parameter has a space in its name
                    self.constants[keys[-1]] = source[1]
                else:
                    keys.append(source[0])
                    if source[3] is not None:
                        self.processors.append((i, source[3]))
            if len(keys) >= 2:
                self.getter = itemgetter(*keys)
            elif keys:
                only = keys[0]
                self.getter = lambda values: (values[only],)
            else:
                self.getter = lambda _values: ()

    def values(self, params: Mapping[str, Any]) -> list[Any]:
        """The values to send, in the SQL's order, processed."""
        if self.getter is not None:
            values = list(self.getter({**self.constants, **params} if self.constants else params))
            for i, proc in self.processors:
                values[i] = proc(values[i])
            return values
        values = []
        for source in self.args:
            if source[0] is None:
                values.append(source[1])
                continue
            name, index, sub, proc = source
            value = params[name]
            if index is not None:
                value = value[index]
                if sub is not None:
                    value = value[sub]
            values.append(value if proc is None else proc(value))
        return values


class Prepared:
    """A Core statement executed on the DB-API cursor (see the module docstring)."""

    __slots__ = ("_expanding", "_lock", "_plans", "stmt")

    def __init__(self, stmt: Executable) -> None:
        self.stmt = stmt
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        # The names of the IN-lists a caller gives (named expanding parameters, wherever
        # they are in it; a literal list, `col.in_([...])`, is an anonymous constant).
        self._expanding = tuple(
            sorted(
                {
                    bind.key
                    for bind in visitors.iterate(cast(ClauseElement, stmt))
                    if isinstance(bind, BindParameter) and bind.expanding and not bind.unique
                }
            )
        )
        self._lock = threading.Lock()

    # -- calls -------------------------------------------------------------------------

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Execute; the rows it returns, as tuples of processed values."""
        cursor, plan = self._send(conn, params)
        return self._read(conn, cursor, plan)

    def _read(self, conn: Connection, cursor: Any, plan: _Plan) -> list[tuple[Any, ...]]:
        """The rows of `plan` executed on `cursor`, processed; closes the cursor."""
        try:
            try:
                raw = cursor.fetchall()
            except BaseException as exc:
                _raise_as_execute(conn, exc, plan.sql, cursor)
            results = plan.results
            if results is None:
                results = plan.results = self._result_processors(conn.dialect, cursor)
            if not results:
                return [tuple(r) for r in raw]
            out = []
            for r in raw:
                row = list(r)
                for i, proc in results:
                    row[i] = proc(row[i])
                out.append(tuple(row))
            return out
        finally:
            cursor.close()

    def first(self, conn: Connection, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        found = self.rows(conn, params)
        return found[0] if found else None

    def scalar(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """The first column of the first row, or None when there is no row."""
        found = self.rows(conn, params)
        return found[0][0] if found else None

    def run(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Execute a statement that returns no rows; the rows it changed."""
        cursor, _plan = self._send(conn, params)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    # -- execution ---------------------------------------------------------------------

    def _send(self, conn: Connection, params: Mapping[str, Any]) -> tuple[Any, _Plan]:
        dialect = conn.dialect
        expanding = self._expanding
        if expanding:
            params = padded(params, expanding)
        key = (dialect, tuple(params), *[len(params[k]) for k in expanding])
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(dialect, params)
        values = plan.values(params)
        args: Any = (
            dialect.execute_sequence_format(values)
            if plan.named is None
            else dict(zip(plan.named, values, strict=True))
        )
        if not conn.in_transaction():
            conn.begin()  # as Connection.execute's autobegin
        cursor = conn.connection.cursor()
        try:
            conn._cursor_execute(cursor, plan.sql, args)
        except BaseException:
            cursor.close()
            raise
        return cursor, plan

    # -- plans -------------------------------------------------------------------------

    def _compile(self, dialect: Dialect, params: Mapping[str, Any]) -> SQLCompiler:
        # As an execution compiles it: the parameters' names as column keys (an INSERT
        # or UPDATE sets the columns named so).
        compiled = cast(ClauseElement, self.stmt).compile(
            dialect=dialect, column_keys=sorted(params)
        )
        assert isinstance(compiled, SQLCompiler)
        return compiled

    def _plan(self, dialect: Dialect, params: Mapping[str, Any]) -> _Plan:
        compiled = self._compile(dialect, params)
        if compiled.literal_execute_params:  # rendered into the SQL from the values
            raise TypeError("statements with literal_execute parameters are not prepared")
        expanding = self._expanding
        key = (dialect, tuple(params), *[len(params[k]) for k in expanding])
        marked: dict[str, Any] = {}
        for name, value in params.items():
            if name in expanding:
                width = len(value[0]) if value and isinstance(value[0], tuple | list) else None
                marked[name] = [
                    _Mark(name, i, None)
                    if width is None
                    else tuple(_Mark(name, i, j) for j in range(width))
                    for i in range(len(value))
                ]
            else:
                marked[name] = _Mark(name, None, None)
        for column in (*compiled.insert_prefetch, *compiled.update_prefetch):
            if column.key in params:
                continue
            default = column.default
            if default is None or not getattr(default, "is_scalar", False):
                raise TypeError(f"{column.key}: only scalar column defaults are prepared")
            marked[column.key] = cast(Any, default).arg  # the constant an execution binds
        # As an execution does (`DefaultExecutionContext._init_compiled`): parameters by
        # their unescaped names, the statement's processors and the expanded ones'.
        state = compiled.construct_expanded_state(marked, escape_names=False)
        processors = cast(dict[str, Any], {**compiled._bind_processors, **state.processors})
        names = state.positiontup if compiled.positional else list(state.parameters)
        assert names is not None
        args: list[tuple[Any, ...]] = []
        for name in names:
            value = state.parameters[name]
            proc = processors.get(name)
            if isinstance(value, _Mark):
                args.append((value.key, value.index, value.sub, proc))
            else:
                args.append((None, value if proc is None else proc(value)))
        if not compiled.positional:
            escaped = compiled.escaped_bind_names
            names = [escaped.get(name, name) for name in names]
        plan = _Plan(state.statement, None if compiled.positional else tuple(names), args)
        with self._lock:
            if len(self._plans) >= PLANS_MAX:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def padded(self, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """`params` with their IN-lists as this statement sends them (see `padded`)."""
        return padded(params, self._expanding)

    def _result_processors(self, dialect: Dialect, cursor: Any) -> list[tuple[int, _Processor]]:
        """(column index, processor) of the returned columns that have one, for the
        driver's type codes in `cursor.description` (as SQLAlchemy's result does)."""
        columns: Sequence[Any] = list(self.stmt.exported_columns)  # type: ignore[attr-defined]
        description = cursor.description or ()
        procs: list[tuple[int, _Processor]] = []
        for i, (column, described) in enumerate(zip(columns, description, strict=True)):
            proc = column.type.dialect_impl(dialect).result_processor(dialect, described[1])
            if proc is not None:
                procs.append((i, proc))
        return procs


def padded(params: Mapping[str, Any], expanding: Sequence[str]) -> Mapping[str, Any]:
    """`params` with each IN-list (the `expanding` ones) of more than one element grown
    to the next power of two by repeating its last element: `x IN (a, b, c, c)` is
    `x IN (a, b, c)` (and NOT IN likewise: expanding parameters exist only in IN and
    NOT IN), and a statement then has a few plans (rendered SQL strings, and prepared
    statements on PostgreSQL) instead of one per length, e.g. up to 10 for the 500 ids
    of an event stream's `changed` instead of 500."""
    grown: dict[str, Any] | None = None
    for name in expanding:
        values = params[name]
        n = len(values)
        if n > 2 and n & (n - 1):
            if grown is None:
                grown = dict(params)
            grown[name] = [*values, *[values[-1]] * ((1 << n.bit_length()) - n)]
    return params if grown is None else grown


def rows_together(
    conn: Connection, calls: Sequence[tuple[Prepared, Mapping[str, Any]]]
) -> list[list[tuple[Any, ...]]]:
    """Execute `calls` in order, in the connection's transaction, and return each one's
    rows (as `Prepared.rows`). On PostgreSQL (psycopg 3 with libpq's pipeline mode) they
    go out together and their answers come back together: one round trip, not one per
    statement. The server still runs them one after the other, each in the order sent and,
    in READ COMMITTED, with a snapshot taken when it starts (after the statements before
    it finished: a lock taken by one is held when the next one reads). If one fails, those
    after it are not run, and the first error is raised (wrapped as `Connection.execute`
    would: `sqlalchemy.exc.DBAPIError`), leaving the transaction aborted as a failed
    statement would. Elsewhere (SQLite), the statements are simply run one by one."""
    dbapi = conn.connection.dbapi_connection
    pipeline = getattr(dbapi, "pipeline", None)
    if pipeline is None or len(calls) < 2:
        return [prepared.rows(conn, params) for prepared, params in calls]
    if not conn.in_transaction():
        conn.begin()  # as Connection.execute's autobegin
    sent: list[tuple[Prepared, Any, _Plan]] = []
    try:
        try:
            with pipeline():  # its end sends a Sync and reads every answer
                for prepared, params in calls:
                    cursor, plan = prepared._send(conn, params)
                    sent.append((prepared, cursor, plan))
        except DBAPIError:
            raise  # a statement's own error, wrapped by `_cursor_execute` already
        except BaseException as exc:
            _raise_as_execute(conn, exc, "; ".join(plan.sql for _, _, plan in sent), None)
        return [prepared._read(conn, cursor, plan) for prepared, cursor, plan in sent]
    finally:
        for _, cursor, _ in sent:
            cursor.close()


def _raise_as_execute(conn: Connection, exc: BaseException, sql: str, cursor: Any) -> NoReturn:
    """Raise `exc`, raised by the driver outside `Connection._cursor_execute` (a
    pipeline's Sync, a fetch), as `Connection.execute` raises what fails in it, by
    SQLAlchemy's public API: a DB-API error wrapped by `DBAPIError.instance` (the
    dialect's subclass, e.g. `IntegrityError`, with `.orig`), after invalidating the
    connection when the dialect calls it a disconnect (`Dialect.is_disconnect`:
    `connection_invalidated` is then True and the next use reconnects); an exit
    exception (KeyboardInterrupt, a cancelled task: the connection's state unknown
    mid-exchange) invalidates the connection and goes on as it is; another exception is
    wrapped as `StatementError`, one that already is one goes on as it is. Unlike
    SQLAlchemy's own handler it runs no `handle_error` listeners (the store has none) and
    invalidates only this connection, not every pooled one older than the failure:
    another dead one fails its own next statement, or its ping (`csml.store.db`)."""
    dialect = conn.dialect
    base = dialect.loaded_dbapi.Error
    if isinstance(exc, base):
        dropped = (
            not conn.closed
            and not conn.invalidated
            and dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
        )
        if dropped:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            sql, None, exc, base, connection_invalidated=dropped, dialect=dialect
        ) from exc
    if not isinstance(exc, Exception):  # an exit exception
        if not conn.closed and not conn.invalidated:
            conn.invalidate(exc)
        raise exc
    if isinstance(exc, StatementError):
        raise exc
    raise DBAPIError.instance(sql, None, exc, base, dialect=dialect) from exc
