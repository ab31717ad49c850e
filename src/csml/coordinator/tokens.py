"""Join tokens, managed by the operator on the coordinator's store."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from csml import ids
from csml.coordinator.config import Settings
from csml.store.db import make_engine, make_sessionmaker, migrate, transaction
from csml.store.private import private_dir
from csml.store.tables import JoinToken, utcnow


def _sessions(settings: Settings) -> sessionmaker[Session]:
    engine = make_engine(settings.resolved_database_url())
    migrate(engine)
    return make_sessionmaker(engine)


def create_join_token(settings: Settings, label: str = "") -> str:
    """A new join token; only its hash is stored, so it is returned once."""
    private_dir(settings.data_dir)
    token = ids.new_secret("csmljoin")
    with transaction(_sessions(settings)) as session:
        session.add(
            JoinToken(
                id=ids.new_id(),
                token_hash=ids.hash_secret(token),
                label=label[:200],
                created_at=utcnow(),
            )
        )
    return token


def list_join_tokens(settings: Settings) -> list[JoinToken]:
    with _sessions(settings)() as session:
        return list(session.scalars(select(JoinToken).order_by(JoinToken.created_at)).all())


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
        found[0].revoked_at = utcnow()
