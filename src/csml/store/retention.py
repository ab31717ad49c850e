"""Retention: the queries that expire finished jobs, record their folders for removal
(`pending_purges`) and forget spent challenges and rate windows.

Invariants (the order the coordinator's `retention` relies on):
- `delete_jobs` deletes job rows and their file rows and records each job in
  `pending_purges`, all in the caller's transaction: the record commits exactly when
  the rows are gone, so a folder on disk outlives its rows only while it is recorded.
- A record is dropped (`drop_pending`) only after its folder is gone, in a later
  transaction; a crash in between leaves it for the next sweep.
- `expired` locks the rows it answers (`FOR UPDATE SKIP LOCKED` on PostgreSQL), so
  coordinators sharing a database take disjoint batches; erasing twice is harmless.
- Functions run inside the caller's session and never commit.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import TypeVar

from sqlalchemy import and_, delete, exists, select
from sqlalchemy.orm import Session

from csml.store.tables import Job, JobFile
from csml.store.tables_abuse import PendingPurge, RateWindow, UsedChallenge
from csml.store.tables_placement import PlacementKey

BATCH = 500  # rows per statement (and per IN (...) list)

T = TypeVar("T")


def chunks(items: Sequence[T], size: int = BATCH) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def delete_jobs(session: Session, jobs: Sequence[tuple[int, str]], now: datetime) -> None:
    """Delete the jobs `jobs` (seq, id) and their file rows; record their folders in
    `pending_purges`. Rows of other tables that reference a job go with it (ON DELETE
    CASCADE)."""
    for chunk in chunks(jobs):
        seqs = [seq for seq, _ in chunk]
        for _, job_id in chunk:
            session.add(PendingPurge(job_id=job_id, created_at=now))
        session.flush()
        session.execute(delete(JobFile).where(JobFile.job_seq.in_(seqs)))
        session.execute(delete(Job).where(Job.seq.in_(seqs)))


def pending(session: Session, limit: int) -> list[str]:
    """Ids of purged jobs whose folders may still be on disk (at most `limit`)."""
    return list(session.scalars(select(PendingPurge.job_id).limit(limit)))


def drop_pending(session: Session, job_ids: Sequence[str]) -> None:
    """Forget purged jobs whose folders are gone (at most `BATCH` ids at a time)."""
    session.execute(delete(PendingPurge).where(PendingPurge.job_id.in_(list(job_ids))))


def expired(
    session: Session, ended: Collection[str], cutoff: datetime, limit: int
) -> list[tuple[int, str]]:
    """(seq, id) of up to `limit` jobs in a state of `ended` that ended before `cutoff`,
    oldest first, locked; a pipeline's steps are not listed (they go with it)."""
    return [
        (seq, job_id)
        for seq, job_id in session.execute(
            select(Job.seq, Job.id)
            .where(Job.state.in_(list(ended)), Job.finished_at < cutoff, Job.parent_seq.is_(None))
            .order_by(Job.finished_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ]


def forget_spent(session: Session, challenges_before: datetime, windows_before: datetime) -> None:
    """Drop spent challenges that expired before `challenges_before` and rate windows
    that started before `windows_before`."""
    session.execute(delete(UsedChallenge).where(UsedChallenge.expires_at < challenges_before))
    session.execute(delete(RateWindow).where(RateWindow.window_start < windows_before))


def forget_requirement_keys(session: Session, unused_before: datetime) -> None:
    """Drop requirement keys (placement) that no job refers to and no submission used
    since `unused_before` (well before any submission still in flight)."""
    referred = exists().where(
        and_(Job.app == PlacementKey.app, Job.requires_key == PlacementKey.key)
    )
    session.execute(delete(PlacementKey).where(PlacementKey.used_at < unused_before, ~referred))
