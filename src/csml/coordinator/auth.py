"""Bearer-token authentication for identities and workers.

Tokens are looked up by their SHA-256; the store never holds a token itself.
"""

from __future__ import annotations

from fastapi import Request
from sqlalchemy import select

from csml import ids
from csml.coordinator.errors import unauthorized
from csml.coordinator.state import Core, core
from csml.store.tables import Identity, JoinToken, Worker


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized(
            "this call needs `Authorization: Bearer <token>`; "
            "create an identity with POST /v1/identities (or `csml id new`)"
        )
    return token.strip()


def identity_from(c: Core, token: str) -> Identity:
    with c.sessions() as session:
        found = session.scalars(
            select(Identity).where(Identity.token_hash == ids.hash_secret(token))
        ).first()
    if found is None:
        raise unauthorized("the token is not valid (unknown or erased identity)")
    return found


def current_identity(request: Request) -> Identity:
    return identity_from(core(request), bearer(request))


def current_join_token(request: Request) -> JoinToken:
    c = core(request)
    token = bearer(request)
    with c.sessions() as session:
        found = session.scalars(
            select(JoinToken).where(JoinToken.token_hash == ids.hash_secret(token))
        ).first()
    if found is None or found.revoked_at is not None:
        raise unauthorized("the join token is not valid or was revoked; ask the operator for one")
    return found


def current_worker(request: Request) -> Worker:
    """The calling worker; refused once its join token is revoked."""
    c = core(request)
    token = bearer(request)
    with c.sessions() as session:
        row = session.execute(
            select(Worker, JoinToken.revoked_at)
            .join(JoinToken, JoinToken.id == Worker.join_token_id)
            .where(Worker.token_hash == ids.hash_secret(token))
        ).first()
    if row is None:
        raise unauthorized("unknown worker token; register again with a join token")
    worker, revoked_at = row
    if revoked_at is not None:
        raise unauthorized("this worker's join token was revoked")
    if worker.stopped_at is not None:
        raise unauthorized("this worker has left; register again")
    return worker
