"""Abuse control's rows: the challenge-signing secret, spent challenges and fixed-window
rate counters (`csml.store.tables_abuse`). The rules (difficulty, limits, refusals) are
`csml.coordinator.abuse`'s; this module only reads and writes, in the caller's session.

Invariants:
- A server secret is made once per store: concurrent makers insert-or-ignore, and all
  read back the one that won.
- A window taken with `hold_window` (one upsert: made if missing) is locked for the rest
  of the transaction, so counts are exact across coordinators; `count_in_window` is one
  upsert that makes, restarts or counts its window and holds its row likewise (a second
  statement only to take back an event past the limit). `windows` reads without a lock.
- A spent challenge is recorded once: `spend_challenge` is False for a second spend,
  also by a concurrent transaction (which this one waits for on PostgreSQL).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from csml.store.db import insert_ignore
from csml.store.prepared import Prepared
from csml.store.tables_abuse import RateWindow, ServerSecret, UsedChallenge


@dataclass(frozen=True)
class Window:
    """A fixed window's start and how many events it counted."""

    start: datetime
    count: int


def server_secret(session: Session, name: str) -> str | None:
    return session.scalar(select(ServerSecret.value).where(ServerSecret.name == name))


def make_server_secret(session: Session, name: str, value: str, now: datetime) -> str:
    """Store `value` as secret `name` unless another was stored first; returns the one kept."""
    insert_ignore(session, ServerSecret, name=name, value=value, created_at=now)
    return session.scalars(select(ServerSecret.value).where(ServerSecret.name == name)).one()


def windows(session: Session, keys: list[str]) -> dict[str, Window]:
    """The windows `keys` as stored (those that exist), in one statement; none locked."""
    stmt = select(RateWindow.key, RateWindow.window_start, RateWindow.count).where(
        RateWindow.key.in_(keys)
    )
    return {key: Window(start, count) for key, start, count in session.execute(stmt)}


def _hold_upsert(dialect: str) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    upsert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = RATE_WINDOWS
    stmt = upsert(table).values(key=bindparam("b_key"), window_start=bindparam("b_now"), count=0)
    return stmt.on_conflict_do_update(
        index_elements=[table.c.key], set_={"count": table.c.count}
    ).returning(table.c.window_start, table.c.count)


def hold_window(session: Session, key: str, now: datetime) -> Window:
    """The window `key`, made (empty, starting `now`) if missing, and locked for the
    rest of the transaction (ON CONFLICT DO UPDATE locks the row on PostgreSQL; the
    write transaction holds SQLite), in one statement."""
    stmt = _HOLD_UPSERT[session.get_bind().dialect.name]
    start, count = session.execute(stmt, {"b_key": key, "b_now": now}).one()
    return Window(start, int(count))


def set_window(session: Session, key: str, start: datetime, count: int) -> None:
    """Restart or roll over the (locked) window `key`."""
    session.execute(
        update(RateWindow).where(RateWindow.key == key).values(window_start=start, count=count)
    )


def add_to_window(session: Session, key: str, n: int = 1) -> None:
    """Count `n` more events in the (locked) window `key`."""
    session.execute(
        update(RateWindow).where(RateWindow.key == key).values(count=RateWindow.count + n)
    )


def _window_upsert(dialect: str) -> Any:
    """Count one event in a window: made if missing (starting now, count 1), restarted if
    it ended by now (start now, count 1), else count + 1; returns the window as counted.
    (Both SET expressions read the row as it was: SQL assigns simultaneously.)"""
    from sqlalchemy.dialects import postgresql, sqlite

    upsert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = RATE_WINDOWS
    now = bindparam("b_now", type_=table.c.window_start.type)
    ended = table.c.window_start <= bindparam("b_cutoff", type_=table.c.window_start.type)
    stmt = upsert(table).values(key=bindparam("b_key"), window_start=now, count=1)
    return stmt.on_conflict_do_update(
        index_elements=[table.c.key],
        set_={
            "window_start": case((ended, now), else_=table.c.window_start),
            "count": case((ended, 1), else_=table.c.count + 1),
        },
    ).returning(table.c.window_start, table.c.count)


RATE_WINDOWS = cast(Table, RateWindow.__table__)
_WINDOW_UPSERT = {dialect: _window_upsert(dialect) for dialect in ("postgresql", "sqlite")}
# `count_in_window`'s upsert on PostgreSQL, for a caller that sends it with others
# (`csml.store.jobs_write.locked_insert_job`); its count stands only if the caller's
# transaction commits, so past the limit that caller fails its write (no take-back).
WINDOW_COUNT_PG = Prepared(_WINDOW_UPSERT["postgresql"])
_HOLD_UPSERT = {dialect: _hold_upsert(dialect) for dialect in ("postgresql", "sqlite")}
_UNCOUNT = (
    update(RATE_WINDOWS)
    .where(RATE_WINDOWS.c.key == bindparam("b_key"))
    .values(count=RATE_WINDOWS.c.count - 1)
)


def count_in_window(
    session: Session | Connection, key: str, limit: int, seconds: float, now: datetime
) -> float | None:
    """Count one event in `key`'s fixed window of `seconds`, unless `limit` is reached:
    then return the seconds until the window resets (and count nothing). One upsert
    (made if missing, restarted if it ended, counted), which holds the row until the
    caller's transaction ends (PostgreSQL: ON CONFLICT DO UPDATE locks it; SQLite: the
    write transaction holds the database), so counts are exact across coordinators; past
    the limit a second statement takes the count back. The caller's transaction commits."""
    dialect = session.get_bind().dialect.name if isinstance(session, Session) else None
    dialect = dialect or cast(Connection, session).dialect.name
    params = window_params(key, seconds, now)
    start, count = session.execute(_WINDOW_UPSERT[dialect], params).one()
    wait = window_wait(start, count, limit, seconds, now)
    if wait is not None:
        session.execute(_UNCOUNT, {"b_key": key})
    return wait


def window_params(key: str, seconds: float, now: datetime) -> dict[str, Any]:
    """The bound values of `WINDOW_COUNT_PG` (`count_in_window`'s upsert)."""
    return {"b_key": key, "b_now": now, "b_cutoff": now - timedelta(seconds=seconds)}


def window_wait(
    start: datetime, count: int, limit: int, seconds: float, now: datetime
) -> float | None:
    """None if the window as counted (`start`, `count`) is within `limit`, else the
    seconds until it resets (then the count must not stand: roll it back, or take it
    back as `count_in_window` does)."""
    if int(count) <= limit:
        return None
    ends: datetime = start + timedelta(seconds=seconds)
    return (ends - now).total_seconds()


def spend_challenge(session: Session, digest: str, expires: datetime) -> bool:
    """Record a challenge (by its digest) as used until `expires`; False if it already was."""
    insert: Any
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = (
        insert(UsedChallenge)
        .values(digest=digest, expires_at=expires)
        .on_conflict_do_nothing()
        .returning(UsedChallenge.digest)
    )
    return session.execute(stmt).first() is not None
