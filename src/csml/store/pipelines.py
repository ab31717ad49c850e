"""Pipelines: the queries of pipeline runs (a parent job row) and their steps (job rows
linked by `parent_seq`, `step_index`).

Invariants:
- Lock order: the parent's row, then its steps' rows. `lock_parent` takes the parent's
  row lock and waits for it; `try_lock_parent` (for the reaper, which already holds a
  step's lock) never waits: it answers False when the parent is busy (SKIP LOCKED).
- `lock_app` locks the app's row exactly as the queue's submit does (same statement,
  same order), so a step is queued under the same lock as any job of its app.
- Functions run inside the caller's session and transaction and never commit. Rows
  they return are the session's (ORM) rows: the coordinator's services change them and
  the caller's transaction writes the changes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from csml.store.tables import AppRecord, Job

CHUNK = 500  # ids per IN (...) list


def add(session: Session, job: Job, *, flush: bool = False) -> None:
    """Add a new job row (a pipeline's parent or step); `flush` gives it its `seq` now."""
    session.add(job)
    if flush:
        session.flush()


def flush(session: Session) -> None:
    """Write the session's pending changes (e.g. file rows added to a parent) now."""
    session.flush()


def lock_app(session: Session, app: str) -> int | None:
    """Lock the app's row; its `served_rank`, or None if there is no such app."""
    row = session.get(AppRecord, app, with_for_update=True)
    return None if row is None else row.served_rank


def owner_queued_rank(session: Session, owner_id: str, app: str, queued: str) -> int:
    """The highest fair rank of the owner's jobs in state `queued` of `app` (0 if none)."""
    rank = session.scalar(
        select(func.max(Job.fair_rank)).where(
            Job.owner_id == owner_id, Job.app == app, Job.state == queued
        )
    )
    return rank or 0


def lock_parent(session: Session, parent_seq: int) -> None:
    """Wait for and take the parent row's lock."""
    session.scalars(select(Job.seq).where(Job.seq == parent_seq).with_for_update()).all()


def try_lock_parent(session: Session, parent_seq: int) -> bool:
    """The parent row's lock if free now; False if another transaction holds it."""
    got = session.scalars(
        select(Job.seq).where(Job.seq == parent_seq).with_for_update(skip_locked=True)
    ).first()
    return got is not None


def get(session: Session, seq: int) -> Job | None:
    """The job row `seq` (a step's parent)."""
    return session.get(Job, seq)


def id_of(session: Session, seq: int) -> str | None:
    """The id of the job row `seq`."""
    return session.scalar(select(Job.id).where(Job.seq == seq))


def steps_of(session: Session, parent_seq: int) -> list[Job]:
    """Every step row created so far of the pipeline `parent_seq`."""
    return list(session.scalars(select(Job).where(Job.parent_seq == parent_seq)).all())


def lock_live_steps(session: Session, parent_seq: int, live: Collection[str]) -> list[Job]:
    """The steps of `parent_seq` in a state of `live`, locked (the parent's lock first)."""
    return list(
        session.scalars(
            select(Job)
            .where(Job.parent_seq == parent_seq, Job.state.in_(list(live)))
            .with_for_update()
        ).all()
    )


def step_keys(session: Session, parent_seqs: Sequence[int]) -> list[tuple[int, str]]:
    """(seq, id) of every step of the pipelines `parent_seqs` (none for other jobs)."""
    out: list[tuple[int, str]] = []
    for i in range(0, len(parent_seqs), CHUNK):
        found = session.execute(
            select(Job.seq, Job.id).where(Job.parent_seq.in_(parent_seqs[i : i + CHUNK]))
        )
        out.extend((seq, job_id) for seq, job_id in found)
    return out


def steps_of_many(session: Session, parent_seqs: Sequence[int]) -> list[Job]:
    """The step rows of the pipelines `parent_seqs` (one query)."""
    return list(session.scalars(select(Job).where(Job.parent_seq.in_(parent_seqs))).all())
