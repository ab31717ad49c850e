"""Retention: finished jobs, with their files, are erased `retention_hours` after they end.

Every coordinator runs `purge_loop`; with several on one database they share the
work (`FOR UPDATE SKIP LOCKED` on PostgreSQL) and erasing twice is harmless.

A job is erased in two steps: its rows go in one transaction that also records
it in `pending_purges`; then its folder is removed and the record dropped. A
coordinator that dies in between leaves the record, and the next sweep (of any
coordinator) removes the folder. The same steps erase an identity's jobs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from csml.coordinator import pipelines
from csml.coordinator.queue import TERMINAL
from csml.coordinator.state import Core
from csml.store.db import transaction
from csml.store.tables import Job, JobFile, utcnow
from csml.store.tables_abuse import PendingPurge, RateWindow, UsedChallenge

log = logging.getLogger("csml.coordinator.retention")

BATCH = 500
# Spent challenges are remembered this long past their expiry, so that a coordinator
# whose clock lags a little still finds them.
CHALLENGE_CLOCK_MARGIN = timedelta(minutes=5)


T = TypeVar("T")


def _chunks(items: Sequence[T], size: int = BATCH) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def delete_job_rows(
    session: Session, jobs: Sequence[tuple[int, str]], now: datetime
) -> list[tuple[int, str]]:
    """Delete jobs (by (seq, id)), the steps of those that are pipelines, and their file
    rows; remember their folders for removal. Returns every job deleted.

    Rows of other tables that reference a job go with it (ON DELETE CASCADE).
    """
    jobs = pipelines.with_steps(session, jobs)
    for chunk in _chunks(jobs):
        seqs = [seq for seq, _ in chunk]
        for _, job_id in chunk:
            session.add(PendingPurge(job_id=job_id, created_at=now))
        session.flush()
        session.execute(delete(JobFile).where(JobFile.job_seq.in_(seqs)))
        session.execute(delete(Job).where(Job.seq.in_(seqs)))
    return jobs


def remove_job_files(core: Core, job_ids: Sequence[str] | None = None) -> int:
    """Remove the folders of purged jobs (`job_ids`, or every pending one) and their records."""
    if job_ids is None:
        with core.sessions() as session:
            job_ids = list(session.scalars(select(PendingPurge.job_id).limit(10 * BATCH)))
    removed: list[str] = []
    for job_id in job_ids:
        core.blobs.remove_job(job_id)
        if not core.blobs.job_dir(job_id).exists():
            removed.append(job_id)
        else:
            log.warning("could not remove the files of a purged job; will retry")
    for chunk in _chunks(removed):
        with transaction(core.sessions) as session:
            session.execute(delete(PendingPurge).where(PendingPurge.job_id.in_(chunk)))
    return len(removed)


def purge_expired(core: Core) -> int:
    """Erase finished jobs older than the retention period: rows, then files."""
    now = utcnow()
    cutoff = now - timedelta(hours=core.settings.retention_hours)
    total = 0
    while True:
        with transaction(core.sessions) as session:
            rows = [
                (seq, job_id)
                for seq, job_id in session.execute(
                    select(Job.seq, Job.id)
                    # A pipeline's steps go with it.
                    .where(
                        Job.state.in_(TERMINAL), Job.finished_at < cutoff, Job.parent_seq.is_(None)
                    )
                    .order_by(Job.finished_at)
                    .limit(BATCH)
                    .with_for_update(skip_locked=True)
                )
            ]
            deleted = delete_job_rows(session, rows, now)
        remove_job_files(core, [job_id for _, job_id in deleted])
        total += len(rows)
        if len(rows) < BATCH:
            return total


def forget_spent(core: Core) -> None:
    """Drop spent challenges past their expiry and rate windows that ended a window ago
    (the identity rate reads the previous window too)."""
    s = core.settings
    now = utcnow()
    longest = max(s.identity_rate_window_seconds, s.submission_rate_window_seconds)
    with transaction(core.sessions) as session:
        session.execute(
            delete(UsedChallenge).where(UsedChallenge.expires_at < now - CHALLENGE_CLOCK_MARGIN)
        )
        session.execute(
            delete(RateWindow).where(RateWindow.window_start < now - timedelta(seconds=2 * longest))
        )


def sweep(core: Core) -> int:
    """One pass: finish interrupted purges, purge expired jobs, forget spent counters."""
    remove_job_files(core)
    purged = purge_expired(core)
    forget_spent(core)
    if purged:
        log.info("erased %d finished jobs past the retention period", purged)
    return purged


async def purge_loop(core: Core) -> None:
    while True:
        try:
            await run_in_threadpool(sweep, core)
        except Exception:
            log.exception("retention sweep failed; retrying")
        await asyncio.sleep(core.settings.retention_interval_seconds)
