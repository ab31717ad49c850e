"""Quota counting on its own (SQLite in a temporary folder, no processes): which jobs
reserve models, how a pipeline's reservation shrinks as it advances, the refusals, and
the event-stream slots. The races themselves are in tests/security/test_row03_quotas.py
and test_row11_event_streams.py, against real coordinator processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from csml import ids
from csml.apps.base import App, JobContext, ModelSpec, OperationParams, Output
from csml.coordinator import quotas
from csml.coordinator.api_events import StreamSlots
from csml.coordinator.catalog import Catalog
from csml.coordinator.config import Settings
from csml.coordinator.errors import status_of
from csml.refusals import Refusal
from csml.store.db import make_engine, make_sessionmaker, migrate, sqlite_url, transaction
from csml.store.tables import AppRecord, Identity, Job, utcnow

maker = App("maker", version="1.0", description="Operations that keep models, for tests.")
SPEC = ModelSpec("thing", "csml-test-thing", 1)


class NoParams(OperationParams):
    pass


@maker.operation(outputs=[Output("a", model=SPEC), Output("b", model=SPEC), Output("log")])
def make_two(ctx: JobContext, params: NoParams) -> dict[str, Any]:
    return {}


@maker.operation(outputs=[Output("log")])
def plain(ctx: JobContext, params: NoParams) -> dict[str, Any]:
    return {}


class Owner:
    def __init__(self, **settings: Any) -> None:
        self.settings = Settings(**settings)


def job(owner: str, app: str, operation: str, state: str, **extra: Any) -> Job:
    return Job(
        id=ids.new_id(),
        owner_id=owner,
        app=app,
        operation=operation,
        params=extra.pop("params", {}),
        limits={},
        state=state,
        fair_rank=1,
        created_at=utcnow(),
        attempts=0,
        max_attempts=1,
        progress_fraction=0.0,
        progress_message="",
        files=[],
        **extra,
    )


def test_reserved_models_count_active_jobs_and_the_rest_of_each_pipeline(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    sessions = make_sessionmaker(engine)
    catalog = Catalog(sessions)
    me, other = ids.new_id(), ids.new_id()
    steps = [{"app": "maker", "operation": op} for op in ("make_two", "plain", "make_two")]
    with transaction(sessions) as session:
        manifest = maker.manifest().model_dump(mode="json")  # as a catalogued app's row
        session.add(AppRecord(name="maker", version="1.0", manifest=manifest, updated_at=utcnow()))
        for who in (me, other):
            session.add(Identity(id=who, token_hash=ids.new_id(), created_at=utcnow()))
        session.flush()
        session.add(job(me, "maker", "make_two", "queued"))  # 2
        session.add(job(me, "maker", "make_two", "running"))  # 2
        session.add(job(me, "maker", "make_two", "succeeded"))  # ended: 0
        session.add(job(me, "maker", "plain", "queued"))  # keeps none
        session.add(job(other, "maker", "make_two", "queued"))  # not mine
        parent = job(me, "pipeline", "run", "running", params={"steps": steps}, step_index=1)
        session.add(parent)
        session.flush()
        # Its current step (1, plain) as a row of its own: counted through the parent only.
        session.add(job(me, "maker", "plain", "queued", parent_seq=parent.seq, step_index=1))
    with sessions() as session:
        # 2 + 2 for the single jobs, then steps 1 (plain, 0) and 2 (make_two, 2) of the pipeline
        assert quotas.reserved_models(session, catalog, me) == 6
        assert quotas.reserved_models(session, catalog, other) == 2
        assert quotas.lock_identity(session, me)
        assert not quotas.lock_identity(session, ids.new_id())
    with transaction(sessions) as session:
        moved = session.get(Job, parent.seq)
        assert moved is not None
        moved.step_index = 2
    with sessions() as session:
        assert quotas.reserved_models(session, catalog, me) == 6  # step 2 still to come
    with transaction(sessions) as session:
        ended = session.get(Job, parent.seq)
        assert ended is not None
        ended.state = "succeeded"
    with sessions() as session:
        assert quotas.reserved_models(session, catalog, me) == 4
    engine.dispose()


def test_model_refusals_name_the_limit_and_what_counts() -> None:
    owner = Owner(max_models=3)
    quotas.check_models(owner, count=1, adding=1, reserved=1)  # 3 of 3: fits
    with pytest.raises(Refusal) as full:
        quotas.check_models(owner, count=1, adding=2, reserved=1)
    assert status_of(full.value) == 429 and full.value.code == "model_quota"
    assert (
        "3 models per identity" in full.value.message and "1 more to be kept" in full.value.message
    )
    assert full.value.retry_after  # sent as Retry-After
    with pytest.raises(Refusal) as never:
        quotas.check_models(owner, count=0, adding=8)
    assert status_of(never.value) == 422 and "would keep 8 models" in never.value.message
    quotas.check_models(Owner(max_models=0), count=100, adding=100)  # 0: no limit


def test_stream_slots_are_taken_atomically_and_given_back_once() -> None:
    slots = StreamSlots(2)
    first, second = slots.take("a"), slots.take("a")
    assert first is not None and second is not None
    assert slots.take("a") is None
    assert slots.take("b") is not None  # per identity
    first()
    first()  # a second release gives nothing more back
    third = slots.take("a")
    assert third is not None
    assert slots.take("a") is None
