"""Contributed workers' rows: the join tokens identities made for their own workers, the
operator's per-app settings, and counts of live workers by who runs them.

A contributed join token is a `join_tokens` row with `contributor_id` set (the identity);
it names exactly one app and never may publish (`csml.coordinator.contributions` makes it
so). Its workers are contributed workers: who contributed them is read through their join
token, so a worker row never carries an identity of its own.

Invariants:
- Only hashes of tokens are stored; lists give ids, apps, dates and counts, never a hash.
- `live_contributed_workers` is read after the caller locked the app's row
  (`csml.store.apps.lock_app`), so two registrations of one app cannot both pass a cap.
- Erasing an identity deletes its contributed tokens (`delete_contributed`, after the
  caller revoked them) and, by cascade, their workers' rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, delete, func, select
from sqlalchemy.orm import Session

from csml.store.tables import ContributionSetting, JoinToken, Worker


@dataclass(frozen=True)
class ContributedToken:
    """A contributed join token as its contributor sees it (never its hash)."""

    id: str
    app: str
    label: str
    created_at: datetime
    revoked_at: datetime | None
    workers: list[ContributedWorker]


@dataclass(frozen=True)
class ContributedWorker:
    id: str
    app_version: str | None
    slots: int
    sandbox: str
    registered_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None


@dataclass(frozen=True)
class Setting:
    """The operator's setting for an app's contributions (None: no row, the default)."""

    app: str
    allowed: bool
    max_workers: int | None
    credit_weight: float = 1.0  # credit: per wall second of a run (see csml.store.credit)
    verification: str | None = None  # verify: the app's policy (None: the default)


def tokens_of(session: Session, contributor_id: str) -> list[ContributedToken]:
    """The identity's contributed tokens, oldest first, each with its workers."""
    tokens = session.execute(
        select(
            JoinToken.id,
            JoinToken.apps,
            JoinToken.label,
            JoinToken.created_at,
            JoinToken.revoked_at,
        )
        .where(JoinToken.contributor_id == contributor_id)
        .order_by(JoinToken.created_at, JoinToken.id)
    ).all()
    ids = [t.id for t in tokens]
    by_token: dict[str, list[ContributedWorker]] = {i: [] for i in ids}
    if ids:
        for w in session.execute(
            select(
                Worker.join_token_id,
                Worker.id,
                Worker.app_version,
                Worker.slots,
                Worker.sandbox,
                Worker.registered_at,
                Worker.last_heartbeat,
                Worker.stopped_at,
            )
            .where(Worker.join_token_id.in_(ids))
            .order_by(Worker.registered_at, Worker.id)
        ).all():
            by_token[w[0]].append(ContributedWorker(*w[1:]))
    return [
        ContributedToken(
            id=t.id,
            app=(t.apps or [""])[0],
            label=t.label,
            created_at=t.created_at,
            revoked_at=t.revoked_at,
            workers=by_token[t.id],
        )
        for t in tokens
    ]


def token_ids_by_prefix(
    session: Session, prefix: str, contributor_id: str | None, limit: int = 2
) -> list[str]:
    """Contributed tokens whose id starts with `prefix`: of `contributor_id`, or (None) of
    anyone (the operator's view)."""
    query = select(JoinToken.id).where(
        JoinToken.id.startswith(prefix, autoescape=True), JoinToken.contributor_id.is_not(None)
    )
    if contributor_id is not None:
        query = query.where(JoinToken.contributor_id == contributor_id)
    return list(session.scalars(query.order_by(JoinToken.id).limit(limit)))


def count_tokens_of(session: Session, contributor_id: str) -> int:
    """How many contributed tokens the identity holds, revoked ones included."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(JoinToken)
            .where(JoinToken.contributor_id == contributor_id)
        )
        or 0
    )


def live_tokens_of(session: Session, contributor_id: str) -> list[str]:
    """Ids of the identity's contributed tokens not yet revoked."""
    return list(
        session.scalars(
            select(JoinToken.id).where(
                JoinToken.contributor_id == contributor_id, JoinToken.revoked_at.is_(None)
            )
        )
    )


def contributed_among(session: Session, token_ids: set[str]) -> set[str]:
    """Which of these join tokens are contributed ones."""
    if not token_ids:
        return set()
    return set(
        session.scalars(
            select(JoinToken.id).where(
                JoinToken.id.in_(sorted(token_ids)), JoinToken.contributor_id.is_not(None)
            )
        )
    )


def live_tokens_for_app(session: Session, app: str) -> list[str]:
    """Ids of contributed tokens for `app` not yet revoked."""
    rows = session.execute(
        select(JoinToken.id, JoinToken.apps).where(
            JoinToken.contributor_id.is_not(None), JoinToken.revoked_at.is_(None)
        )
    ).all()
    return [r.id for r in rows if app in (r.apps or [])]


def delete_contributed(session: Session, contributor_id: str) -> list[str]:
    """Delete the identity's contributed tokens (their workers' rows go by cascade);
    returns their ids."""
    found = list(
        session.scalars(select(JoinToken.id).where(JoinToken.contributor_id == contributor_id))
    )
    if found:
        session.execute(delete(Worker).where(Worker.join_token_id.in_(found)))
        session.execute(delete(JoinToken).where(JoinToken.id.in_(found)))
    return found


def live_contributed_workers(session: Session, app: str, heard_after: datetime) -> int:
    """Contributed workers of `app` that have not left and were heard from lately."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Worker)
            .join(JoinToken, JoinToken.id == Worker.join_token_id)
            .where(
                Worker.app == app,
                Worker.stopped_at.is_(None),
                Worker.last_heartbeat >= heard_after,
                JoinToken.contributor_id.is_not(None),
            )
        )
        or 0
    )


def worker_counts(session: Session, heard_after: datetime) -> dict[str, tuple[int, int]]:
    """Per app, its live workers as (operator-run, contributed)."""
    contributed: Any = case((JoinToken.contributor_id.is_not(None), 1), else_=0)
    rows = session.execute(
        select(Worker.app, func.count(), func.sum(contributed))
        .join(JoinToken, JoinToken.id == Worker.join_token_id)
        .where(Worker.stopped_at.is_(None), Worker.last_heartbeat >= heard_after)
        .group_by(Worker.app)
    ).all()
    return {app: (int(n) - int(c or 0), int(c or 0)) for app, n, c in rows}


def setting(session: Session, app: str) -> Setting | None:
    row = session.get(ContributionSetting, app)
    if row is None:
        return None
    return Setting(
        row.app, bool(row.allowed), row.max_workers, float(row.credit_weight), row.verification
    )


def settings(session: Session) -> list[Setting]:
    rows = session.scalars(select(ContributionSetting).order_by(ContributionSetting.app))
    return [
        Setting(r.app, bool(r.allowed), r.max_workers, float(r.credit_weight), r.verification)
        for r in rows
    ]


def put_setting(
    session: Session,
    app: str,
    allowed: bool,
    max_workers: int | None,
    now: datetime,
    verification: str | None = None,
    *,
    credit_weight: float | None = None,
) -> None:
    """Write `app`'s settings (`verification`: its policy, None for the default;
    `credit_weight` None: leave it, 1.0 for a new row)."""
    row = session.get(ContributionSetting, app)
    if row is None:
        row = ContributionSetting(
            app=app,
            allowed=allowed,
            max_workers=max_workers,
            updated_at=now,
            verification=verification,
        )
        row.credit_weight = 1.0
        session.add(row)
    else:
        row.allowed, row.max_workers, row.updated_at = allowed, max_workers, now
        row.verification = verification
    if credit_weight is not None:
        row.credit_weight = credit_weight
