"""Retention: finished jobs, with their files, are erased `retention_hours` after they end.

Every coordinator runs `purge_loop`; with several on one database they share the
work (`FOR UPDATE SKIP LOCKED` on PostgreSQL) and erasing twice is harmless.

A job is erased in two steps: its rows go in one transaction that also records
it in `pending_purges`; then its folder is removed and the record dropped. A
coordinator that dies in between leaves the record, and the next sweep (of any
coordinator) removes the folder. The same steps erase an identity's jobs.

The queries are the store's (`csml.store.retention`); this module orders the steps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

import anyio.to_thread
from sqlalchemy.orm import Session

from csml.coordinator import pipelines
from csml.coordinator.queue import TERMINAL
from csml.coordinator.state import Core
from csml.store import retention as store
from csml.store.db import transaction
from csml.store.tables import utcnow

log = logging.getLogger("csml.coordinator.retention")

BATCH = store.BATCH
# Spent challenges are remembered this long past their expiry, so that a coordinator
# whose clock lags a little still finds them.
CHALLENGE_CLOCK_MARGIN = timedelta(minutes=5)
# Placement: a requirement key no job refers to is dropped once unused this long.
REQUIREMENT_KEY_TTL = timedelta(hours=1)


def delete_job_rows(
    session: Session, jobs: Sequence[tuple[int, str]], now: datetime
) -> list[tuple[int, str]]:
    """Delete jobs (by (seq, id)), the steps of those that are pipelines, and their file
    rows; remember their folders for removal. Returns every job deleted.

    Rows of other tables that reference a job go with it (ON DELETE CASCADE).
    """
    jobs = pipelines.with_steps(session, jobs)
    store.delete_jobs(session, jobs, now)
    return jobs


def remove_job_files(core: Core, job_ids: Sequence[str] | None = None) -> int:
    """Remove the folders of purged jobs (`job_ids`, or every pending one) and their records."""
    if job_ids is None:
        with core.sessions() as session:
            job_ids = store.pending(session, 10 * BATCH)
    removed: list[str] = []
    for job_id in job_ids:
        core.blobs.remove_job(job_id)
        if not core.blobs.job_dir(job_id).exists():
            removed.append(job_id)
        else:
            log.warning("could not remove the files of a purged job; will retry")
    for chunk in store.chunks(removed):
        with transaction(core.sessions) as session:
            store.drop_pending(session, chunk)
    return len(removed)


def purge_expired(core: Core) -> int:
    """Erase finished jobs older than the retention period: rows, then files."""
    now = utcnow()
    cutoff = now - timedelta(hours=core.settings.retention_hours)
    total = 0
    while True:
        with transaction(core.sessions) as session:
            rows = store.expired(session, TERMINAL, cutoff, BATCH)
            deleted = delete_job_rows(session, rows, now)
        remove_job_files(core, [job_id for _, job_id in deleted])
        total += len(rows)
        if len(rows) < BATCH:
            return total


def forget_spent(core: Core) -> None:
    """Drop spent challenges past their expiry and rate windows that ended a window ago
    (the identity rate reads the previous window too); requirement keys no job refers
    to, unused for `REQUIREMENT_KEY_TTL`."""
    s = core.settings
    now = utcnow()
    longest = max(s.identity_rate_window_seconds, s.submission_rate_window_seconds)
    with transaction(core.sessions) as session:
        store.forget_spent(
            session,
            challenges_before=now - CHALLENGE_CLOCK_MARGIN,
            windows_before=now - timedelta(seconds=2 * longest),
        )
        store.forget_requirement_keys(session, now - REQUIREMENT_KEY_TTL)


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
            await anyio.to_thread.run_sync(sweep, core)
        except Exception:
            log.exception("retention sweep failed; retrying")
        await asyncio.sleep(core.settings.retention_interval_seconds)
