"""Tables of abuse control and retention. None of them holds an address or a name.

- `server_secrets`: the key that signs proof-of-work challenges, shared by every
  coordinator of the store.
- `used_challenges`: challenges already spent, by their SHA-256, until they expire.
- `rate_windows`: fixed-window counters ("identities" for the whole service,
  "submit:<identity id>" per identity).
- `pending_purges`: jobs whose rows are gone but whose files may still be on disk,
  so a purge interrupted between the two steps is finished later.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from csml.store.tables import Base, Job


class ServerSecret(Base):
    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))  # hex
    created_at: Mapped[datetime]


class UsedChallenge(Base):
    __tablename__ = "used_challenges"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the challenge
    expires_at: Mapped[datetime] = mapped_column(index=True)


class RateWindow(Base):
    __tablename__ = "rate_windows"

    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(index=True)
    count: Mapped[int] = mapped_column(Integer)


class PendingPurge(Base):
    __tablename__ = "pending_purges"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime]


# Retention finds finished jobs by state and age.
Index("ix_jobs_retention", Job.state, Job.finished_at)
