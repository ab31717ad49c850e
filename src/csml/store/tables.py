"""Table definitions. Migrations under `migrations/` must match these.

`utcnow` is where the coordinator reads the time (leases, heartbeats, rate windows,
challenge expiry, retention): one clock, which tests may set (`set_clock`) instead
of sleeping.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite keeps no zone itself)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY.
SerialId = BigInteger().with_variant(Integer(), "sqlite")


Clock = Callable[[], datetime]
"""Gives the current time, timezone-aware UTC."""


def real_clock() -> datetime:
    return datetime.now(UTC)


_clock: Clock = real_clock


def utcnow() -> datetime:
    """The coordinator's current time (UTC), from the clock `set_clock` chose."""
    return _clock()


def set_clock(clock: Clock | None) -> Clock:
    """Read the time from `clock` from now on, process-wide (None: the real clock again);
    returns the clock it replaces. For tests that set the time rather than sleep."""
    global _clock
    previous, _clock = _clock, clock or real_clock
    return previous


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Identity(Base):
    __tablename__ = "identities"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    # What `max_stored_bytes` limits, kept by the store's triggers in the statement that
    # changes a counted row (`csml.store.jobs_quota`; migration 0011_stored_bytes).
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class JoinToken(Base):
    __tablename__ = "join_tokens"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    # The apps its workers may serve; None (tokens made before apps were bound): any app.
    apps: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # Its workers may announce a new version of their app (which becomes current).
    may_publish: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # A contributed token: the identity that made it (None: the operator's). Erasing the
    # identity deletes its tokens (and, through them, their workers' rows).
    contributor_id: Mapped[str | None] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), index=True, default=None
    )

    def allows(self, app: str) -> bool:
        return self.apps is None or app in self.apps


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    join_token_id: Mapped[str] = mapped_column(ForeignKey("join_tokens.id", ondelete="CASCADE"))
    app: Mapped[str] = mapped_column(String(40), index=True)
    app_version: Mapped[str | None] = mapped_column(String(40))
    slots: Mapped[int]
    sandbox: Mapped[str] = mapped_column(String(200), default="")
    registered_at: Mapped[datetime]
    last_heartbeat: Mapped[datetime]
    stopped_at: Mapped[datetime | None]
    # placement: the labels the worker announced at registration (None: none).
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # verify: the worker's record against accepted results (`csml.coordinator.verification`)
    # and when it was quarantined (None: it is not).
    agreements: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    disagreements: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    quarantined_at: Mapped[datetime | None] = mapped_column(default=None)


class AppRecord(Base):
    """An application's manifest (as its workers announced it) and its fair-queue clock."""

    __tablename__ = "apps"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    version: Mapped[str] = mapped_column(String(40))
    manifest: Mapped[dict[str, Any]]
    served_rank: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime]


class FairCounter(Base):
    """The last fair rank given to an identity's job in an app: submissions of different
    identities update different rows, so none waits on a per-app lock."""

    __tablename__ = "fair_counters"

    app: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), primary_key=True
    )
    last_rank: Mapped[int] = mapped_column(BigInteger)


class ContributionSetting(Base):
    """The operator's word on contributed workers for one app: allowed or not (no row: the
    `CSML_CONTRIBUTIONS` default) and at most how many live ones (None: no cap)."""

    __tablename__ = "contribution_settings"

    app: Mapped[str] = mapped_column(String(40), primary_key=True)
    allowed: Mapped[bool] = mapped_column(Boolean)
    max_workers: Mapped[int | None] = mapped_column(Integer, default=None)
    updated_at: Mapped[datetime]
    # credit (issue 13 item 2): credit per wall second of a run of this app (earned by a
    # contributor, spent by a job served by priority). No row: 1.0.
    credit_weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    # verify: how contributed workers' results are checked (`none`, `replicate:k`,
    # `spot-check:p`); None: the default (`csml.coordinator.verification.DEFAULT`).
    verification: Mapped[str | None] = mapped_column(String(32), default=None)


class AppVersion(Base):
    """A version of an app with its manifest, pinned by the first to announce it: the
    coordinator (its installed apps; `join_token_id` None) or a worker's join token."""

    __tablename__ = "app_versions"

    app: Mapped[str] = mapped_column(String(40), primary_key=True)
    version: Mapped[str] = mapped_column(String(40), primary_key=True)
    manifest: Mapped[dict[str, Any]]
    join_token_id: Mapped[str | None] = mapped_column(String(64), index=True)
    registered_at: Mapped[datetime]


class Job(Base):
    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(SerialId, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"))
    app: Mapped[str] = mapped_column(String(40))
    operation: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]]
    limits: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16))
    fair_rank: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    progress_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str] = mapped_column(String(500), default="")
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]
    worker_id: Mapped[str | None] = mapped_column(String(64))
    lease_id: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    # Pipelines: a step's parent job; on a parent, the index of its current step.
    parent_seq: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.seq", ondelete="CASCADE"), default=None
    )
    step_index: Mapped[int | None] = mapped_column(Integer, default=None)
    # credit (issue 13 item 2): the lease of the run that took it by credit priority, ahead
    # of plain round-robin (its completion under that lease debits its owner); else None.
    credit_lease: Mapped[str | None] = mapped_column(String(64), default=None)
    # placement: the key of the job's requirement (`placement.key_of`, a row of
    # `placement_keys`; None: any worker) and of its model input for its owner
    # (`placement.warm_key`; None: no model input).
    requires_key: Mapped[str | None] = mapped_column(String(64), default=None)
    warm_key: Mapped[str | None] = mapped_column(String(64), default=None)
    # verify: operator workers only (asked by the user, or a check that needs a trusted
    # run); the least reputation of a contributed worker that may take it; how many runs
    # of it wait for agreement (`job_runs`; 0: none, a plain job).
    trusted_only: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    min_reputation: Mapped[int | None] = mapped_column(Integer, default=None)
    verify_runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    files: Mapped[list[JobFile]] = relationship(
        back_populates="job", cascade="all, delete-orphan", lazy="selectin"
    )

    __table_args__ = (
        Index("ix_jobs_claim", "app", "state", "fair_rank", "seq"),
        Index("ix_jobs_owner", "owner_id", "seq"),
        Index("ix_jobs_lease", "state", "lease_expires_at"),
        Index("ix_jobs_parent", "parent_seq", "step_index"),
        # placement: which jobs refer to a requirement key (only those with one).
        Index(
            "ix_jobs_requires_key",
            "app",
            "requires_key",
            postgresql_where=text("requires_key IS NOT NULL"),
            sqlite_where=text("requires_key IS NOT NULL"),
        ),
    )


class JobFile(Base):
    """An input or output file of a job; the bytes live at `blob` under the data directory,
    or, for a blob named in-database (`csml.store.blobs.in_db`), in `content`."""

    __tablename__ = "job_files"

    job_seq: Mapped[int] = mapped_column(
        ForeignKey("jobs.seq", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # "input" | "output"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(100))
    blob: Mapped[str] = mapped_column(String(300))
    # Input: the stored model it came from. Output: the model artifact it became.
    model_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # The bytes of a small file kept in the database (migration 0012_blob_content);
    # NULL for a file on disk. Deferred: loading a job's rows never loads them.
    content: Mapped[bytes | None] = mapped_column(LargeBinary, default=None, deferred=True)

    job: Mapped[Job] = relationship(back_populates="files")


class StoredBlob(Base):
    """A (blob, size) that files of an identity's jobs hold, and how many file rows hold
    it: its size counts once in the identity's `stored_bytes` while `refs` > 0. Kept by
    the store's triggers (`csml.store.jobs_quota`), never written by the code."""

    __tablename__ = "stored_blobs"

    owner_id: Mapped[str] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), primary_key=True
    )
    blob: Mapped[str] = mapped_column(String(300), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    refs: Mapped[int] = mapped_column(Integer)
