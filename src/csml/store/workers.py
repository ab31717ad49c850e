"""The worker registry's rows: join tokens, workers (as their tokens authenticate them)
and the public keys confidential workers register.

Functions take the caller's `Session` (cold paths: the operator's routes and commands,
registration) or a Core `Connection` (the hot path: `worker_by_token`, one statement per
uncached worker request) and return frozen rows, never ORM objects.

Invariants:
- Only hashes of tokens are stored or looked up; a token itself never reaches the store.
- Revoking a join token (`revoke_join_token`) stops every live worker that joined with it
  in the same transaction; the caller withdraws the catalog versions only it vouched for
  (`csml.store.apps.withdraw_token`) before committing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from csml import ids
from csml.store.db import insert_ignore
from csml.store.tables import JoinToken, Worker
from csml.store.tables_confidential import WorkerKey


@dataclass(frozen=True)
class JoinTokenRow:
    """A join token as stored (its hash aside)."""

    id: str
    label: str
    created_at: datetime
    revoked_at: datetime | None
    apps: list[str] | None  # None: any app (tokens made before apps were bound)
    may_publish: bool
    contributor_id: str | None = None  # a contributed token: the identity that made it

    def allows(self, app: str) -> bool:
        return self.apps is None or app in self.apps


@dataclass(frozen=True)
class WorkerRow:
    """A registered worker (its token's hash aside)."""

    id: str
    join_token_id: str
    app: str
    app_version: str | None
    slots: int
    sandbox: str
    registered_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None
    labels: dict[str, Any] | None = None  # placement: announced at registration
    # verify: its record (`csml.coordinator.verification`).
    agreements: int = 0
    disagreements: int = 0
    quarantined_at: datetime | None = None
    # credit, verify: the identity that contributed it (its join token's), None for the
    # operator's; read only by `worker_by_token` (the worker a request authenticates as).
    contributor_id: str | None = None


@dataclass(frozen=True)
class WorkerAuth:
    """What a worker token opens: the worker and whether its join token was revoked."""

    worker: WorkerRow
    revoked_at: datetime | None


@dataclass(frozen=True)
class WorkerKeyRow:
    """A live worker of an app with the key and evidence it registered."""

    worker: WorkerRow
    kind: str
    public_key: str
    evidence: str
    collateral: dict[str, Any] | None


_JOIN_COLUMNS = (
    JoinToken.id,
    JoinToken.label,
    JoinToken.created_at,
    JoinToken.revoked_at,
    JoinToken.apps,
    JoinToken.may_publish,
    JoinToken.contributor_id,
)
_WORKER_COLUMNS = (
    Worker.id,
    Worker.join_token_id,
    Worker.app,
    Worker.app_version,
    Worker.slots,
    Worker.sandbox,
    Worker.registered_at,
    Worker.last_heartbeat,
    Worker.stopped_at,
    Worker.labels,
    Worker.agreements,
    Worker.disagreements,
    Worker.quarantined_at,
)
_by_token = (
    select(*_WORKER_COLUMNS, JoinToken.revoked_at, JoinToken.contributor_id)
    .join(JoinToken, JoinToken.id == Worker.join_token_id)
    .where(Worker.token_hash == bindparam("token_hash"))
)


def _join_row(row: Any) -> JoinTokenRow:
    return JoinTokenRow(
        id=row.id,
        label=row.label,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        apps=row.apps,
        may_publish=bool(row.may_publish),
        contributor_id=row.contributor_id,
    )


def _worker_row(row: Any) -> WorkerRow:
    return WorkerRow(*row[: len(_WORKER_COLUMNS)])


# -- join tokens --------------------------------------------------------------


def add_join_token(
    session: Session,
    *,
    id: str,
    token_hash: str,
    label: str,
    created_at: datetime,
    apps: list[str] | None,
    may_publish: bool,
    contributor_id: str | None = None,
) -> None:
    session.add(
        JoinToken(
            id=id,
            token_hash=token_hash,
            label=label,
            created_at=created_at,
            apps=apps,
            may_publish=may_publish,
            contributor_id=contributor_id,
        )
    )


def add_join_token_if_new(
    session: Session, *, id: str, token_hash: str, label: str, created_at: datetime
) -> None:
    """Store a join token (any app) unless one with this hash is there already (revoked
    or not: a token revoked since stays revoked)."""
    insert_ignore(
        session, JoinToken, id=id, token_hash=token_hash, label=label, created_at=created_at
    )


def join_token_by_hash(session: Session | Connection, token_hash: str) -> JoinTokenRow | None:
    row = session.execute(select(*_JOIN_COLUMNS).where(JoinToken.token_hash == token_hash)).first()
    return None if row is None else _join_row(row)


def join_tokens_by_prefix(session: Session, prefix: str, limit: int = 2) -> list[JoinTokenRow]:
    """Join tokens whose id starts with `prefix` (at most `limit`)."""
    rows = session.execute(
        select(*_JOIN_COLUMNS)
        .where(JoinToken.id.startswith(prefix, autoescape=True))
        .order_by(JoinToken.id)
        .limit(limit)
    ).all()
    return [_join_row(r) for r in rows]


def join_tokens(session: Session) -> list[tuple[JoinTokenRow, int]]:
    """Every join token, oldest first, with how many of its workers have not left."""
    tokens = session.execute(select(*_JOIN_COLUMNS).order_by(JoinToken.created_at)).all()
    counts = dict(
        session.execute(
            select(Worker.join_token_id, func.count())
            .where(Worker.stopped_at.is_(None))
            .group_by(Worker.join_token_id)
        ).all()
    )
    return [(_join_row(t), int(counts.get(t.id, 0))) for t in tokens]


def revoke_join_token(session: Session, token_id: str, now: datetime) -> None:
    """Revoke the token (again is harmless: the first time stays) and stop its live
    workers; the caller then withdraws what only it vouched for from the catalog."""
    session.execute(
        update(JoinToken)
        .where(JoinToken.id == token_id, JoinToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    session.execute(
        update(Worker)
        .where(Worker.join_token_id == token_id, Worker.stopped_at.is_(None))
        .values(stopped_at=now)
    )


# -- workers ------------------------------------------------------------------


def worker_by_token(conn: Connection, token_hash: str) -> WorkerAuth | None:
    """The worker a token hash opens, with its join token's revocation: one statement."""
    row: Any = conn.execute(_by_token, {"token_hash": token_hash}).first()
    if row is None:
        return None
    n = len(_WORKER_COLUMNS)
    worker = replace(_worker_row(row), contributor_id=row[n + 1])
    return WorkerAuth(worker=worker, revoked_at=row[n])


def add_worker(
    session: Session,
    *,
    token_hash: str,
    join_token_id: str,
    app: str,
    app_version: str,
    slots: int,
    sandbox: str,
    now: datetime,
    labels: dict[str, Any] | None = None,
    quarantined_at: datetime | None = None,
) -> str:
    """Add a joining worker's row (live from `now`; `quarantined_at`: quarantined from the
    start, see `quarantined_under`); its id."""
    worker = Worker(
        id=ids.new_id(),
        token_hash=token_hash,
        join_token_id=join_token_id,
        app=app,
        app_version=app_version,
        slots=slots,
        sandbox=sandbox,
        registered_at=now,
        last_heartbeat=now,
        labels=labels or None,
        quarantined_at=quarantined_at,
    )
    session.add(worker)
    return worker.id


def quarantined_under(session: Session, join_token_id: str) -> bool:
    """Whether a worker that joined with this token is quarantined (verification): a
    contributed worker registering again with it starts quarantined, so restarting a
    caught worker does not clear its record (the operator lifts quarantines)."""
    found = session.scalar(
        select(Worker.id)
        .where(Worker.join_token_id == join_token_id, Worker.quarantined_at.is_not(None))
        .limit(1)
    )
    return found is not None


def add_worker_key(
    session: Session,
    worker_id: str,
    *,
    kind: str,
    public_key: str,
    evidence: str,
    collateral: dict[str, Any] | None,
    now: datetime,
) -> None:
    """Record a joining worker's public key, evidence and collateral (as sent); the
    worker's row is added in the same transaction, before it."""
    session.flush()  # the worker row first: the key refers to it
    session.add(
        WorkerKey(
            worker_id=worker_id,
            kind=kind,
            public_key=public_key,
            evidence=evidence,
            collateral=collateral,
            created_at=now,
        )
    )


def live_worker_keys(session: Session, app: str, heard_after: datetime) -> list[WorkerKeyRow]:
    """Workers of `app` that have not left and were heard from after `heard_after`, with
    their keys, oldest registration first."""
    rows: Sequence[Any] = session.execute(
        select(
            *_WORKER_COLUMNS,
            WorkerKey.kind,
            WorkerKey.public_key,
            WorkerKey.evidence,
            WorkerKey.collateral,
        )
        .join(WorkerKey, WorkerKey.worker_id == Worker.id)
        .where(Worker.app == app, Worker.stopped_at.is_(None), Worker.last_heartbeat >= heard_after)
        .order_by(Worker.registered_at, Worker.id)
    ).all()
    n = len(_WORKER_COLUMNS)
    return [
        WorkerKeyRow(
            worker=_worker_row(r),
            kind=r[n],
            public_key=r[n + 1],
            evidence=r[n + 2],
            collateral=r[n + 3],
        )
        for r in rows
    ]
