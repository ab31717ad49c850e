"""Join tokens, managed by the operator on the coordinator's store.

A token names the apps its workers may serve (`apps`; None for tokens made before
tokens were bound, or made with `any_app`: any app) and whether they may announce
a new app version (`may_publish`). Revoking one stops its workers and withdraws
the catalog versions only it vouched for (`csml.coordinator.catalog.forget_token`),
in one transaction. The rows are `csml.store.workers`'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from csml import ids
from csml.coordinator.catalog import forget_token
from csml.coordinator.config import Settings
from csml.store import workers
from csml.store.db import make_engine, make_sessionmaker, migrate, transaction
from csml.store.private import private_dir
from csml.store.tables import utcnow
from csml.store.workers import JoinTokenRow

APP_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


@dataclass(frozen=True)
class NewJoinToken:
    """A join token about to be stored (`store`); `token` is shown once, never stored."""

    id: str
    token: str
    label: str
    apps: list[str] | None
    may_publish: bool
    contributor_id: str | None = None  # a contributed token: the identity that made it

    def store(self, session: Session) -> None:
        workers.add_join_token(
            session,
            id=self.id,
            token_hash=ids.hash_secret(self.token),
            label=self.label,
            created_at=utcnow(),
            apps=self.apps,
            may_publish=self.may_publish,
            contributor_id=self.contributor_id,
        )


def _sessions(settings: Settings) -> sessionmaker[Session]:
    engine = make_engine(settings.resolved_database_url())
    migrate(engine)
    return make_sessionmaker(engine)


def new_join_token(label: str, apps: list[str] | None, may_publish: bool = False) -> NewJoinToken:
    """A new token (its id, the token itself and what it allows), checked, not yet stored."""
    from csml.client import CsmlError

    if apps is not None:
        if not apps:
            raise CsmlError("name at least one app (--app NAME), or allow any app (--any-app)")
        for app in apps:
            if not APP_NAME.match(app):
                raise CsmlError(f"--app: {app!r} is not an app name (a-z, 0-9, _ and -)")
        apps = sorted(set(apps))
    return NewJoinToken(
        id=ids.new_id(),
        token=ids.new_secret("csmljoin"),
        label=label[:200],
        apps=apps,
        may_publish=may_publish,
    )


def create_join_token(
    settings: Settings, label: str = "", *, apps: list[str] | None, may_publish: bool = False
) -> str:
    """A new join token for `apps` (None: any app); only its hash is stored."""
    private_dir(settings.data_dir)
    new = new_join_token(label, apps, may_publish)
    with transaction(_sessions(settings)) as session:
        new.store(session)
    return new.token


def list_join_tokens(settings: Settings) -> list[JoinTokenRow]:
    with _sessions(settings)() as session:
        return [row for row, _ in workers.join_tokens(session)]


def revoke(session: Session, token_id: str) -> None:
    """Revoke `token_id` (again is harmless): its workers stop now, and what only it
    registered leaves the catalog."""
    workers.revoke_join_token(session, token_id, utcnow())
    forget_token(session, token_id)


def revoke_join_token_secret(settings: Settings, token: str) -> bool:
    """Revoke the join token `token` (as its creator holds it); False if unknown."""
    with transaction(_sessions(settings)) as session:
        found = workers.join_token_by_hash(session, ids.hash_secret(token))
        if found is None:
            return False
        revoke(session, found.id)
        return True


def revoke_join_token(settings: Settings, prefix: str) -> None:
    from csml.client import CsmlError

    if not ids.is_id_prefix(prefix):
        raise CsmlError(f"{prefix!r} is not a join-token id (12 to 64 hex characters)")
    with transaction(_sessions(settings)) as session:
        found = workers.join_tokens_by_prefix(session, prefix, limit=2)
        if len(found) != 1:
            raise CsmlError(
                f"{'no' if not found else 'more than one'} join token matches {prefix!r}"
            )
        revoke(session, found[0].id)
