"""The verification table (issue 13, item 3): `job_runs`, one row per run of a job by a
worker whose result is compared rather than taken on trust.

A row is written when a contributed worker completes a job (its run is pending until the
job is accepted or its verification goes on), and when an operator run accepts a job
that had pending runs. It keeps the run's digest (never its result: only the accepted
run's result reaches the job row), who ran it, and, once the job is accepted, whether it
agreed. `contributor_id` is the run's party (None: the operator): erasing that identity
erases its runs.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from csml.store.tables import Base, SerialId


class JobRun(Base):
    __tablename__ = "job_runs"

    id: Mapped[int] = mapped_column(SerialId, primary_key=True, autoincrement=True)
    job_seq: Mapped[int] = mapped_column(ForeignKey("jobs.seq", ondelete="CASCADE"))
    worker_id: Mapped[str] = mapped_column(String(64), index=True)
    contributor_id: Mapped[str | None] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), index=True, default=None
    )
    digest: Mapped[str] = mapped_column(String(80))
    # Whether its vote counts toward acceptance (False: a quarantined worker's run).
    counts: Mapped[bool] = mapped_column(Boolean)
    wall_seconds: Mapped[float] = mapped_column(Float)
    at: Mapped[datetime]
    # None while pending; then "accepted" (its result is the job's), "agreed", "disagreed".
    outcome: Mapped[str | None] = mapped_column(String(16), default=None)
    # Credit for its contributor: None (none: not agreeing, failed job, quarantined),
    # "held" (agreed while its worker was on probation: earned when it leaves probation),
    # "earned", "forfeit" (held, or earned in the batch that quarantined its worker).
    credit: Mapped[str | None] = mapped_column(String(8), default=None)

    __table_args__ = (Index("ix_job_runs_job", "job_seq", "contributor_id"),)
