"""Worker keys for confidential jobs: stored at registration, listed for clients.

A client lists an app's live workers with their X25519 public keys and attestation
evidence, verifies the evidence itself (the coordinator is not trusted with that), and
encrypts the job only to the workers it accepts.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from csml.attestation.evidence import INSECURE_KIND
from csml.coordinator.auth import AuthFirstRoute
from csml.coordinator.state import core
from csml.schemas import ErrorBody, WorkerAttestation, WorkerKeyInfo
from csml.store import workers
from csml.store.tables import utcnow

router = APIRouter(route_class=AuthFirstRoute, prefix="/v1", tags=["confidential"])


def add_worker_key(session: Session, worker_id: str, attestation: WorkerAttestation) -> None:
    """Record a joining worker's public key, evidence and collateral (as sent)."""
    workers.add_worker_key(
        session,
        worker_id,
        kind=attestation.kind,
        public_key=attestation.public_key,
        evidence=attestation.evidence,
        collateral=attestation.collateral,
        now=utcnow(),
    )


@router.get(
    "/apps/{name}/workers",
    response_model=list[WorkerKeyInfo],
    responses={404: {"model": ErrorBody}},
)
def app_workers(name: str, request: Request) -> list[WorkerKeyInfo]:
    """Live workers of an app with their public keys and attestation evidence.

    `insecure: true` marks a worker without attestation (`none`): its operator can read
    the jobs sent to it. Verify the evidence yourself before encrypting to a key.
    """
    c = core(request)
    c.catalog.get(name)  # 404 for an unknown app
    cutoff = utcnow() - timedelta(seconds=c.settings.worker_live_seconds)
    with c.sessions() as session:
        rows = workers.live_worker_keys(session, name, cutoff)
    return [
        WorkerKeyInfo(
            worker_id=k.worker.id,
            app=k.worker.app,
            kind=k.kind,
            public_key=k.public_key,
            evidence=k.evidence,
            collateral=k.collateral,
            insecure=k.kind == INSECURE_KIND,
            registered_at=k.worker.registered_at,
            last_heartbeat=k.worker.last_heartbeat,
        )
        for k in rows
    ]
