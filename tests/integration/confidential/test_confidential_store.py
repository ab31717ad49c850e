"""The coordinator's side of confidential jobs, in process, on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from sqlalchemy import delete, func, select

from csml import ids
from csml.client.confidential import encrypt_job
from csml.coordinator.api_attestation import add_worker_key
from csml.coordinator.app import build_core
from csml.coordinator.config import Settings
from csml.coordinator.state import Core
from csml.coordinator.views import job_view
from csml.crypto import b64e, unwrap_key
from csml.refusals import Refusal
from csml.schemas import JobCompletion, JobSpec, WorkerAttestation, WorkerKeyInfo
from csml.store.db import transaction
from csml.store.tables import Identity, Job, JoinToken, Worker, utcnow
from csml.store.tables_confidential import JobConfidential, JobRecipient, WorkerKey
from tests.pg_server import (
    PostgresServer,
    create_database,
    drop_database,
    find_bindir,
    running_postgres,
)

# Starts a private PostgreSQL server (initdb) for the session's first test.
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    if os.environ.get("CSML_SKIP_POSTGRES", "").lower() in ("1", "true", "yes"):
        pytest.skip("CSML_SKIP_POSTGRES is set")
    find_bindir()
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def core(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Core]:
    if request.param == "sqlite":
        made = build_core(Settings(data_dir=tmp_path / "data"))
        yield made
        made.engine.dispose()
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"csml_c_{secrets.token_hex(5)}"
    create_database(server, name)
    made = build_core(Settings(data_dir=tmp_path / "data", database_url=server.url_for(name)))
    try:
        yield made
    finally:
        made.engine.dispose()
        drop_database(server, name)


def _worker(core: Core, key: PrivateKey) -> Worker:
    now = utcnow()
    join = JoinToken(id=ids.new_id(), token_hash=ids.new_id(), label="", created_at=now)
    worker = Worker(
        id=ids.new_id(),
        token_hash=ids.new_id(),
        join_token_id=join.id,
        app="echo",
        slots=1,
        sandbox="",
        registered_at=now,
        last_heartbeat=now,
    )
    with transaction(core.sessions) as session:
        session.add(join)
        session.flush()
        session.add(worker)
        add_worker_key(
            session,
            worker.id,
            WorkerAttestation(kind="none", public_key=b64e(bytes(key.public_key))),
        )
    return worker


def _info(worker: Worker, key: PrivateKey) -> WorkerKeyInfo:
    return WorkerKeyInfo(
        worker_id=worker.id,
        app="echo",
        kind="none",
        public_key=b64e(bytes(key.public_key)),
        evidence="",
        collateral=None,
        insecure=True,
        registered_at=utcnow(),
        last_heartbeat=utcnow(),
    )


def test_only_a_recipient_claims_and_gets_only_its_key(core: Core) -> None:
    keys = [PrivateKey.generate() for _ in range(3)]
    a, b, c = (_worker(core, k) for k in keys)
    owner = Identity(id=ids.new_id(), token_hash=ids.new_id(), created_at=utcnow())
    with transaction(core.sessions) as session:
        session.add(owner)
    plain = core.queue.submit(owner.id, JobSpec(app="echo", operation="echo"), None, {})
    job_keys, spec = encrypt_job(
        "echo", "echo", {"n": 1}, [], [_info(a, keys[0]), _info(b, keys[1])]
    )
    secret = core.queue.submit(
        owner.id, JobSpec(app="echo", operation="echo", confidential=spec), None, {}
    )
    view = job_view(secret)
    assert view.confidential and view.params == {} and view.encrypted_result is None
    assert not job_view(plain).confidential

    assert [j.id for j in core.queue.claim(c, 8)] == [plain.id]  # not a recipient
    assert core.queue.claim(c, 8) == []
    (got,) = core.queue.claim(b, 8)
    assert got.id == secret.id and got.confidential is not None and got.params == {}
    assert unwrap_key(base64.b64decode(got.confidential.wrapped_key), keys[1]) == job_keys.data_key

    with pytest.raises(Refusal) as err:
        core.queue.complete(
            b, secret.id, JobCompletion(lease_id=got.lease_id, state="succeeded", result={"n": 1})
        )
    assert err.value.code == "plaintext_result"
    with core.sessions() as session:
        rows = session.scalars(select(JobRecipient.worker_id).order_by(JobRecipient.worker_id))
        assert sorted(rows.all()) == sorted([a.id, b.id])
        assert session.scalar(select(func.count()).select_from(WorkerKey)) == 3

    # Deleting a job (retention, erasure) takes its envelope and recipients with it.
    with transaction(core.sessions) as session:
        session.execute(delete(Job).where(Job.id == secret.id))
    with core.sessions() as session:
        assert session.scalar(select(func.count()).select_from(JobConfidential)) == 0
        assert session.scalar(select(func.count()).select_from(JobRecipient)) == 0


def test_unknown_or_foreign_recipients_are_refused(core: Core) -> None:
    key = PrivateKey.generate()
    worker = _worker(core, key)
    owner = Identity(id=ids.new_id(), token_hash=ids.new_id(), created_at=utcnow())
    with transaction(core.sessions) as session:
        session.add(owner)
        session.get(Worker, worker.id).stopped_at = utcnow()  # type: ignore[union-attr]
    _, spec = encrypt_job("echo", "echo", {}, [], [_info(worker, key)])
    with pytest.raises(Refusal) as err:
        core.queue.check_spec(JobSpec(app="echo", operation="echo", confidential=spec))
    assert err.value.code == "unknown_recipient" and "is not a running echo worker" in str(
        err.value
    )
