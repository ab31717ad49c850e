"""Abuse control's rows: the challenge-signing secret, spent challenges and fixed-window
rate counters (`csml.store.tables_abuse`). The rules (difficulty, limits, refusals) are
`csml.coordinator.abuse`'s; this module only reads and writes, in the caller's session.

Invariants:
- A server secret is made once per store: concurrent makers insert-or-ignore, and all
  read back the one that won.
- A window read with `lock=True` is locked (FOR UPDATE) for the rest of the transaction,
  so counts are exact across coordinators; `count_in_window` makes its window first.
- A spent challenge is recorded once: `spend_challenge` is False for a second spend,
  also by a concurrent transaction (which this one waits for on PostgreSQL).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from csml.store.db import insert_ignore
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


def make_windows(session: Session, keys: list[str], now: datetime) -> None:
    """Make the windows `keys` (empty, starting `now`) where missing; none is locked."""
    for key in keys:
        insert_ignore(session, RateWindow, key=key, window_start=now, count=0)


def window(session: Session, key: str, *, lock: bool) -> Window | None:
    """The window `key` as stored, or None; with `lock`, locked for the transaction."""
    row = session.get(RateWindow, key, with_for_update=lock, populate_existing=lock)
    return None if row is None else Window(row.window_start, row.count)


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


def count_in_window(
    session: Session, key: str, limit: int, seconds: float, now: datetime
) -> float | None:
    """Count one event in `key`'s fixed window of `seconds`, unless `limit` is reached:
    then return the seconds until the window resets (and count nothing). The row is
    locked (made if missing); the caller's transaction commits it."""
    row = session.get(RateWindow, key, with_for_update=True)
    if row is None:
        insert_ignore(session, RateWindow, key=key, window_start=now, count=0)
        row = session.get(RateWindow, key, with_for_update=True, populate_existing=True)
        assert row is not None
    ends = row.window_start + timedelta(seconds=seconds)
    if ends <= now:
        row.window_start, row.count = now, 0
        ends = now + timedelta(seconds=seconds)
    if row.count >= limit:
        return (ends - now).total_seconds()
    row.count += 1
    return None


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
