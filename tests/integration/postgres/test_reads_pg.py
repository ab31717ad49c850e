"""The owner's reads on a real PostgreSQL server: a job load is one statement (row,
envelope and files), sent outside any transaction (`read_each`: the driver sends no
BEGIN), and a job ended through one coordinator is read, whole, by another's event
stream and long-poll answer (woken through the relay), while the coordinator that ends
a job hands its own streams the ended view (no read); pooled connections are pinged
only after idling."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import event, text
from sqlalchemy.engine import Connection

from csml import ids
from csml.apps.echo import app as echo_app
from csml.coordinator.api_events import _changed
from csml.coordinator.notify import job_key
from csml.coordinator.state import Core
from csml.schemas import JobCompletion
from csml.store import jobs as store
from csml.store import jobs_write
from csml.store.db import counters, read_each, snapshot
from csml.store.tables import utcnow
from tests.clock import SetClock
from tests.cluster import wait_for
from tests.integration.postgres.support import MakeCore, new_identity, new_worker, submit
from tests.unit.inproc import InProcessCoordinator, sent_statements

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


def _file(kind: str, name: str, data: bytes, model_id: str | None = None) -> store.FileRow:
    digest = hashlib.sha256(data).hexdigest()
    return store.FileRow(kind, name, len(data), digest, "text/plain", f"blobs/{digest}", model_id)


def two_coordinators(
    stack: ExitStack, tmp_path: Path, db_url: str
) -> tuple[InProcessCoordinator, InProcessCoordinator]:
    """Two in-process coordinators on one PostgreSQL database, each listening on the
    relay (so each learns of the other's job ends), closed with `stack`."""
    clock = SetClock()
    a = InProcessCoordinator(tmp_path / "a", stack, clock, database_url=db_url)
    b = InProcessCoordinator(tmp_path / "b", stack, clock, database_url=db_url)
    for c in (a, b):
        relay = c.core.notifier.relay
        assert relay is not None and relay.listening.wait(30)
    return a, b


def test_a_load_is_one_statement_with_its_files(core: Core) -> None:
    owner = new_identity(core)
    files = [
        _file("input", "a", b"first"),
        _file("input", "b", b"second input"),
        _file("output", "out", b"made", model_id="m" * 64),
    ]
    new = jobs_write.NewJob(
        id=ids.new_id(),
        owner_id=owner,
        app="echo",
        operation="echo",
        params={"k": [1, "two"]},
        limits={},
        fair_rank=1,
        created_at=utcnow(),
        max_attempts=1,
    )
    core.writer.run(partial(jobs_write.insert_job, job=new, files=files, sealing=None))
    bare = submit(core, owner, word="none")
    tally = counters(core.engine)
    before = tally.statements
    row = core.queue.get(owner, new.id)
    assert tally.statements - before == 1
    assert sorted(row.files, key=lambda f: (f.kind, f.name)) == files
    assert row.params == {"k": [1, "two"]} and row.confidential is None
    assert core.queue.get(owner, bare).files == ()  # json_agg of no rows: NULL, read as ()
    listed = core.queue.list_jobs(owner, state=None, app=None, limit=5)
    assert [j.id for j in listed] == [bare, new.id] and listed[1] == row


def test_read_each_sends_no_begin_and_a_snapshot_does(core: Core) -> None:
    with read_each(core.engine) as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
        raw = conn.connection.dbapi_connection
        assert raw is not None and raw.info.transaction_status == TransactionStatus.IDLE
    with snapshot(core.engine) as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
        raw = conn.connection.dbapi_connection
        assert raw is not None and raw.info.transaction_status == TransactionStatus.INTRANS
    with core.engine.connect() as conn:  # the pool gave back a transactional connection
        conn.execute(text("SELECT 1"))
        raw = conn.connection.dbapi_connection
        assert raw is not None and raw.info.transaction_status == TransactionStatus.INTRANS


def test_a_job_ended_on_one_coordinator_is_read_whole_on_another(make_core: MakeCore) -> None:
    a, b = make_core(), make_core()
    owner = new_identity(a)
    job_id = submit(a, owner, word="hi")
    worker = new_worker(a)
    [claimed] = a.queue.claim(worker, 1)
    a.queue.complete(
        worker, job_id, JobCompletion(lease_id=claimed.lease_id, state="succeeded", result={"w": 1})
    )
    [sent] = _changed(b, owner, {job_id}, positions=False).values()
    view = json.loads(sent.text)
    assert (view["id"], view["state"], view["result"]) == (job_id, "succeeded", {"w": 1})
    assert b.queue.state_of(owner, job_id) == (job_id, "succeeded")
    assert _changed(b, new_identity(b), {job_id}, positions=False) == {}  # not the owner's


def test_a_long_poll_on_one_coordinator_is_answered_by_an_end_on_another(
    db_url: str, tmp_path: Path
) -> None:
    """Two coordinator apps on one database: a long-poll by whole id on B (subscribed
    before its one state read) is woken by the job's end on A through the relay, and
    answers with the job whole: B reads the state once and the job once (a wake-up by
    B's own re-check, every 5 s, would have read the state a second time)."""
    with ExitStack() as stack:
        a, b = two_coordinators(stack, tmp_path, db_url)
        user = a.new_user()
        on_b = b.client(user.token)
        worker = a.worker(echo_app)
        job = user.submit("echo", "echo", params={"far": True})
        [claimed] = worker.claim()
        owners = sent_statements(b, lambda flat: "WHERE jobs.owner_id = " in flat)
        with owners as reads, ThreadPoolExecutor(1) as pool:
            polling = pool.submit(on_b.request, "GET", f"/v1/jobs/{job.id}?wait=60")
            waiters = b.core.notifier._waiters
            wait_for(lambda: job_key(job.id) in waiters, timeout=30, interval=0.01)
            assert worker.complete(claimed, result={"far": True}).status_code == 204
            view = polling.result(timeout=60).json()
    assert (view["id"], view["state"], view["result"]) == (job.id, "succeeded", {"far": True})
    assert len(reads) == 2 and "files_json" in reads[1], reads


def test_a_plain_end_returns_the_row_a_load_gives(core: Core) -> None:
    """`end_held`'s RETURNING (columns and files subquery, on PostgreSQL's json_agg) plus
    the outputs it adds is the job a load reads afterwards: the view the finishing
    coordinator hands its streams is the view they would have loaded."""
    from dataclasses import replace

    from csml.coordinator.views import job_view
    from csml.store import jobs_end

    owner = new_identity(core)
    worker = new_worker(core)
    inputs = [_file("input", "a", b"first"), _file("input", "b", b"second input")]
    new = jobs_write.NewJob(
        id=ids.new_id(),
        owner_id=owner,
        app="echo",
        operation="echo",
        params={"k": 1},
        limits={"timeout_seconds": 60, "memory_mb": 256, "cpu_seconds": 60},
        fair_rank=1,
        created_at=utcnow(),
        max_attempts=1,
    )
    core.writer.run(partial(jobs_write.insert_job, job=new, files=inputs, sealing=None))
    [claimed] = core.queue.claim(worker, 1)
    assert claimed.id == new.id
    outputs = [_file("output", "out", b"made"), _file("output", "z", b"more")]
    held = jobs_end.HeldEnd(new.id, claimed.lease_id, "succeeded", {"w": 1}, None)

    def end(conn: Connection) -> store.JobRow | None:
        row = jobs_end.end_held(conn, worker.id, held, utcnow(), [])
        if row is not None:
            jobs_write.add_files(conn, row.seq, outputs)
        return row

    row = core.writer.run(end)
    assert row is not None and row.state == "succeeded" and row.lease_id is None
    handed = replace(row, files=(*row.files, *outputs))
    loaded = core.queue.get(owner, new.id)
    assert job_view(handed).model_dump(mode="json") == job_view(loaded).model_dump(mode="json")
    assert sorted(handed.files, key=lambda f: (f.kind, f.name)) == sorted(
        loaded.files, key=lambda f: (f.kind, f.name)
    )
    assert core.writer.run(end) is None  # a second completion matches nothing


def _kill_backends(url: str) -> None:
    """Terminate every other session of this database (as a server restart, an
    idle-session timeout or a proxy would drop them, unseen by the pool)."""
    from csml.store.db import make_engine

    admin = make_engine(url)
    try:
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND datname = current_database()"
                )
            )
            conn.commit()
    finally:
        admin.dispose()


def test_pooled_connections_are_pinged_only_after_idling(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ping for a connection used a moment ago (`pool_pre_ping` pinged at every
    checkout); one idle `PING_IDLE_SECONDS` is pinged, so a dropped one is replaced
    unseen; a dropped one used a moment ago fails its read once, and the pool (every
    older connection) is renewed for the next."""
    from sqlalchemy.exc import DBAPIError

    from csml.store import db

    engine = db.make_engine(db_url)
    pings: list[object] = []
    real_ping = engine.dialect.do_ping

    def counted_ping(dbapi_conn: object) -> bool:
        pings.append(dbapi_conn)
        return real_ping(dbapi_conn)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.dialect, "do_ping", counted_ping)
    stmt = text("SELECT 1")
    try:
        for _ in range(20):  # hot: used a moment ago, never pinged
            with read_each(engine) as conn:
                conn.execute(stmt).scalar()
        assert pings == []
        monkeypatch.setattr(db, "PING_IDLE_SECONDS", 0.0)  # every pooled one counts as idle
        _kill_backends(db_url)
        for _ in range(3):
            with read_each(engine) as conn:  # pinged, found dead, replaced: no error
                assert conn.execute(stmt).scalar() == 1
        assert len(pings) >= 1
        monkeypatch.setattr(db, "PING_IDLE_SECONDS", 3600.0)  # hot again: not pinged
        _kill_backends(db_url)
        with pytest.raises(DBAPIError) as failed, read_each(engine) as conn:
            conn.execute(stmt).scalar()
        assert failed.value.connection_invalidated
        for _ in range(3):  # the pool was renewed: the next reads work
            with read_each(engine) as conn:
                assert conn.execute(stmt).scalar() == 1
    finally:
        engine.dispose()


def test_an_end_reaches_streams_on_both_coordinators_read_only_through_the_relay(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's event streams on coordinator A (which commits the job's end) and on B:
    A's sends the view the end handed over and reads nothing; B's gets that view with
    the relayed key and reads nothing either; both send the same ended view."""

    from csml.coordinator import api_events
    from csml.coordinator.notify import owner_feed

    # The in-process transport hands a stream over only once it ends, so each stream
    # lasts this long; it covers opening both, the completion's commit and the relay
    # to B under a loaded CI machine (3 s did not, once: an empty stream from one of them).
    monkeypatch.setattr(api_events, "STREAM_SECONDS", 10.0)
    with ExitStack() as stack:
        a, b = two_coordinators(stack, tmp_path, db_url)
        user = a.new_user()
        on_b = b.client(user.token)
        worker = a.worker(echo_app)
        job = user.submit("echo", "echo", params={"both": True})
        [claimed] = worker.claim()
        with a.core.queue.read(each=True) as conn:
            row = store.by_id(conn, job.id)
        assert row is not None
        loads: dict[str, list[str]] = {"a": [], "b": []}

        def counter(name: str) -> Callable[..., None]:
            def count(_conn: object, _cur: object, statement: str, *_: object) -> None:
                if "files_json" in statement and "jobs.id IN" in statement:
                    loads[name].append(statement)

            return count

        counters_ = {"a": counter("a"), "b": counter("b")}
        path = "/v1/jobs/events?positions=false"
        for name, c in (("a", a), ("b", b)):
            event.listen(c.core.engine, "before_cursor_execute", counters_[name])
        try:
            with ThreadPoolExecutor(2) as pool:
                on_a_stream = pool.submit(user._http.get, path, headers=user._headers())
                on_b_stream = pool.submit(on_b._http.get, path, headers=on_b._headers())
                for c in (a, b):
                    feeds = c.core.notifier._feeds
                    wait_for(lambda f=feeds: owner_feed(row.owner_id) in f, 30, 0.01)
                assert worker.complete(claimed, result={"both": True}).status_code == 204
                streams = {"a": on_a_stream.result(timeout=60), "b": on_b_stream.result(60)}
        finally:
            for name, c in (("a", a), ("b", b)):
                event.remove(c.core.engine, "before_cursor_execute", counters_[name])
    last = {}
    for name, response in streams.items():
        assert response.status_code == 200
        events = [
            json.loads(line[5:])
            for block in response.text.split("\n\n")
            if "event: job" in block
            for line in block.split("\n")
            if line.startswith("data:")
        ]
        ours = [e for e in events if e["id"] == job.id]
        assert ours, f"coordinator {name}'s stream sent no event of the job: {response.text!r}"
        last[name] = ours[-1]
    assert last["a"] == last["b"] and last["a"]["state"] == "succeeded"
    assert last["a"]["result"] == {"both": True}
    assert (len(loads["a"]), len(loads["b"])) == (0, 0), loads
