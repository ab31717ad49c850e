"""The writer: every write of the hot path goes through one `Writer`.

A write is an operation `op(conn) -> T` over a SQLAlchemy Core `Connection` that is
already inside a write transaction. `Writer.run(op)` (from any thread) and
`await Writer.run_async(op)` (from the event loop, without a thread-pool hop)
return `op`'s result only after the transaction that holds it has committed, so a
caller that answers 2xx after `run` returns never acknowledges a row that is not
on disk. If `op` raises, nothing it wrote is kept and the caller gets the error.

Operations must be short, touch only the store (no network, no file I/O that can
block for long), and must not call the writer themselves.

This first implementation gives each operation its own transaction (one commit, one
fsync on SQLite). Group commit replaces the inside of this class without changing
its contract: see the invariants it must keep in `GroupCommit` once it exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread
from sqlalchemy.engine import Connection, Engine

from csml.store.db import WRITE_OPTION

T = TypeVar("T")
WriteOp = Callable[[Connection], T]


class Writer:
    """Runs write operations durably against one engine (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, op: WriteOp[T]) -> T:
        """Run `op` in a write transaction; return its result once committed."""
        with self.engine.connect().execution_options(**{WRITE_OPTION: True}) as conn:
            with conn.begin():
                return op(conn)

    async def run_async(self, op: WriteOp[T]) -> T:
        """`run` for coroutines: the event loop keeps serving while `op` commits."""
        return await anyio.to_thread.run_sync(self.run, op)

    def close(self) -> None:
        """Stop accepting operations (those already accepted finish first)."""
