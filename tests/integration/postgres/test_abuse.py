"""Abuse control on PostgreSQL with several coordinators (engines) on one database:
one challenge makes one identity, rate windows count exactly, erasure and
retention leave nothing behind."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text, update

from csml.client import pow
from csml.coordinator import abuse, retention
from csml.coordinator.errors import ApiError, status_of
from csml.coordinator.state import Core
from csml.refusals import Conflict, Refusal
from csml.schemas import Heartbeat, JobCompletion, RunningJob
from csml.schemas.identities import IdentityProof
from csml.store.db import MIGRATIONS, transaction
from csml.store.tables import Identity, Job, JobFile, utcnow
from csml.store.tables_abuse import PendingPurge, RateWindow, ServerSecret
from tests.integration.postgres.support import (
    MakeCore,
    new_identity,
    new_worker,
    run_threads,
    submit,
)

# Starts a private PostgreSQL server (initdb) for the session's first test.
pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


def outcome(result: object) -> str:
    if isinstance(result, Refusal):
        return str(status_of(result))
    if isinstance(result, ApiError):
        return str(result.status)
    if isinstance(result, Exception):
        return repr(result)
    return "ok"


def said(exc: BaseException) -> tuple[str, str]:
    """The code and message of a refusal (a quota's may still be an ApiError)."""
    assert isinstance(exc, (ApiError, Refusal))
    return exc.code, exc.message


def proof(core: Core) -> IdentityProof:
    issued = abuse.issue_challenge(core)
    return IdentityProof(
        challenge=issued.challenge, nonce=pow.solve(issued.challenge, issued.difficulty)
    )


def test_tables_exist(core: Core) -> None:
    names = set(inspect(core.engine).get_table_names())
    assert {"server_secrets", "used_challenges", "rate_windows", "pending_purges"} <= names
    assert "ix_jobs_retention" in {ix["name"] for ix in inspect(core.engine).get_indexes("jobs")}
    with core.engine.connect() as conn:
        applied = set(conn.scalars(text("SELECT version_num FROM alembic_version")))
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(cfg)
    history = {rev.revision for head in applied for rev in script.iterate_revisions(head, "base")}
    assert "0002_abuse" in history  # applied, whether or not later revisions build on it


def test_the_signing_key_is_shared_through_the_store(make_core: MakeCore) -> None:
    one, two = make_core(pow_difficulty=8), make_core(pow_difficulty=8)
    solved = proof(one)
    abuse._keys.clear()  # forget the cached key: the other must read it from the store
    assert abuse.create_identity(two, solved).token
    with pytest.raises(Conflict) as err:
        abuse.create_identity(one, solved)
    assert err.value.code == "challenge_used"
    with one.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ServerSecret)) == 1


@pytest.mark.parametrize("identity_rate_limit", [0, 1000])
def test_one_challenge_makes_one_identity_under_a_race(
    make_core: MakeCore, identity_rate_limit: int
) -> None:
    cores = [make_core(pow_difficulty=8, identity_rate_limit=identity_rate_limit) for _ in range(2)]
    solved = proof(cores[0])
    with cores[0].sessions() as session:
        before = session.scalar(select(func.count()).select_from(Identity))
    results = run_threads(8, lambda i: abuse.create_identity(cores[i % 2], solved))
    assert Counter(outcome(r) for r in results) == {"ok": 1, "409": 7}
    with cores[0].sessions() as session:
        assert session.scalar(select(func.count()).select_from(Identity)) == (before or 0) + 1


def test_identity_rate_is_counted_exactly_across_coordinators(make_core: MakeCore) -> None:
    # A fixed difficulty (no target rate), so concurrent solutions stay valid.
    settings = {"pow_difficulty": 8, "identity_rate_limit": 0, "identity_rate_window_seconds": 3600}
    cores = [make_core(**settings) for _ in range(2)]
    with cores[0].sessions() as session:
        row = session.get(RateWindow, abuse.IDENTITIES_KEY)
        before = row.count if row is not None else 0
    results = run_threads(16, lambda i: abuse.create_identity(cores[i % 2], None))
    # No proof: each is refused, and a refusal counts nothing.
    assert Counter(outcome(r) for r in results) == {"422": 16}
    results = run_threads(16, lambda i: abuse.create_identity(cores[i % 2], proof(cores[i % 2])))
    assert Counter(outcome(r) for r in results) == {"ok": 16}  # never a rate refusal
    with cores[0].sessions() as session:
        row = session.get(RateWindow, abuse.IDENTITIES_KEY)
        assert row is not None and row.count == before + 16


def test_submission_window_is_exact_across_coordinators(make_core: MakeCore) -> None:
    cores = [
        make_core(submission_rate_limit=5, max_active_jobs=0, max_stored_bytes=0) for _ in range(2)
    ]
    owner, other = new_identity(cores[0]), new_identity(cores[0])
    results = run_threads(20, lambda i: abuse.check_submission(cores[i % 2], owner))
    assert Counter(outcome(r) for r in results) == {"ok": 5, "429": 15}
    abuse.check_submission(cores[1], other)  # another identity has its own window
    with cores[0].sessions() as session:
        row = session.get(RateWindow, abuse.submit_key(owner))
        assert row is not None and row.count == 5


def test_active_jobs_and_storage_are_counted_from_the_store(make_core: MakeCore) -> None:
    one, two = make_core(max_active_jobs=2), make_core(max_active_jobs=2, max_stored_bytes=100)
    owner = new_identity(one)
    submit(one, owner)
    abuse.check_submission(two, owner)
    submit(two, owner)
    with pytest.raises((ApiError, Refusal)) as err:  # the quota's refusal
        abuse.check_submission(one, owner)
    assert said(err.value)[0] == "active_jobs_limit"
    other = new_identity(one)
    job_id = submit(one, other)
    with transaction(one.sessions) as session:
        seq = session.scalar(select(Job.seq).where(Job.id == job_id))
        session.add(
            JobFile(
                job_seq=seq,
                kind="input",
                name="data",
                size=150,
                sha256="0" * 64,
                media_type="application/octet-stream",
                blob="x",
            )
        )
        session.execute(
            update(Job).where(Job.id == job_id).values(state="succeeded", finished_at=utcnow())
        )
    with pytest.raises((ApiError, Refusal)) as err:
        abuse.check_submission(two, other)
    code, message = said(err.value)
    assert code == "storage_quota"
    assert "150 stored" in message and "oldest finished job expires" in message


def test_erasing_an_identity_on_postgres(make_core: MakeCore) -> None:
    core = make_core()
    owner, other = new_identity(core), new_identity(core)
    jobs = [submit(core, owner, i=i) for i in range(3)]
    kept = submit(core, other)
    worker = new_worker(core)
    claimed = core.queue.claim(worker, 1)
    assert [c.id for c in claimed] == [jobs[0]]
    folder = core.blobs.job_dir(jobs[0])
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "data").write_bytes(b"secret")
    abuse.check_submission(core, owner)  # a rate-window row names the identity

    assert abuse.delete_identity(core, owner) == 3

    with core.sessions() as session:
        assert session.get(Identity, owner) is None
        assert session.scalars(select(Job.id).where(Job.owner_id == owner)).all() == []
        assert session.get(RateWindow, abuse.submit_key(owner)) is None
        assert session.scalar(select(func.count()).select_from(PendingPurge)) == 0
        assert session.scalars(select(Job.id)).all() == [kept]
    assert not folder.exists()
    # The worker running the erased job is told to stop it.
    answer = core.queue.heartbeat(
        worker, Heartbeat(running=[RunningJob(job_id=jobs[0], lease_id=claimed[0].lease_id)])
    )
    assert answer.abort == [jobs[0]]


def test_retention_on_postgres_with_two_purgers(make_core: MakeCore) -> None:
    cores = [make_core(retention_hours=1.0) for _ in range(2)]
    core = cores[0]
    owner = new_identity(core)
    worker = new_worker(core, slots=100)
    old = [submit(core, owner, i=i) for i in range(30)]
    running = submit(core, owner, kind="running")
    fresh = submit(core, owner, kind="fresh")
    leases = {c.id: c.lease_id for c in core.queue.claim(worker, 100)}
    for job_id in [*old, fresh]:
        core.queue.complete(
            worker, job_id, JobCompletion(lease_id=leases[job_id], state="succeeded")
        )
        core.blobs.job_dir(job_id).mkdir(parents=True)
    long_ago = utcnow() - timedelta(hours=2)
    with transaction(core.sessions) as session:
        session.execute(update(Job).where(Job.id.in_(old)).values(finished_at=long_ago))
        session.execute(update(Job).where(Job.id == running).values(created_at=long_ago))

    purged = run_threads(2, lambda i: retention.purge_expired(cores[i]))
    assert sum(purged) == len(old)  # type: ignore[arg-type]
    with core.sessions() as session:
        assert set(session.scalars(select(Job.id))) == {running, fresh}
        assert session.scalar(select(func.count()).select_from(PendingPurge)) == 0
    assert not any(core.blobs.job_dir(j).exists() for j in old)
    assert core.blobs.job_dir(fresh).exists()


def test_an_interrupted_purge_is_finished_by_the_next_sweep(core: Core) -> None:
    owner = new_identity(core)
    job_id = submit(core, owner)
    core.blobs.job_dir(job_id).mkdir(parents=True)
    with transaction(core.sessions) as session:
        seq = session.scalar(select(Job.seq).where(Job.id == job_id))
        assert seq is not None
        retention.delete_job_rows(session, [(seq, job_id)], utcnow())
    # ...the coordinator died here: the rows are gone, the folder is not.
    assert core.blobs.job_dir(job_id).exists()
    retention.sweep(core)
    assert not core.blobs.job_dir(job_id).exists()
    with core.sessions() as session:
        assert session.scalar(select(func.count()).select_from(PendingPurge)) == 0
