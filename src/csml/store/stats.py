"""What the operator view, /metrics and /healthz read from the store: counts of jobs and
workers, recent workers, and the finished jobs of a window. Read-only: every function
runs in the caller's (read) session or on a plain connection and returns plain values
or frozen rows, so every coordinator of one store reports the same truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from csml.store.tables import Job, Worker
from csml.store.workers import WorkerRow


@dataclass(frozen=True)
class FinishedJob:
    app: str
    state: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None


def ping(engine: Engine) -> None:
    """One round trip to the database; raises if it cannot be reached."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def workers_since(session: Session, left_after: datetime) -> list[WorkerRow]:
    """Workers that have not left or left after `left_after`, by app and registration."""
    rows = session.scalars(
        select(Worker)
        .where(or_(Worker.stopped_at.is_(None), Worker.stopped_at >= left_after))
        .order_by(Worker.app, Worker.registered_at)
    ).all()
    return [
        WorkerRow(
            id=w.id,
            join_token_id=w.join_token_id,
            app=w.app,
            app_version=w.app_version,
            slots=w.slots,
            sandbox=w.sandbox,
            registered_at=w.registered_at,
            last_heartbeat=w.last_heartbeat,
            stopped_at=w.stopped_at,
            labels=w.labels,
        )
        for w in rows
    ]


def jobs_held(session: Session, state: str) -> dict[str, int]:
    """Jobs in `state` per worker id (those with a worker)."""
    return {
        worker_id: int(n)
        for worker_id, n in session.execute(
            select(Job.worker_id, func.count()).where(Job.state == state).group_by(Job.worker_id)
        ).all()
        if worker_id is not None
    }


def finished_since(session: Session, since: datetime) -> list[FinishedJob]:
    """Jobs that finished at or after `since`."""
    return [
        FinishedJob(*row)
        for row in session.execute(
            select(
                Job.app, Job.state, Job.created_at, Job.started_at, Job.finished_at, Job.error
            ).where(Job.finished_at >= since)
        ).all()
    ]


def created_since(session: Session, since: datetime) -> list[datetime]:
    """When each job created at or after `since` was created."""
    return list(session.scalars(select(Job.created_at).where(Job.created_at >= since)).all())


def jobs_by_app_and_state(session: Session) -> list[tuple[str, str, int]]:
    return [
        (app, state, int(n))
        for app, state, n in session.execute(
            select(Job.app, Job.state, func.count()).group_by(Job.app, Job.state)
        ).all()
    ]


def live_workers_by_app(session: Session, heard_after: datetime) -> list[tuple[str, int, int]]:
    """Per app: live workers (not left, heard from after `heard_after`) and their slots."""
    return [
        (app, int(n), int(slots or 0))
        for app, n, slots in session.execute(
            select(Worker.app, func.count(), func.sum(Worker.slots))
            .where(Worker.stopped_at.is_(None), Worker.last_heartbeat >= heard_after)
            .group_by(Worker.app)
        ).all()
    ]
