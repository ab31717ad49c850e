"""Prepared statements (`csml.store.prepared`) on SQLite: each sends the SQL and driver
values SQLAlchemy Core sends for the same statement and parameters, returns the same rows
(values and types: JSON, timestamps, booleans, bytes, floats), is counted in the
engine's statement counters with its kind, raises SQLAlchemy's wrapped errors, and
begins a transaction exactly when `Connection.execute` would. The store's hot statements
(submission, claim, heartbeat, completion, loads, probe) are each checked against Core
on a store with jobs in it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc, insert
from sqlalchemy.engine import Connection

from csml import ids
from csml.store import jobs as store
from csml.store import jobs_end, jobs_write
from csml.store.db import make_engine, read_each, snapshot, sqlite_url
from csml.store.jobs import FileRow
from csml.store.prepared import Prepared
from csml.store.tables import utcnow
from tests.prepared_checks import (
    INSERT,
    ROWS,
    THINGS,
    check_round_trips,
    create,
    recorded,
    same_as_core,
)
from tests.unit.inproc import HttpWorker, InProcessCoordinator


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    made = make_engine(sqlite_url(tmp_path))
    create(made)
    yield made
    made.dispose()


def test_types_round_trip_as_through_core(engine: Any) -> None:
    check_round_trips(engine)


def test_a_driver_error_is_sqlalchemys_and_the_writes_before_it_stay(engine: Any) -> None:
    with engine.connect() as conn:
        conn.begin()
        [row] = Prepared(INSERT).rows(conn, ROWS[0])
        with pytest.raises(exc.IntegrityError) as raised:
            Prepared(INSERT).rows(conn, {**ROWS[1], "seq": row[0]})  # the same key
        assert raised.value.orig is not None  # what `db.is_conflict` reads
        assert conn.in_transaction()
        assert conn.execute(THINGS.select()).all()[0][0] == row[0]
        conn.rollback()


def test_a_statement_begins_as_execute_would(engine: Any) -> None:
    """In a snapshot, the first statement begins the read transaction (SQLite: BEGIN);
    on a `read_each` connection nothing is sent but the statement."""
    select_all = Prepared(THINGS.select())
    with engine.connect() as conn:
        conn.execute(insert(THINGS), ROWS[0])
        conn.commit()
    for way, opened in ((snapshot, ["BEGIN"]), (read_each, [])):
        with way(engine) as conn, recorded(engine) as sent:
            assert len(select_all.rows(conn, {})) == 1
            assert conn.in_transaction()
            assert [s for s, _p in sent] == [*opened, str(THINGS.select().compile(engine))]


def test_plans_are_made_per_parameter_names_and_list_lengths(engine: Any) -> None:
    from tests.prepared_checks import BY_NAMES

    by_names = Prepared(BY_NAMES)
    with engine.connect() as conn:
        conn.begin()
        for row in ROWS:
            conn.execute(insert(THINGS), row)
        assert [r[1] for r in by_names.rows(conn, {"names": ["a", "b"]})] == ["a", "b"]
        assert [r[1] for r in by_names.rows(conn, {"names": ["c"]})] == ["c"]
        assert by_names.rows(conn, {"names": []}) == []
        assert [r[1] for r in by_names.rows(conn, {"names": ["b", "a"]})] == ["a", "b"]
        conn.rollback()
    assert len(by_names._plans) == 3  # lengths 2, 1, 0: one plan each


# -- the store's hot statements, each against Core on a store with jobs ----------------


def _new_job(owner: str, fair_rank: int, **extra: Any) -> jobs_write.NewJob:
    return jobs_write.NewJob(
        id=ids.new_id(),
        owner_id=owner,
        app="echo",
        operation="echo",
        params={"n": fair_rank, "text": "é☃"},
        limits={"cpu_seconds": 5},
        fair_rank=fair_rank,
        created_at=utcnow(),
        max_attempts=3,
        **extra,
    )


FILE = FileRow("input", "a.bin", 3, "ab" * 32, "application/octet-stream", "blob1")


def test_the_store_hot_statements_send_and_return_what_core_does(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    engine = coordinator.core.engine
    user = coordinator.new_user()
    job_id = user.submit("echo", "echo", params={"x": 1}).id
    with read_each(engine) as conn:
        row = store.by_id(conn, job_id)
    assert row is not None
    owner, worker = row.owner_id, echo_worker.id
    now = utcnow()
    later = now + timedelta(seconds=30)
    lease = ids.new_id()
    fresh = [(_new_job(owner, 5), [FILE]), (_new_job(owner, 6), [])]  # the same each time
    jobs = [new.id for new, _files in fresh]

    def queued(conn: Connection) -> None:
        for new, files in fresh:
            jobs_write.insert_job(conn, new, files, None)

    def taken(conn: Connection) -> None:
        queued(conn)
        got = jobs_write.take(conn, worker, "echo", 3, lease, now, later)
        assert {c.id for c in got} >= set(jobs)

    take = {
        "b_worker": worker,
        "b_app": "echo",
        "max_jobs": 3,
        "b_lease": lease,
        "b_until": later,
        "b_now": now,
        "b_met": [],
    }
    rows = same_as_core(
        engine, jobs_write._take_statement("plain", False, False, False).stmt, take, setup=queued
    )
    assert len(rows) == 3 and any(r[9] for r in rows)  # one has inputs
    credited = jobs_write._take_statement("credited", False, False, False)
    same_as_core(engine, credited.stmt, take, setup=queued)
    same_as_core(engine, jobs_write._INPUTS.stmt, {"seqs": [r[0] for r in rows]}, setup=queued)
    same_as_core(engine, jobs_write._SERVE.stmt, {"b_app": "echo", "b_top": 6}, returns=False)
    same_as_core(
        engine, jobs_write._STAMP_WORKER.stmt, {"worker_id": worker, "b_now": now}, returns=False
    )
    rank = {"b_app": "echo", "b_owner": owner}
    same_as_core(engine, jobs_write._RANK_UPSERT["sqlite"].stmt, rank)
    new = _new_job(owner, 9)
    insert_params = {
        "id": new.id,
        "owner_id": owner,
        "app": "echo",
        "operation": "echo",
        "params": new.params,
        "limits": new.limits,
        "state": "queued",
        "fair_rank": 9,
        "created_at": now,
        "attempts": 0,
        "max_attempts": 3,
        "progress_fraction": 0.0,
        "progress_message": "",
        "requires_key": None,
        "warm_key": None,
        "trusted_only": False,
        "min_reputation": None,
        "verify_runs": 0,
    }
    same_as_core(engine, jobs_write._INSERT_JOB.stmt, insert_params)
    beats = {"leases": [(j, lease) for j in [job_id]], "b_worker": worker, "b_until": later}
    same_as_core(engine, jobs_write._EXTEND.stmt, beats, setup=taken)
    same_as_core(engine, store._LEASES.stmt, {"ids": [job_id, "nope"]}, setup=taken)
    for ended in ("succeeded", "failed"):
        held = jobs_end._end_held_statement(ended == "succeeded")
        end: dict[str, Any] = {
            "b_job": job_id,
            "b_lease": lease,
            "b_worker": worker,
            "b_state": ended,
            "b_now": later,
            "b_error": None if ended == "succeeded" else "it broke",
            "b_result": {"ok": [1, 2], "ü": None} if ended == "succeeded" else None,
            "b_models": [],
        }
        [back] = same_as_core(engine, held.stmt, end, setup=taken)
        assert store.plain_row(back).state == ended
    probe = store._probe(False, False, False)
    same_as_core(engine, probe.stmt, {"worker_id": worker, "app": "echo", "met": []})
    same_as_core(engine, probe.stmt, {"worker_id": worker, "app": "echo", "met": ["k"]})
    owned = {"owner_id": owner, "ident": job_id}
    [loaded] = same_as_core(engine, store._OWNED[True].stmt, owned, setup=taken)
    assert store._job(loaded).id == job_id
    same_as_core(engine, store._OWNED[False].stmt, {**owned, "ident": job_id[:12] + "%"})
    same_as_core(engine, store._BY_ID.stmt, {"job_id": job_id})
    keys = {"owner_id": owner, "keys": [job_id]}
    same_as_core(engine, store._OWNED_IN["id"].stmt, keys, setup=taken)


def test_rows_read_by_position_are_the_rows_read_by_name(
    coordinator: InProcessCoordinator,
) -> None:
    """A job loaded through a `Prepared` statement (rows by position) is the job Core's
    named row gives, files and all."""
    engine = coordinator.core.engine
    job_id = coordinator.new_user().submit("echo", "echo", params={"x": [1, "ü"]}).id
    with read_each(engine) as conn:
        fast = store.by_id(conn, job_id)
        row = conn.execute(store._BY_ID.stmt, {"job_id": job_id}).one()
    assert fast is not None
    m = row._mapping
    assert fast == store.JobRow(
        **{k: m[k] for k in store._JOB_FIELDS}, files=store._files(m["files_json"])
    )
