"""The job store (`csml.store.jobs*`) behind the queue: frozen rows, the owner's lookups by
id or prefix (never another owner's; an ambiguous prefix refused), a job loaded with
its files and envelope in one statement and no read transaction (no BEGIN), and a batch
completion that names one job twice keeping exactly one result."""

from __future__ import annotations

import dataclasses
import hashlib
from functools import partial

import pytest
from sqlalchemy import event, select

from csml import ids
from csml.apps.echo import app as echo_app
from csml.refusals import Malformed, NotFound
from csml.store import jobs as store
from csml.store import jobs_write
from csml.store.db import counters
from csml.store.tables import utcnow
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import HttpWorker, InProcessCoordinator, sent_statements


def owner_of(coordinator: InProcessCoordinator, job_id: str) -> str:
    with coordinator.core.queue.read() as conn:
        row = store.by_id(conn, job_id)
    assert row is not None
    return row.owner_id


def test_a_job_is_found_by_its_owner_only_by_id_or_unique_prefix(
    coordinator: InProcessCoordinator,
) -> None:
    alice, bob = coordinator.new_user(), coordinator.new_user()
    job = alice.submit("echo", "echo", params={"n": 1})
    intruder = owner_of(coordinator, bob.submit("echo", "echo").id)
    owner = owner_of(coordinator, job.id)
    queue = coordinator.core.queue
    row = queue.get(owner, job.id)
    assert (row.id, row.app, row.state, row.params) == (job.id, "echo", "queued", {"n": 1})
    assert row.confidential is None and row.files == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.state = "running"  # type: ignore[misc]
    assert queue.get(owner, job.id[:12]).id == job.id
    assert queue.state_of(owner, job.id[:16]) == (job.id, "queued")
    for ident in (job.id, job.id[:12]):
        with pytest.raises(NotFound):
            queue.get(intruder, ident)  # another owner's: not found, never forbidden
    with pytest.raises(NotFound):
        queue.get(owner, "%" * 12)  # not an id: no LIKE pattern reaches the SQL


def test_an_ambiguous_prefix_is_refused(coordinator: InProcessCoordinator) -> None:
    job = coordinator.new_user().submit("echo", "echo")
    owner = owner_of(coordinator, job.id)
    prefix = "abcdef012345"
    for _ in range(2):  # two jobs whose ids share a 12-digit prefix
        new = jobs_write.NewJob(
            id=prefix + ids.new_id()[12:],
            owner_id=owner,
            app="echo",
            operation="echo",
            params={},
            limits={},
            fair_rank=1,
            created_at=utcnow(),
            max_attempts=1,
        )
        coordinator.core.writer.run(partial(jobs_write.insert_job, job=new, files=[], sealing=None))
    with pytest.raises(Malformed) as err:
        coordinator.core.queue.get(owner, prefix)
    assert err.value.code == "ambiguous_id"
    assert coordinator.core.queue.get(owner, prefix + new.id[12:20]).id == new.id


def test_a_load_is_one_statement_with_its_files_and_no_begin(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo", files={"data": b"some bytes"}, params={"text": "hi"})
    bare = user.submit("echo", "echo")
    [claimed] = echo_worker.claim()
    assert claimed.id == job.id
    assert echo_worker.upload(claimed, "data", b"more bytes").status_code < 300
    assert echo_worker.complete(claimed, result={"echo": "hi"}).status_code == 204
    owner = owner_of(coordinator, job.id)
    queue = coordinator.core.queue
    with sent_statements(coordinator) as sent:
        row = queue.get(owner, job.id)
    assert row.state == "succeeded" and row.result == {"echo": "hi"}
    assert len(sent) == 1 and sent[0].startswith("SELECT jobs.seq")  # no BEGIN, no 2nd read
    files = {(f.kind, f.name): f for f in row.files}
    assert set(files) == {("input", "data"), ("output", "data")}
    data = files["input", "data"]
    assert (data.size, data.sha256) == (10, hashlib.sha256(b"some bytes").hexdigest())
    assert data.model_id is None and data.media_type and data.blob
    assert files["output", "data"].size == len(b"more bytes")
    # The files and the row are read together: the same as the files' own table holds.
    with queue.read() as conn:
        stored = conn.execute(select(store.FILES).where(store.FILES.c.job_seq == row.seq)).all()
    assert list(row.files) == [
        store.FileRow(f.kind, f.name, f.size, f.sha256, f.media_type, f.blob, f.model_id)
        for f in stored
    ]
    with sent_statements(coordinator) as sent:
        assert queue.get(owner, bare.id).files == ()  # no files: an empty tuple
        assert queue.state_of(owner, bare.id) == (bare.id, "queued")
        listed = queue.list_jobs(owner, state=None, app=None, limit=10)
        changed = queue.changed_jobs(owner, {job.id, bare.id})
    assert [j.id for j in listed] == [bare.id, job.id] and listed[1] == row
    assert [j.id for j in changed] == [job.id, bare.id] and changed[0] == row
    assert len(sent) == 4 and not any(s.startswith("BEGIN") for s in sent)


def test_a_snapshot_read_still_begins_a_transaction(coordinator: InProcessCoordinator) -> None:
    """`read()` (several statements that must agree) is a read transaction on SQLite."""
    with sent_statements(coordinator) as sent, coordinator.core.queue.read() as conn:
        store.queued_depth(conn, "echo")
    assert sent[0] == "BEGIN" and len(sent) == 2


def test_one_job_twice_in_a_completion_batch_keeps_one_result(
    coordinator: InProcessCoordinator,
) -> None:
    worker = coordinator.worker(echo_app)
    job = coordinator.new_user().submit("echo", "echo")
    [claimed] = worker.claim()
    done = {"job_id": job.id, "lease_id": claimed.lease_id, "state": "succeeded"}
    r = worker.post(
        "/complete", {"completions": [{**done, "result": {"n": 1}}, {**done, "result": {"n": 2}}]}
    )
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert first["status"] == 204
    assert second["status"] == 409 and "no longer yours" in second["error"]
    job.refresh()
    assert job.state.value == "succeeded" and job.result == {"n": 1}


def test_a_claim_writes_a_riding_heartbeat_only_when_the_lease_needs_it(
    make_coordinator: MakeCoordinator,
) -> None:
    coordinator = make_coordinator(lease_seconds=30.0, heartbeat_seconds=10.0)
    worker = coordinator.worker(echo_app)
    job = coordinator.new_user().submit("echo", "echo")
    [claimed] = worker.claim()
    engine = coordinator.core.engine
    beat = {"job_id": job.id, "lease_id": claimed.lease_id, "progress": {"fraction": 0.0}}

    def lease_end() -> object:
        with coordinator.core.queue.read() as conn:
            return store.leases(conn, [job.id])[job.id].lease_expires_at

    def claim_with_beat(**progress: object) -> dict[str, object]:
        body = {"max_jobs": 1, "wait": 0, "running": [{**beat, "progress": progress}]}
        r = worker.post("/claim", body)
        assert r.status_code == 200, r.text
        answer: dict[str, object] = r.json()
        return answer

    first_end, commits = lease_end(), counters(engine).write_commits
    assert claim_with_beat(fraction=0.0) == {"jobs": [], "abort": [], "results": []}
    assert counters(engine).write_commits == commits  # lease fresh: nothing written
    assert lease_end() == first_end
    coordinator.clock.advance(6)  # more than half a heartbeat interval: extended
    assert claim_with_beat(fraction=0.0)["abort"] == []
    assert counters(engine).write_commits == commits + 1 and lease_end() != first_end
    claim_with_beat(fraction=0.5, message="half")  # progress is always written
    assert counters(engine).write_commits == commits + 2
    coordinator.core.queue.cancel(owner_of(coordinator, job.id), job.id)
    commits = counters(engine).write_commits
    assert claim_with_beat(fraction=0.5, message="half")["abort"] == [job.id]
    # A job that ended is aborted from the read: nothing written (on PostgreSQL a write
    # would lock the worker's other running jobs, whose completions may be on their way).
    assert counters(engine).write_commits == commits


def test_an_ended_job_in_a_claim_does_not_extend_the_others_leases(
    make_coordinator: MakeCoordinator,
) -> None:
    coordinator = make_coordinator(lease_seconds=30.0, heartbeat_seconds=10.0)
    worker = coordinator.worker(echo_app)
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo", params={"i": i}) for i in range(2)]
    claimed = worker.claim(2)
    engine = coordinator.core.engine
    done = {"job_id": claimed[0].id, "lease_id": claimed[0].lease_id, "state": "succeeded"}
    assert worker.post("/complete", {"completions": [{**done, "result": {}}]}).status_code == 200
    running = [
        {"job_id": c.id, "lease_id": c.lease_id, "progress": {"fraction": 0.0}} for c in claimed
    ]
    commits = counters(engine).write_commits
    sent: list[str] = []

    def record(_c: object, _cur: object, statement: str, *_rest: object) -> None:
        # Not the worker's token look-up: its cache entry lives 2 s (worker_tokens.TTL_SECONDS),
        # which a loaded machine can outlast between the claims above and this one.
        if "token_hash" not in statement:
            sent.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        r = worker.post("/claim", {"max_jobs": 1, "wait": 0, "running": running})
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert r.status_code == 200, r.text
    assert r.json() == {"jobs": [], "abort": [claimed[0].id], "results": []}
    # Two reads (the leases, the queue probe): no lease extension, no transaction.
    assert counters(engine).write_commits == commits
    assert sent.count("SELECT") == 2 and not {"UPDATE", "INSERT", "DELETE"} & set(sent)
    assert {j.id for j in jobs} == {c.id for c in claimed}


def test_the_rank_upsert_reads_the_served_rank_itself(coordinator: InProcessCoordinator) -> None:
    """One statement: one past the larger of the owner's last rank and the app's served
    rank, and no row at all (None) for an app that does not exist."""
    from sqlalchemy import update

    a = owner_of(coordinator, coordinator.new_user().submit("echo", "echo").id)  # rank 1
    b = owner_of(coordinator, coordinator.new_user().submit("echo", "echo").id)  # rank 1
    with coordinator.core.engine.begin() as conn:
        assert jobs_write.next_rank(conn, "echo", a) == 2  # its own last rank + 1
        conn.execute(update(store.APPS).where(store.APPS.c.name == "echo").values(served_rank=9))
        assert jobs_write.next_rank(conn, "echo", a) == 10  # behind: joins at served + 1
        assert jobs_write.next_rank(conn, "echo", b) == 10
        assert jobs_write.next_rank(conn, "echo", a) == 11  # ahead: its own last rank + 1
        assert jobs_write.next_rank(conn, "no-such-app", a) is None
        rows = conn.execute(
            store.COUNTERS.select().where(store.COUNTERS.c.app == "no-such-app")
        ).all()
        assert rows == []
        conn.rollback()
