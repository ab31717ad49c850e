"""Rows and specs for the PostgreSQL tests, made directly through the ORM."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from csml import ids
from csml.coordinator.state import Core
from csml.schemas import JobSpec
from csml.store.db import transaction
from csml.store.tables import Identity, Job, JoinToken, Worker, utcnow

MakeCore = Callable[..., Core]  # the `make_core` fixture: build_core on this test's database


def new_identity(core: Core) -> str:
    identity = Identity(
        id=ids.new_id(), token_hash=ids.hash_secret(ids.new_secret("csml")), created_at=utcnow()
    )
    with transaction(core.sessions) as session:
        session.add(identity)
    return identity.id


def new_worker(
    core: Core,
    app: str = "echo",
    slots: int = 4,
    *,
    labels: dict[str, Any] | None = None,
    contributor_id: str | None = None,
) -> Worker:
    """A registered worker of `app` (with placement `labels`; contributed by
    `contributor_id`, else the operator's), written straight to the store."""
    now = utcnow()
    join = JoinToken(
        id=ids.new_id(),
        token_hash=ids.hash_secret(ids.new_secret("csmljoin")),
        label="tests",
        created_at=now,
        apps=[app] if contributor_id is not None else None,
        contributor_id=contributor_id,
    )
    worker = Worker(
        id=ids.new_id(),
        token_hash=ids.hash_secret(ids.new_secret("csmlw")),
        join_token_id=join.id,
        app=app,
        slots=slots,
        sandbox="none",
        registered_at=now,
        last_heartbeat=now,
        labels=labels,
    )
    with transaction(core.sessions) as session:
        session.add(join)
        session.flush()
        session.add(worker)
    return worker


def echo(**params: object) -> JobSpec:
    return JobSpec(app="echo", operation="echo", params=params)


def submit(core: Core, owner: str, **params: object) -> str:
    return core.queue.submit(owner, echo(**params), None, {}).id


def job_row(core: Core, job_id: str) -> Job:
    with core.sessions() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        session.expunge(job)
        return job


def expire_leases(core: Core, *job_ids: str, ago: float = 1.0) -> None:
    """Make running jobs' leases end in the past, as if their worker went silent."""
    with transaction(core.sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(lease_expires_at=utcnow() - timedelta(seconds=ago))
        )


def states(core: Core) -> dict[str, str]:
    with core.sessions() as session:
        return {job_id: state for job_id, state in session.execute(select(Job.id, Job.state))}


def bulk_queue(core: Core, owners: list[str], count: int, app: str = "echo") -> list[str]:
    """Queue many echo jobs in one transaction, ranked round-robin across `owners`.

    Faster than `JobQueue.submit` one by one; the rows are what submit would write
    for owners that take turns (rank i // len(owners) + 1 after nothing was served).
    """
    now = utcnow()
    limits = {
        "timeout_seconds": core.settings.job_timeout_seconds,
        "memory_mb": core.settings.job_memory_mb,
        "cpu_seconds": core.settings.job_cpu_seconds,
    }
    jobs = [
        Job(
            id=ids.new_id(),
            owner_id=owners[i % len(owners)],
            app=app,
            operation="echo",
            params={"bulk": i},
            limits=limits,
            state="queued",
            fair_rank=i // len(owners) + 1,
            created_at=now,
            attempts=0,
            max_attempts=core.settings.max_attempts,
            progress_fraction=0.0,
            progress_message="",
            files=[],
        )
        for i in range(count)
    ]
    with transaction(core.sessions) as session:
        session.add_all(jobs)
    return [j.id for j in jobs]


def run_threads(n: int, target: object) -> list[object]:
    """Run `target(i)` in `n` threads started together (a barrier); their results, or
    the exceptions they raised, in order."""
    results: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)  # type: ignore[operator]
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results
