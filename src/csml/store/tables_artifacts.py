"""Model artifacts: files kept under their owner's identity, usable by id as job inputs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from csml.store.tables import Base, SerialId


class ModelArtifact(Base):
    __tablename__ = "models"

    seq: Mapped[int] = mapped_column(SerialId, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"))
    app: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(40))
    format: Mapped[str] = mapped_column(String(64))
    format_version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    operation: Mapped[str | None] = mapped_column(String(64))
    # The job that made it (not a foreign key: the model outlives the job's retention).
    job_id: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(100))
    blob: Mapped[str] = mapped_column(String(300))
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_models_owner", "owner_id", "seq"),
        # The stored-bytes triggers find a job's models by its id.
        Index("ix_models_job_id", "job_id"),
    )
