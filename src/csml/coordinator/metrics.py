"""Prometheus metrics: request latency, job/queue/worker gauges read from the store, and
this coordinator's own store traffic (statements and write commits, from `StoreCounters`).
The counts are read through `csml.store.stats`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from csml.coordinator.state import Core
from csml.store import stats as store
from csml.store.db import counters
from csml.store.tables import utcnow


class StoreCollector(Collector):
    """Reads counts at scrape time, so every coordinator reports the shared truth."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def collect(self) -> Iterator[GaugeMetricFamily]:
        c = self.core
        jobs = GaugeMetricFamily(
            "csml_jobs", "Jobs by application and state.", labels=["app", "state"]
        )
        depth = GaugeMetricFamily(
            "csml_queue_depth", "Queued jobs per application.", labels=["app"]
        )
        capacity = GaugeMetricFamily(
            "csml_queue_capacity", "Queue bound per application.", labels=["app"]
        )
        workers = GaugeMetricFamily("csml_workers", "Live workers per application.", labels=["app"])
        slots = GaugeMetricFamily(
            "csml_worker_slots", "Live job slots per application.", labels=["app"]
        )
        cutoff = utcnow() - timedelta(seconds=c.settings.worker_live_seconds)
        with c.sessions() as session:
            by_state = store.jobs_by_app_and_state(session)
            live = store.live_workers_by_app(session, cutoff)
        queued: dict[str, int] = {}
        for app, state, n in by_state:
            jobs.add_metric([app, state], n)
            if state == "queued":
                queued[app] = n
        for app in c.catalog.entries():
            depth.add_metric([app], queued.get(app, 0))
            capacity.add_metric([app], c.settings.capacity(app))
        for app, n, s in live:
            workers.add_metric([app], n)
            slots.add_metric([app], s)
        yield from (jobs, depth, capacity, workers, slots)


class StoreTrafficCollector(Collector):
    """This process's statements (all, and by kind) and write commits (the scrape's own
    queries included)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def collect(self) -> Iterator[CounterMetricFamily]:
        tally = counters(self.core.engine)
        yield CounterMetricFamily(
            "csml_store_statements", "SQL statements this coordinator sent.", tally.statements
        )
        by_kind = CounterMetricFamily(
            "csml_store_statements_by_kind",
            "SQL statements this coordinator sent, by verb and first table.",
            labels=["kind"],
        )
        for kind, count in sorted(dict(tally.by_kind).items()):  # a copy: atomic under the GIL
            by_kind.add_metric([kind], count)
        yield by_kind
        yield CounterMetricFamily(
            "csml_store_write_commits",
            "Write transactions this coordinator committed (one WAL fsync each on SQLite).",
            tally.write_commits,
        )


class NotifyTrafficCollector(Collector):
    """Wake-ups: deliveries from other threads that woke the event loop, and on PostgreSQL
    the relay's traffic (what a coordinator pays for the others' notifications)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def collect(self) -> Iterator[CounterMetricFamily]:
        notifier = self.core.notifier
        yield CounterMetricFamily(
            "csml_notify_loop_hops",
            "Deliveries of notifications from other threads that woke the event loop.",
            notifier.hops,
        )
        yield CounterMetricFamily(
            "csml_notify_loop_hops_idle",
            "Of those, deliveries of wake-one keys only that woke no claimer.",
            notifier.idle_hops,
        )
        for name, counts, what in (
            ("claim_wakes", notifier.claim_wakes, "Claimers woken by a job's wake-up key"),
            (
                "claim_wakes_empty",
                notifier.claim_wakes_empty,
                "Claimers woken by a job's wake-up key that took nothing",
            ),
        ):
            for origin, value in counts.items():
                yield CounterMetricFamily(
                    f"csml_notify_{name}_{origin}",
                    f"{what} (the key notified {'here' if origin == 'local' else 'elsewhere'}).",
                    value,
                )
        relay = notifier.relay
        if relay is None:
            return
        for name, value, what in (
            (
                "packets",
                relay.packets,
                "Reads of the relay's connection that brought other coordinators' notifications.",
            ),
            (
                "wakes",
                relay.wakes,
                "Reads of the relay's connection with no statement of its own in flight.",
            ),
            ("received", relay.received, "Notification keys received from other coordinators."),
            ("publishes", relay.publishes, "pg_notify transactions sent."),
            ("pokes", relay.pokes, "Keys published off the event loop (a hop each)."),
            ("sent", relay.sent, "Notification keys sent."),
        ):
            yield CounterMetricFamily(f"csml_relay_{name}", what, value)


def make_registry(core: Core) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(StoreCollector(core))
    registry.register(StoreTrafficCollector(core))
    registry.register(NotifyTrafficCollector(core))
    latency = Histogram(
        "csml_http_request_duration_seconds",
        "HTTP request latency by route template and status.",
        ["method", "route", "status"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    )
    return registry, latency
