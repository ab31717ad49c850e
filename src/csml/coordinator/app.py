"""The FastAPI application and its background tasks.

Every request passes through pure-ASGI middleware only (csml.coordinator.middleware):
latency observation outermost, then the body limits; the `lean` hot routes are
dispatched in front of the generic stack by one pure-ASGI layer (`HotRoutes`) that does
what that stack's layers do for them (body limits, exception handlers, latency) and
sends their responses with the server's own `send`; routes with a body
parameter authenticate before reading it (csml.coordinator.auth). Staging
folders left by uploads that never finished are swept at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp

import csml
from csml import ids
from csml.apps.registry import installed_apps
from csml.coordinator import (
    api_attestation,
    api_batches,
    api_contributions,
    api_credit,
    api_events,
    api_models,
    api_operator,
    api_users,
    api_workers,
    retention,
)
from csml.coordinator.auth import LEAN
from csml.coordinator.catalog import Catalog
from csml.coordinator.config import Settings, read_secret_file
from csml.coordinator.errors import ApiError, install_handlers
from csml.coordinator.identity_cache import IdentityCache
from csml.coordinator.metrics import make_registry
from csml.coordinator.middleware import BodyLimits, HotRoutes, ObserveLatency
from csml.coordinator.notify import Notifier
from csml.coordinator.queue import JobQueue
from csml.coordinator.state import Core
from csml.schemas import JobSpec
from csml.store import (
    stats,
    tables_abuse,  # noqa: F401 - registers the abuse-control tables
    tables_artifacts,  # noqa: F401 - registers the ML models table
    workers,
)
from csml.store.blobs import BlobStore
from csml.store.db import make_engine, make_sessionmaker, migrate, transaction
from csml.store.private import private_dir
from csml.store.tables import utcnow
from csml.store.writer import Writer
from csml.web import api_docs
from csml.web import routes as web_routes

log = logging.getLogger("csml.coordinator")
STAGING_GRACE_SECONDS = 6 * 3600.0


def build_core(settings: Settings) -> Core:
    """Open (and migrate) the store, and register the apps installed here.

    The data folder is made owner-only (0700), or tightened if an older run left it wider.
    """
    private_dir(settings.data_dir)
    engine = make_engine(settings.resolved_database_url())
    migrate(engine)
    sessions = make_sessionmaker(engine)
    blobs = BlobStore(settings.data_dir / "blobs")
    # SQLite: this coordinator is the only one on the data folder, so every staging
    # folder is a leftover. Others may share it (PostgreSQL): sweep only old ones.
    swept = blobs.sweep_staging(
        older_than=0.0 if engine.dialect.name == "sqlite" else STAGING_GRACE_SECONDS
    )
    if swept:
        log.info("swept unfinished uploads", extra={"fields": {"folders": swept}})
    catalog = Catalog(
        sessions,
        contributions=settings.contributions,
        worker_live_seconds=settings.worker_live_seconds,
    )
    with transaction(sessions) as session:
        for app in installed_apps().values():
            catalog.install(session, app.manifest())
        if settings.bootstrap_join_token_file is not None:
            register_join_token(session, settings.bootstrap_join_token_file)
    notifier = Notifier(engine)  # on PostgreSQL, relays wake-ups between coordinators
    writer = Writer(engine)  # the hot path's writes (group commit: csml.store.writer)
    queue = JobQueue(settings, sessions, blobs, catalog, notifier, writer)
    identities = IdentityCache(notifier)  # erasures relayed like wake-ups
    return Core(settings, engine, sessions, blobs, catalog, notifier, queue, identities, writer)


def register_join_token(session: Session, path: Path) -> None:
    """Store the hash of the join token in `path` unless it is there already.

    Idempotent, so every replica of the coordinator may do it at start (a Swarm or
    Kubernetes secret); a token revoked since stays revoked.
    """
    token = read_secret_file(path, "bootstrap_join_token_file")
    workers.add_join_token_if_new(
        session,
        id=ids.new_id(),
        token_hash=ids.hash_secret(token),
        label="bootstrap (CSML_BOOTSTRAP_JOIN_TOKEN_FILE)",
        created_at=utcnow(),
    )


async def _reaper(core: Core) -> None:
    # Grace after start: workers that rode out a coordinator restart get one lease
    # period to heartbeat again before their jobs count as lost.
    await asyncio.sleep(core.settings.lease_seconds)
    while True:
        await asyncio.sleep(core.settings.reap_interval_seconds)
        try:
            await run_in_threadpool(core.queue.reap)
        except Exception:
            log.exception("lease reaper failed; retrying")


def _document_job_spec(app: FastAPI) -> None:
    """The submission body is parsed by hand (streaming), so add its schema to the document."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(spec.pop("$defs", {}))
            components["JobSpec"] = spec
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class Coordinator(FastAPI):
    """The application, with `HotRoutes` in front of its stack for the `lean` routes."""

    def build_middleware_stack(self) -> ASGIApp:
        return HotRoutes(super().build_middleware_stack(), self, LEAN)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    core = build_core(settings)
    registry, latency = make_registry(core)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        core.notifier.bind(asyncio.get_running_loop())
        task = asyncio.create_task(_reaper(core))
        purge = asyncio.create_task(retention.purge_loop(core))
        log.info("coordinator ready", extra={"fields": {"version": csml.__version__}})
        try:
            yield
        finally:
            task.cancel()
            purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(asyncio.CancelledError):
                await purge
            core.notifier.close()  # the relay's connection (it runs on this loop)
            core.writer.close()
            core.engine.dispose()

    app = Coordinator(
        title="CSML",
        version=csml.__version__,
        description="Collaborative and secure machine learning: anonymous identities submit "
        "jobs to per-application worker pools.",
        lifespan=lifespan,
        # No CDN pages: see csml.web.api_docs (off unless CSML_API_DOCS=1).
        docs_url=None,
        redoc_url=None,
    )
    app.state.core = core
    install_handlers(app)
    _document_job_spec(app)
    app.include_router(api_events.router)  # before api_users: /v1/jobs/events is no job id
    app.include_router(api_users.router)
    app.include_router(api_batches.router)
    app.include_router(api_workers.router)
    app.include_router(api_attestation.router)
    app.include_router(api_models.router)
    app.include_router(api_operator.router)
    app.include_router(api_contributions.router)
    app.include_router(api_contributions.operator)
    app.include_router(api_credit.router)
    app.include_router(api_credit.operator)
    web_routes.mount(app)
    if settings.api_docs:
        api_docs.mount(app)
    app.add_middleware(BodyLimits, settings=settings)
    app.add_middleware(ObserveLatency, latency=latency)  # outermost: sees the 413s too

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """Liveness and store reachability."""
        try:
            stats.ping(core.engine)
        except Exception as exc:
            raise ApiError(503, "store_unavailable", "the database is not reachable") from exc
        return {"status": "ok", "version": csml.__version__}

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
