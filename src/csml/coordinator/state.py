"""The coordinator's long-lived objects, reachable from every request."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from csml.coordinator.catalog import Catalog
from csml.coordinator.config import Settings
from csml.coordinator.identity_cache import IdentityCache
from csml.coordinator.notify import Notifier
from csml.coordinator.queue import JobQueue
from csml.store.blobs import BlobStore
from csml.store.writer import Writer


@dataclass
class Core:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    catalog: Catalog
    notifier: Notifier
    queue: JobQueue
    identities: IdentityCache  # token -> identity, briefly (see identity_cache)
    writer: Writer  # every hot-path write, committed durably (see csml.store.writer)


def core(request: Request) -> Core:
    c: Core = request.app.state.core
    return c
