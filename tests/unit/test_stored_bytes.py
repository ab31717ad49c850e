"""The stored-bytes counter (`identities.stored_bytes`, kept by triggers: migration
0011_stored_bytes) on SQLite: after any sequence of what adds or removes counted rows it
equals the sum the quota used to compute per submission (hypothesis, and a few named
cases); the migration backfills it from the rows already there; the quota refuses at
its limit from the counter and makes room when bytes leave. PostgreSQL:
tests/integration/postgres/test_stored_bytes_pg.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from csml.apps.base import App, JobContext, ModelSpec, OperationParams, Output
from csml.apps.echo import app as echo_app
from csml.store import jobs_quota
from csml.store.db import make_engine, migrate, sqlite_url
from csml.store.tables import Identity
from tests.stored_bytes_ops import KINDS, NAMED, SEEDED, Op, Store, seed_at_0010
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import error_of
from tests.unit.migrations import store_at

OPS = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(0, 7),
        st.integers(0, 7),
        st.integers(0, 7),
    ),
    max_size=40,
)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    yield Store(engine)
    engine.dispose()


def test_the_counter_equals_the_sum_after_any_sequence(store: Store) -> None:
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(ops=OPS)
    def run(ops: list[Op]) -> None:
        store.play(ops)  # checks after every operation

    run()


def test_named_sequences(store: Store) -> None:
    """Cases worth naming (each also a sequence the property test may draw)."""
    for ops in NAMED:
        store.play(ops)


def test_a_job_owner_never_changes(store: Store) -> None:
    """The counts are keyed by a job's owner: a change of it is refused, not miscounted."""
    run = store.play([("submit", 0, 1, 1)])
    with pytest.raises(Exception, match="never change"), store.engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET owner_id = :other WHERE owner_id = :owner"),
            {"other": run.owners[1], "owner": run.owners[0]},
        )
    store.check(run.owners)


def test_the_migration_counts_what_is_already_stored(tmp_path: Path) -> None:
    """Rows of every counted kind at 0010; after 0011 each identity's counter is the sum
    (the blob two jobs share once, the model whose job is gone, params), and new rows
    count from there; the downgrade drops it all."""
    with store_at(tmp_path, "0010_placement") as old, old.engine.connect() as conn:
        seed_at_0010(conn)
        summed = {o: jobs_quota.summed_stored_bytes(conn, o) for o in SEEDED}
        conn.commit()
        assert summed == SEEDED
        old.to(conn, "0011_stored_bytes")
        for owner, total in SEEDED.items():
            assert jobs_quota.stored_bytes(conn, owner) == total
        conn.execute(text("DELETE FROM jobs WHERE id = 'j1'"))  # m1 is the job's no longer
        conn.commit()
        assert jobs_quota.stored_bytes(conn, "a") == 100 + 30 + 20000 + 1000
        assert jobs_quota.stored_bytes(conn, "a") == jobs_quota.summed_stored_bytes(conn, "a")
        old.to(conn, "0010_placement", down=True)
        names = set(conn.scalars(text("SELECT name FROM sqlite_master")))
        assert "stored_blobs" not in names and not any(n.startswith("stored_bytes") for n in names)
        columns = {row[1] for row in conn.execute(text("PRAGMA table_info(identities)"))}
        assert "stored_bytes" not in columns


trainer = App("trainer", version="1.0", description="Writes a tiny model (a test app).")


class TrainParams(OperationParams):
    size: int = 2


@trainer.operation(
    outputs=[Output("model", "The weights.", "application/json", model=ModelSpec("toy", "toy"))]
)
def train(ctx: JobContext, params: TrainParams) -> dict[str, Any]:
    """Write `size` zero weights."""
    ctx.output("model").write_text(json.dumps([0.0] * params.size))
    return {"size": params.size}


def test_the_quota_refuses_at_its_limit_and_a_kept_model_still_counts(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    """Params, outputs and a model kept from them count through the counter: a submission
    that would pass the limit is refused (429, the stored bytes named), one that reaches
    it exactly is admitted, and then even a job that stores nothing is refused; the model
    outlives its job's expiry and still counts, and deleting it makes room."""
    coordinator = make_coordinator(max_stored_bytes=4000, retention_hours=1, max_models=5)
    worker = coordinator.worker(trainer)
    user = coordinator.new_user()
    job = user.submit("trainer", "train", params={"size": 200})
    [claimed] = worker.claim()
    assert worker.run(claimed, tmp_path).status_code == 204
    assert job.refresh().state.value == "succeeded"
    [model] = user.models()
    with coordinator.core.queue.read() as conn:
        owner = conn.scalar(select(Identity.id).order_by(Identity.created_at.desc()).limit(1))
        assert owner is not None
        stored = jobs_quota.stored_bytes(conn, owner)
        assert stored == jobs_quota.summed_stored_bytes(conn, owner)
    assert stored == model.size + len('{"size": 200}')  # the output (shared with the model)

    def post(size: int) -> Any:
        body = {"app": "trainer", "operation": "train", "params": {"size": size}}
        headers = {"Authorization": f"Bearer {user.token}"}
        return coordinator.http.post("/v1/jobs", json=body, headers=headers)

    # Params of exactly the room left (compact JSON, as the quota counts a new job): in.
    room = 4000 - stored
    fits = room - len('{"size":}')
    assert fits > 0
    r = post(int("9" * (fits + 1)))  # one byte past: refused, and says what is stored
    assert r.status_code == 429 and error_of(r)["code"] == "storage_quota", r.text
    assert f"({stored} stored and this upload is" in error_of(r)["message"]
    exact = user.submit("trainer", "train", params={"size": int("9" * fits)})  # reaches it
    with coordinator.core.queue.read() as conn:
        stored = jobs_quota.stored_bytes(conn, owner)
        assert stored == jobs_quota.summed_stored_bytes(conn, owner) >= 4000
    r = post(1)  # stores (as good as) nothing, but the quota is reached
    assert r.status_code == 429 and error_of(r)["details"][0]["stored"] == stored, r.text
    exact.cancel()
    # Expiry removes the jobs, the output and the params; the model outlives its job.
    coordinator.clock.advance(3601)
    assert coordinator.sweep() == 2
    with coordinator.core.queue.read() as conn:
        assert jobs_quota.stored_bytes(conn, owner) == model.size
        assert jobs_quota.summed_stored_bytes(conn, owner) == model.size
    user.delete_model(model.id)
    with coordinator.core.queue.read() as conn:
        assert jobs_quota.stored_bytes(conn, owner) == 0


def test_an_upload_is_refused_once_the_counter_reaches_the_limit(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    """Input files count at submission, outputs at completion: once they reach the
    limit exactly, even a job that stores nothing is refused; expiry makes room."""
    coordinator = make_coordinator(max_stored_bytes=1000, retention_hours=1)
    worker = coordinator.worker(echo_app)
    user = coordinator.new_user()
    job = user.submit("echo", "echo", files={"data": b"z" * 500})  # 500 in, 500 out
    [claimed] = worker.claim()
    assert worker.run(claimed, tmp_path).status_code == 204
    assert job.refresh().state.value == "succeeded"
    r = coordinator.http.post(
        "/v1/jobs",
        json={"app": "echo", "operation": "echo", "params": {}},
        headers={"Authorization": f"Bearer {user.token}"},
    )
    assert r.status_code == 429, r.text
    assert error_of(r)["details"][0]["stored"] == 1000
    coordinator.clock.advance(3601)
    assert coordinator.sweep() == 1
    again = user.submit("echo", "echo", files={"data": b"z" * 500})
    assert again.state.value == "queued"
