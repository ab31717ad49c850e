"""Pipelines on a real PostgreSQL server: steps completing, failing, reaped and cancelled
concurrently keep every pipeline consistent, with no deadlock."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from csml.coordinator import pipelines
from csml.coordinator.errors import ApiError
from csml.coordinator.state import Core
from csml.refusals import Refusal
from csml.schemas import JobCompletion, PipelineSpec
from csml.store.jobs import steps_of
from csml.store.tables import Job
from tests.integration.postgres.support import MakeCore, expire_leases, new_identity, new_worker

# Starts a private PostgreSQL server (initdb) for the session's first test; races
# pipelines for up to 120 s.
pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(300)]

THREE_ECHOES = PipelineSpec.model_validate(
    {
        "steps": [
            {"name": "one", "app": "echo", "operation": "echo", "params": {"i": 1}},
            {"name": "two", "app": "echo", "operation": "echo", "inputs": {"data": "one.data"}},
            {"name": "three", "app": "echo", "operation": "echo", "params": {"i": 3}},
        ]
    }
)


def rows(core: Core) -> list[Job]:
    with core.sessions() as session:
        found = list(session.scalars(select(Job)).all())
        session.expunge_all()
        return found


def test_a_pipeline_runs_its_steps_in_order_and_ends_once(core: Core) -> None:
    owner = new_identity(core)
    worker = new_worker(core)
    parent = pipelines.submit(core, owner, THREE_ECHOES, None, {})
    for i in range(3):
        [claimed] = core.queue.claim(worker, 4)  # only the current step is ever queued
        assert claimed.params.get("i") == (i + 1 if i != 1 else None)
        done = JobCompletion(lease_id=claimed.lease_id, state="succeeded", result={"n": i})
        core.queue.complete(worker, claimed.id, done)
    assert core.queue.claim(worker, 4) == []
    row = core.queue.get(owner, parent.id)
    with core.queue.read() as conn:
        view = steps_of(conn, [row.seq])[row.seq]
    assert sorted(s.step_index or 0 for s in view) == [0, 1, 2]
    final = core.queue.get(owner, parent.id)
    assert final.state == "succeeded"
    assert final.result == {"steps": {"one": {"n": 0}, "two": {"n": 1}, "three": {"n": 2}}}


def test_concurrent_completion_reaping_and_cancelling(make_core: MakeCore) -> None:
    core = make_core(max_attempts=2, queue_capacity=10_000, lease_seconds=3600)
    other = make_core(max_attempts=2, queue_capacity=10_000, lease_seconds=3600)
    owner = new_identity(core)
    workers = [new_worker(core, slots=8) for _ in range(4)]
    parents = [pipelines.submit(core, owner, THREE_ECHOES, None, {}).id for _ in range(60)]
    to_cancel = set(random.Random(7).sample(parents, 20))
    unexpected: list[BaseException] = []
    stop = threading.Event()

    def work(n: int) -> None:
        c = core if n % 2 else other
        rng = random.Random(n)
        worker = workers[n % len(workers)]
        while not stop.is_set():
            claimed = c.queue.claim(worker, 3)
            if not claimed:
                time.sleep(0.01)
                continue
            for job in claimed:
                roll = rng.random()
                try:
                    if roll < 0.1:  # the worker goes silent: its lease ends, the reaper acts
                        expire_leases(c, job.id)
                        continue
                    state = "failed" if roll < 0.15 else "succeeded"
                    done = JobCompletion(
                        lease_id=job.lease_id, state=state, result={"ok": 1}, error="boom"
                    )
                    c.queue.complete(worker, job.id, done)
                except (ApiError, Refusal) as exc:
                    if exc.code != "lease_lost":  # cancelled or reaped meanwhile
                        unexpected.append(exc)
                except BaseException as exc:
                    unexpected.append(exc)

    def reap() -> None:
        while not stop.is_set():
            try:
                other.queue.reap()
            except BaseException as exc:
                unexpected.append(exc)

    def cancel() -> None:
        for parent_id in sorted(to_cancel):
            try:
                core.queue.cancel(owner, parent_id)
            except (ApiError, Refusal) as exc:
                if exc.code != "already_finished":
                    unexpected.append(exc)
            except BaseException as exc:
                unexpected.append(exc)

    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(work, n) for n in range(8)]
        futures.append(pool.submit(reap))
        cancel()

        def settled() -> bool:
            return all(j.state in ("succeeded", "failed", "cancelled") for j in rows(core))

        start = time.monotonic()
        while not settled() and time.monotonic() - start < 120:
            time.sleep(0.2)
        stop.set()
        for f in futures:
            f.result()
    assert not unexpected, unexpected[:3]

    by_seq = {j.seq: j for j in rows(core)}
    parents_rows = [j for j in by_seq.values() if pipelines.is_parent(j)]
    assert len(parents_rows) == len(parents)
    for p in parents_rows:
        steps = sorted(
            (s for s in by_seq.values() if s.parent_seq == p.seq), key=lambda s: s.step_index or 0
        )
        assert p.state in ("succeeded", "failed", "cancelled"), p.state
        assert [s.step_index for s in steps] == list(range(len(steps)))
        assert all(s.state in ("succeeded", "failed", "cancelled") for s in steps)
        assert all(s.state == "succeeded" for s in steps[:-1])
        if p.state == "succeeded":
            assert len(steps) == 3 and steps[-1].state == "succeeded"
            assert p.result is not None and set(p.result["steps"]) == {"one", "two", "three"}
        elif p.state == "failed":
            assert steps[-1].state == "failed"
            assert p.error is not None and p.error.startswith(f"step {len(steps)} ")
        else:
            assert p.id in to_cancel and steps[-1].state == "cancelled"
    assert {p.state for p in parents_rows} >= {"succeeded", "failed", "cancelled"}
