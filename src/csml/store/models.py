"""Models: the rows of user models (model artifacts), as plain frozen values.

Invariants:
- A model is found only by its owner: another identity's model, or an `ident` that
  cannot name an id, is `NotFound` (never `Forbidden`); a prefix that matches
  several of the owner's models is `Malformed` (`ambiguous_id`).
- Functions run inside the caller's session (and so its transaction); they never
  commit. The files a row points at (`blob`) are the caller's (`csml.store.blobs`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from csml import ids
from csml.refusals import Malformed, NotFound
from csml.store.tables_artifacts import ModelArtifact

_COLUMNS = (
    ModelArtifact.id,
    ModelArtifact.owner_id,
    ModelArtifact.app,
    ModelArtifact.kind,
    ModelArtifact.format,
    ModelArtifact.format_version,
    ModelArtifact.name,
    ModelArtifact.operation,
    ModelArtifact.job_id,
    ModelArtifact.size,
    ModelArtifact.sha256,
    ModelArtifact.media_type,
    ModelArtifact.blob,
    ModelArtifact.metrics,
    ModelArtifact.created_at,
)


@dataclass(frozen=True)
class StoredModel:
    """One model row (its `seq` is the store's own)."""

    id: str
    owner_id: str
    app: str
    kind: str
    format: str
    format_version: int
    name: str
    operation: str | None
    job_id: str | None
    size: int
    sha256: str
    media_type: str
    blob: str
    metrics: dict[str, Any]
    created_at: datetime


def _model(row: Any) -> StoredModel:
    return StoredModel(**row._mapping)


def find_owned(session: Session, owner_id: str, ident: str) -> StoredModel:
    """The owner's model whose id is `ident` or starts with it (see the invariants)."""
    if not ids.is_id_prefix(ident):
        raise NotFound.of("model", ident)
    stmt = select(*_COLUMNS).where(ModelArtifact.owner_id == owner_id)
    if len(ident) == ids.ID_LENGTH:
        stmt = stmt.where(ModelArtifact.id == ident)
    else:
        stmt = stmt.where(ModelArtifact.id.startswith(ident, autoescape=True))
    found = session.execute(stmt.limit(2)).all()
    if not found:
        raise NotFound.of("model", ident)
    if len(found) > 1:
        raise Malformed("ambiguous_id", f"{ident!r} matches several models; give more of it")
    return _model(found[0])


def list_owned(session: Session, owner_id: str) -> list[StoredModel]:
    """The owner's models, newest first."""
    rows = session.execute(
        select(*_COLUMNS)
        .where(ModelArtifact.owner_id == owner_id)
        .order_by(ModelArtifact.seq.desc())
    ).all()
    return [_model(r) for r in rows]


def add(session: Session, model: StoredModel) -> None:
    """Insert one model row."""
    session.execute(insert(ModelArtifact).values(**asdict(model)))


def delete_owned(session: Session, owner_id: str, ident: str) -> StoredModel:
    """Delete the owner's model `ident` (as `find_owned` finds it); the row it was."""
    model = find_owned(session, owner_id, ident)
    session.execute(delete(ModelArtifact).where(ModelArtifact.id == model.id))
    return model
