"""Identities' rows: the look-up by token (hash), creation, and erasure.

Invariants:
- Only the SHA-256 of a token is stored or looked up.
- `identity_by_token` is the hot path of every uncached user request: one prebuilt
  Core statement on a plain `Connection`, returning a frozen `IdentityRow`.
- Erasure is two transactions, both the caller's (`csml.coordinator.abuse`): first
  `cancel_live_jobs` (the live jobs, locked, become cancelled), then `lock_for_erasure`
  + the job rows + `delete_identity` (its models, its submission window and its row).
  On PostgreSQL `lock_for_erasure` locks the identity's row before the jobs are listed
  again, so a submission or model keep that holds it (or a key-share lock on it)
  commits first and what it wrote is erased too. Both lock the jobs in `seq` order, the
  order completions and lease extensions lock running jobs in (`csml.store.jobs_end`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from csml.store.tables import Identity, Job
from csml.store.tables_abuse import RateWindow
from csml.store.tables_artifacts import ModelArtifact


@dataclass(frozen=True)
class IdentityRow:
    id: str
    token_hash: str
    created_at: datetime


_by_token = select(Identity.id, Identity.token_hash, Identity.created_at).where(
    Identity.token_hash == bindparam("token_hash")
)


def identity_by_token(conn: Connection | Session, token_hash: str) -> IdentityRow | None:
    """The identity a token hash opens, or None: one statement."""
    row = conn.execute(_by_token, {"token_hash": token_hash}).first()
    return None if row is None else IdentityRow(row[0], row[1], row[2])


def add_identity(session: Session, identity_id: str, token_hash: str, now: datetime) -> None:
    session.add(Identity(id=identity_id, token_hash=token_hash, created_at=now))


def cancel_live_jobs(
    session: Session, identity_id: str, live_states: list[str], cancelled: str, now: datetime
) -> list[str]:
    """Cancel the identity's jobs in `live_states` (locked first), ending their leases;
    returns their ids."""
    live = list(
        session.scalars(
            select(Job.id)
            .where(Job.owner_id == identity_id, Job.state.in_(live_states))
            .order_by(Job.seq)
            .with_for_update()
        )
    )
    if live:
        session.execute(
            update(Job)
            .where(Job.id.in_(live))
            .values(
                state=cancelled,
                finished_at=now,
                error="cancelled: its owner erased their identity",
                lease_id=None,
                lease_expires_at=None,
            )
        )
    return live


def jobs_of(session: Session, identity_id: str) -> list[tuple[int, str]]:
    """The identity's jobs (seq, id), locked."""
    return [
        (seq, job_id)
        for seq, job_id in session.execute(
            select(Job.seq, Job.id)
            .where(Job.owner_id == identity_id)
            .order_by(Job.seq)
            .with_for_update()
        )
    ]


def lock_for_erasure(session: Session, identity_id: str) -> list[tuple[int, str]]:
    """The identity's jobs (seq, id), locked; on PostgreSQL after locking the identity's
    row, and again after it (what a writer holding that row committed meanwhile)."""
    jobs = jobs_of(session, identity_id)
    if session.get_bind().dialect.name == "postgresql":
        session.scalar(select(Identity.id).where(Identity.id == identity_id).with_for_update())
        jobs = list(dict.fromkeys([*jobs, *jobs_of(session, identity_id)]))
    return jobs


def delete_identity(session: Session, identity_id: str, window_key: str) -> list[str]:
    """Delete the identity's models' rows, its rate window `window_key` and its own row
    (its jobs must be gone already); returns the ids of the models deleted."""
    models = list(
        session.scalars(select(ModelArtifact.id).where(ModelArtifact.owner_id == identity_id))
    )
    session.execute(delete(ModelArtifact).where(ModelArtifact.owner_id == identity_id))
    session.execute(delete(RateWindow).where(RateWindow.key == window_key))
    session.execute(delete(Identity).where(Identity.id == identity_id))
    return models
