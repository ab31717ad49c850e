"""Join tokens, managed by the operator on the coordinator's store.

A token names the apps its workers may serve (`apps`; None for tokens made before
tokens were bound, or made with `any_app`: any app) and whether they may announce
a new app version (`may_publish`). Revoking one stops its workers and withdraws
the catalog versions only it vouched for (`csml.coordinator.catalog.forget_token`).
"""

from __future__ import annotations

import re

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from csml import ids
from csml.coordinator.catalog import forget_token
from csml.coordinator.config import Settings
from csml.store.db import make_engine, make_sessionmaker, migrate, transaction
from csml.store.private import private_dir
from csml.store.tables import JoinToken, Worker, utcnow

APP_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def _sessions(settings: Settings) -> sessionmaker[Session]:
    engine = make_engine(settings.resolved_database_url())
    migrate(engine)
    return make_sessionmaker(engine)


def new_join_token(
    label: str, apps: list[str] | None, may_publish: bool = False
) -> tuple[JoinToken, str]:
    """A token row (to add to a session) and the token itself, shown once."""
    from csml.client import CsmlError

    if apps is not None:
        if not apps:
            raise CsmlError("name at least one app (--app NAME), or allow any app (--any-app)")
        for app in apps:
            if not APP_NAME.match(app):
                raise CsmlError(f"--app: {app!r} is not an app name (a-z, 0-9, _ and -)")
        apps = sorted(set(apps))
    token = ids.new_secret("csmljoin")
    row = JoinToken(
        id=ids.new_id(),
        token_hash=ids.hash_secret(token),
        label=label[:200],
        created_at=utcnow(),
        apps=apps,
        may_publish=may_publish,
    )
    return row, token


def create_join_token(
    settings: Settings, label: str = "", *, apps: list[str] | None, may_publish: bool = False
) -> str:
    """A new join token for `apps` (None: any app); only its hash is stored."""
    private_dir(settings.data_dir)
    row, token = new_join_token(label, apps, may_publish)
    with transaction(_sessions(settings)) as session:
        session.add(row)
    return token


def list_join_tokens(settings: Settings) -> list[JoinToken]:
    with _sessions(settings)() as session:
        return list(session.scalars(select(JoinToken).order_by(JoinToken.created_at)).all())


def revoke(session: Session, row: JoinToken) -> None:
    """Revoke `row` (again is harmless): its workers stop now, and what only it
    registered leaves the catalog."""
    now = utcnow()
    if row.revoked_at is None:
        row.revoked_at = now
    session.execute(
        update(Worker)
        .where(Worker.join_token_id == row.id, Worker.stopped_at.is_(None))
        .values(stopped_at=now)
    )
    forget_token(session, row.id)


def revoke_join_token_secret(settings: Settings, token: str) -> bool:
    """Revoke the join token `token` (as its creator holds it); False if unknown."""
    with transaction(_sessions(settings)) as session:
        found = session.scalars(
            select(JoinToken).where(JoinToken.token_hash == ids.hash_secret(token))
        ).first()
        if found is None:
            return False
        revoke(session, found)
        return True


def revoke_join_token(settings: Settings, prefix: str) -> None:
    from csml.client import CsmlError

    if not ids.is_id_prefix(prefix):
        raise CsmlError(f"{prefix!r} is not a join-token id (12 to 64 hex characters)")
    with transaction(_sessions(settings)) as session:
        found = session.scalars(
            select(JoinToken).where(JoinToken.id.startswith(prefix, autoescape=True)).limit(2)
        ).all()
        if len(found) != 1:
            raise CsmlError(
                f"{'no' if not found else 'more than one'} join token matches {prefix!r}"
            )
        revoke(session, found[0])
