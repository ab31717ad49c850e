"""What the operator view shows, read from the store (so it is the same on every coordinator)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select

from csml.coordinator.queue import QUEUED, RUNNING
from csml.coordinator.state import Core
from csml.schemas import JobState, QueueInfo
from csml.schemas.operator import (
    FailureReason,
    MinuteStats,
    OperatorApp,
    OperatorOverview,
    OperatorStats,
    OperatorWorker,
)
from csml.store.tables import Job, Worker, utcnow

_IDS = re.compile(r"\b[0-9a-f]{12,64}\b")
_NUMBERS = re.compile(r"\d+(?:\.\d+)?")


def overview(c: Core) -> OperatorOverview:
    now = utcnow()
    live_after = now - timedelta(seconds=c.settings.worker_live_seconds)
    with c.sessions() as session:
        workers = session.scalars(
            select(Worker)
            .where(or_(Worker.stopped_at.is_(None), Worker.stopped_at >= now - timedelta(hours=1)))
            .order_by(Worker.app, Worker.registered_at)
        ).all()
        holding = dict(
            session.execute(
                select(Job.worker_id, func.count())
                .where(Job.state == RUNNING)
                .group_by(Job.worker_id)
            ).all()
        )
    rows = []
    for w in workers:
        state = "left" if w.stopped_at else "live" if w.last_heartbeat >= live_after else "silent"
        rows.append(
            OperatorWorker(
                id=w.id,
                app=w.app,
                state=state,
                slots=w.slots,
                running=int(holding.get(w.id, 0)),
                sandbox=w.sandbox,
                registered_at=w.registered_at,
                last_heartbeat=w.last_heartbeat,
                heartbeat_age_seconds=round((now - w.last_heartbeat).total_seconds(), 1),
            )
        )
    stats = c.queue.queue_stats()
    apps = []
    for name in sorted(set(c.catalog.entries()) | {w.app for w in workers}):
        live = [r for r in rows if r.app == name and r.state == "live"]
        st = stats.get(name, {})
        apps.append(
            OperatorApp(
                name=name,
                workers=len(live),
                slots=sum(r.slots for r in live),
                queue=QueueInfo(
                    depth=st.get(QUEUED, 0),
                    running=st.get(RUNNING, 0),
                    capacity=c.settings.capacity(name),
                ),
            )
        )
    return OperatorOverview(generated_at=now, apps=apps, workers=rows)


def _reason(error: str | None) -> str:
    lines = (error or "").strip().splitlines()
    first = lines[0] if lines else "no reason given"
    return _NUMBERS.sub("N", _IDS.sub("…", first))[:160]


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def stats(c: Core, minutes: int) -> OperatorStats:
    now = utcnow()
    first = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    with c.sessions() as session:
        finished = session.execute(
            select(
                Job.app, Job.state, Job.created_at, Job.started_at, Job.finished_at, Job.error
            ).where(Job.finished_at >= first)
        ).all()
        created = session.scalars(select(Job.created_at).where(Job.created_at >= first)).all()

    def bucket(t: datetime) -> int:
        return int((t - first).total_seconds() // 60)

    submitted = Counter(bucket(t) for t in created)
    states: defaultdict[int, Counter[str]] = defaultdict(Counter)
    latency: defaultdict[int, list[float]] = defaultdict(list)
    waits: defaultdict[int, list[float]] = defaultdict(list)
    failures: Counter[str] = Counter()
    failure_apps: defaultdict[str, set[str]] = defaultdict(set)
    for app, state, created_at, started_at, finished_at, error in finished:
        if finished_at is None:
            continue
        b = bucket(finished_at)
        states[b][state] += 1
        if state != JobState.cancelled.value:
            latency[b].append((finished_at - created_at).total_seconds())
            if started_at is not None:
                waits[b].append((started_at - created_at).total_seconds())
        if state == JobState.failed.value:
            reason = _reason(error)
            failures[reason] += 1
            failure_apps[reason].add(app)
    rows = []
    for i in range(minutes):
        done = sum(states[i].values())
        lat, wait = latency.get(i, []), waits.get(i, [])
        rows.append(
            MinuteStats(
                start=first + timedelta(minutes=i),
                submitted=submitted.get(i, 0),
                finished=done,
                succeeded=states[i][JobState.succeeded.value],
                failed=states[i][JobState.failed.value],
                cancelled=states[i][JobState.cancelled.value],
                jobs_per_second=round(done / 60, 4),
                latency_mean_seconds=round(sum(lat) / len(lat), 3) if lat else None,
                latency_p95_seconds=round(_p95(lat), 3) if lat else None,
                wait_mean_seconds=round(sum(wait) / len(wait), 3) if wait else None,
            )
        )
    return OperatorStats(
        window_minutes=minutes,
        minutes=rows,
        failures=[
            FailureReason(reason=r, count=n, apps=sorted(failure_apps[r]))
            for r, n in failures.most_common(20)
        ],
    )
