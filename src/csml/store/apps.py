"""The application catalog's rows: apps (the current manifest of each) and their pinned
versions, and what revoking a join token withdraws from them.

Every function takes the caller's `Session` (the catalog service decides the unit of
work) and returns plain values or frozen rows, never ORM objects.

Invariants:
- Lock order, everywhere: an app's row (`lock_app`) before its versions
  (`lock_version`, `withdraw_token`), so two registrations of one app serialise on its
  row and never deadlock on its versions.
- `lock_app` makes the app's row from the given manifest if it is new (insert-or-ignore,
  so concurrent first registrations both succeed), then locks it and reads it afresh.
- Nothing here decides who may pin what: that is `csml.coordinator.catalog`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from csml.store.db import insert_ignore
from csml.store.tables import AppRecord, AppVersion, JoinToken, Worker, utcnow


@dataclass(frozen=True)
class AppRow:
    """An app's catalog row: its current version and manifest."""

    name: str
    version: str
    manifest: dict[str, Any]


@dataclass(frozen=True)
class VersionRow:
    """A pinned version; `join_token_id` is the token that vouched for it (None: the
    coordinator's own installed copy)."""

    app: str
    version: str
    manifest: dict[str, Any]
    join_token_id: str | None


def _app(record: AppRecord) -> AppRow:
    return AppRow(name=record.name, version=record.version, manifest=record.manifest)


def _version(row: AppVersion) -> VersionRow:
    return VersionRow(
        app=row.app, version=row.version, manifest=row.manifest, join_token_id=row.join_token_id
    )


def manifests(session: Session) -> list[tuple[str, dict[str, Any]]]:
    """Every app in the catalog with its current manifest."""
    return [(n, m) for n, m in session.execute(select(AppRecord.name, AppRecord.manifest))]


def lock_app(
    session: Session, name: str, version: str, manifest: dict[str, Any], now: datetime
) -> AppRow:
    """The app's row, made from this manifest if it is new, locked for the transaction
    (the first lock taken: the app's row, then its versions)."""
    insert_ignore(
        session,
        AppRecord,
        name=name,
        version=version,
        manifest=manifest,
        served_rank=0,
        updated_at=now,
    )
    record = session.get(AppRecord, name, with_for_update=True, populate_existing=True)
    assert record is not None
    return _app(record)


def set_current(
    session: Session, name: str, version: str, manifest: dict[str, Any], now: datetime
) -> AppRow:
    """Make `version` (with `manifest`) the app's current one; its row is locked already."""
    session.execute(
        update(AppRecord)
        .where(AppRecord.name == name)
        .values(version=version, manifest=manifest, updated_at=now)
    )
    return AppRow(name=name, version=version, manifest=manifest)


def lock_version(session: Session, app: str, version: str) -> VersionRow | None:
    """A pinned version, locked (take the app's row first), or None."""
    row = session.get(AppVersion, (app, version), with_for_update=True, populate_existing=True)
    return None if row is None else _version(row)


def version(session: Session, app: str, version: str) -> VersionRow | None:
    """A pinned version as this transaction sees it, unlocked."""
    row = session.get(AppVersion, (app, version))
    return None if row is None else _version(row)


def count_versions(session: Session, app: str) -> int:
    return int(
        session.scalar(select(func.count()).select_from(AppVersion).where(AppVersion.app == app))
        or 0
    )


def add_version(
    session: Session,
    app: str,
    version: str,
    manifest: dict[str, Any],
    join_token_id: str | None,
    now: datetime,
) -> None:
    """Pin a new version (it must not exist: the caller locked the app and looked)."""
    session.add(
        AppVersion(
            app=app,
            version=version,
            manifest=manifest,
            join_token_id=join_token_id,
            registered_at=now,
        )
    )


def pin_installed(
    session: Session, app: str, version: str, manifest: dict[str, Any], now: datetime
) -> bool:
    """Pin the coordinator's own copy of `app` `version` (the app's row is locked),
    replacing whatever was pinned under it; True if another manifest was replaced."""
    insert_ignore(
        session, AppVersion, app=app, version=version, manifest=manifest, registered_at=now
    )
    pinned = session.get(AppVersion, (app, version), with_for_update=True, populate_existing=True)
    assert pinned is not None
    replaced = pinned.manifest != manifest
    if replaced or pinned.join_token_id is not None:
        pinned.manifest, pinned.join_token_id, pinned.registered_at = manifest, None, now
        session.flush()
    return replaced


def withdraw_token(session: Session, token_id: str) -> list[tuple[str, str]]:
    """After revoking `token_id` (its workers already stopped): hand each version it
    vouched for to another valid token whose live worker serves it, or unpin it; move
    each app whose current version went to the version its live workers serve (or the
    newest pinned one), or drop the app when none is left. Returns the (app, version)
    pairs unpinned."""
    apps = sorted(
        set(session.scalars(select(AppVersion.app).where(AppVersion.join_token_id == token_id)))
    )
    valid = JoinToken.revoked_at.is_(None)
    withdrawn: list[tuple[str, str]] = []
    for app in apps:
        record = session.get(AppRecord, app, with_for_update=True)  # lock order: app, versions
        versions = session.scalars(
            select(AppVersion)
            .where(AppVersion.app == app, AppVersion.join_token_id == token_id)
            .with_for_update()
        ).all()
        for v in versions:
            voucher = session.scalars(
                select(Worker.join_token_id)
                .join(JoinToken, JoinToken.id == Worker.join_token_id)
                .where(
                    Worker.app == app,
                    Worker.app_version == v.version,
                    Worker.stopped_at.is_(None),
                    Worker.join_token_id != token_id,
                    valid,
                )
                .limit(1)
            ).first()
            if voucher is not None:
                v.join_token_id = voucher
            else:
                withdrawn.append((app, v.version))
                session.delete(v)
        session.flush()
        if record is None or session.get(AppVersion, (app, record.version)) is not None:
            continue
        served = session.scalars(
            select(AppVersion)
            .join(
                Worker, (Worker.app == AppVersion.app) & (Worker.app_version == AppVersion.version)
            )
            .join(JoinToken, JoinToken.id == Worker.join_token_id)
            .where(AppVersion.app == app, Worker.stopped_at.is_(None), valid)
            .order_by(Worker.registered_at.desc())
            .limit(1)
        ).first()
        fallback = (
            served
            or session.scalars(
                select(AppVersion)
                .where(AppVersion.app == app)
                .order_by(AppVersion.registered_at.desc())
                .limit(1)
            ).first()
        )
        if fallback is None:
            session.delete(record)
        else:
            record.manifest, record.version, record.updated_at = (
                fallback.manifest,
                fallback.version,
                utcnow(),
            )
    return withdrawn
