"""Tables of confidential jobs: worker keys with evidence, recipients, ciphertext envelopes.

The coordinator keeps only what it must forward: public keys and evidence, the job's data
key sealed to each recipient worker, the encrypted parameters and the encrypted result.
It holds no key that opens any of them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, backref, mapped_column, relationship
from sqlalchemy.orm.attributes import set_committed_value

from csml.store.tables import Base, Job


class WorkerKey(Base):
    """A worker's X25519 public key for confidential jobs and the evidence binding it."""

    __tablename__ = "worker_keys"

    worker_id: Mapped[str] = mapped_column(
        ForeignKey("workers.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    public_key: Mapped[str] = mapped_column(String(64))  # base64
    evidence: Mapped[str] = mapped_column(Text)  # base64
    collateral: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime]


class JobRecipient(Base):
    """A worker that may claim a confidential job, with the job's data key sealed to it."""

    __tablename__ = "job_recipients"

    job_seq: Mapped[int] = mapped_column(
        ForeignKey("jobs.seq", ondelete="CASCADE"), primary_key=True
    )
    worker_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    wrapped_key: Mapped[str] = mapped_column(String(200))  # base64


class JobConfidential(Base):
    """A confidential job's envelope: nonce, client result key, encrypted params and result."""

    __tablename__ = "job_confidential"

    job_seq: Mapped[int] = mapped_column(
        ForeignKey("jobs.seq", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer)
    job_nonce: Mapped[str] = mapped_column(String(64))  # base64
    result_public_key: Mapped[str] = mapped_column(String(64))  # base64
    encrypted_params: Mapped[str] = mapped_column(Text)  # base64
    encrypted_result: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    job: Mapped[Job] = relationship(
        Job,
        backref=backref(
            "confidential", uselist=False, lazy="selectin", cascade="all, delete-orphan"
        ),
    )


def confidential_of(job: Job) -> JobConfidential | None:
    """The envelope of a confidential job (loaded with the job), or None."""
    found: JobConfidential | None = getattr(job, "confidential", None)
    return found


def mark_not_confidential(job: Job) -> None:
    """A new job without an envelope: say so, so views need no lazy load later."""
    set_committed_value(job, "confidential", None)
