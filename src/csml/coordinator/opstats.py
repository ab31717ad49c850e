"""What the operator view shows, read from the store (so it is the same on every coordinator).

The reads are `csml.store.stats`'; this module only shapes them."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import datetime, timedelta

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
from csml.store import contributions
from csml.store import stats as store
from csml.store.tables import utcnow

_IDS = re.compile(r"\b[0-9a-f]{12,64}\b")
_NUMBERS = re.compile(r"\d+(?:\.\d+)?")


def overview(c: Core) -> OperatorOverview:
    now = utcnow()
    live_after = now - timedelta(seconds=c.settings.worker_live_seconds)
    with c.sessions() as session:
        workers = store.workers_since(session, now - timedelta(hours=1))
        holding = store.jobs_held(session, RUNNING)
        contributed = contributions.contributed_among(session, {w.join_token_id for w in workers})
    rows = []
    for w in workers:
        state = "left" if w.stopped_at else "live" if w.last_heartbeat >= live_after else "silent"
        rows.append(
            OperatorWorker(
                id=w.id,
                app=w.app,
                state=state,
                slots=w.slots,
                running=holding.get(w.id, 0),
                sandbox=w.sandbox,
                registered_at=w.registered_at,
                last_heartbeat=w.last_heartbeat,
                heartbeat_age_seconds=round((now - w.last_heartbeat).total_seconds(), 1),
                contributed=w.join_token_id in contributed,
                labels=w.labels or {},
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
        finished = store.finished_since(session, first)
        created = store.created_since(session, first)

    def bucket(t: datetime) -> int:
        return int((t - first).total_seconds() // 60)

    submitted = Counter(bucket(t) for t in created)
    states: defaultdict[int, Counter[str]] = defaultdict(Counter)
    latency: defaultdict[int, list[float]] = defaultdict(list)
    waits: defaultdict[int, list[float]] = defaultdict(list)
    failures: Counter[str] = Counter()
    failure_apps: defaultdict[str, set[str]] = defaultdict(set)
    for job in finished:
        if job.finished_at is None:
            continue
        b = bucket(job.finished_at)
        states[b][job.state] += 1
        if job.state != JobState.cancelled.value:
            latency[b].append((job.finished_at - job.created_at).total_seconds())
            if job.started_at is not None:
                waits[b].append((job.started_at - job.created_at).total_seconds())
        if job.state == JobState.failed.value:
            reason = _reason(job.error)
            failures[reason] += 1
            failure_apps[reason].add(job.app)
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
