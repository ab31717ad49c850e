"""Verification on PostgreSQL: a contributed worker's claim carries its filters in the
one claim statement (and costs what an operator's claim costs); replicate:2 holds a job
until another party's run agrees, then accepts it; a contributed liar outvoted by an
operator run is quarantined in the completion's transaction, and many completions of
held jobs by several parties at once leave every job accepted exactly once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from sqlalchemy import select

from csml.coordinator.state import Core
from csml.schemas import JobCompletion
from csml.store.db import counters
from csml.store.tables import Job, Worker
from csml.store.workers import WorkerRow
from tests.integration.postgres.support import new_identity, new_worker, states, submit

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


def contributed_worker(core: Core, contributor: str | None = None) -> WorkerRow:
    """A contributed echo worker (of a new identity unless `contributor`), as the
    worker-token cache holds it."""
    contributor = contributor or new_identity(core)
    w = new_worker(core, contributor_id=contributor)
    return WorkerRow(
        id=w.id,
        join_token_id=w.join_token_id,
        app=w.app,
        app_version=None,
        slots=w.slots,
        sandbox=w.sandbox,
        registered_at=w.registered_at,
        last_heartbeat=w.last_heartbeat,
        stopped_at=None,
        contributor_id=contributor,
    )


def done(result: dict[str, object], lease_id: str) -> JobCompletion:
    return JobCompletion(lease_id=lease_id, state="succeeded", result=result)


def result_of(core: Core, job_id: str) -> tuple[str, object]:
    with core.sessions() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        return job.state, job.result


def test_a_contributed_claim_is_one_statement_and_replicate_2_holds_until_agreement(
    core: Core,
) -> None:
    owner = new_identity(core)
    a, b = contributed_worker(core), contributed_worker(core)
    job_id = submit(core, owner, n=1)
    core.queue.verifier.policy("echo")  # the policy cache, read once per 2 s
    [first] = core.queue.claim(a, 1)
    assert first.id == job_id
    core.queue.complete(a, job_id, done({"n": 1}, first.lease_id))
    assert result_of(core, job_id) == ("queued", None)  # held: no result
    assert core.queue.claim(a, 1) == []  # its party ran it
    submit(core, owner, n=0)  # b's first claim stamps its liveness: take that one first
    [warm] = core.queue.claim(b, 1)
    assert warm.id == job_id  # the held job keeps its rank: first in line
    core.queue.complete(b, job_id, done({"n": 1}, warm.lease_id))
    assert result_of(core, job_id) == ("succeeded", {"n": 1})
    tally = counters(core.engine)
    before = tally.statements
    [again] = core.queue.claim(b, 1)
    # Probe, claim (its filters inside), served rank, inputs, envelopes: as an operator's.
    assert tally.statements - before <= 5
    assert again.id != job_id


def test_an_operator_run_outvotes_a_liar_who_is_quarantined(core: Core) -> None:
    owner = new_identity(core)
    liar, operator = contributed_worker(core), new_worker(core)
    job_id = submit(core, owner, n=2)
    [j] = core.queue.claim(liar, 1)
    core.queue.complete(liar, job_id, done({"n": 666}, j.lease_id))
    [j] = core.queue.claim(operator, 1)
    core.queue.complete(operator, job_id, done({"n": 2}, j.lease_id))
    assert result_of(core, job_id) == ("succeeded", {"n": 2})
    with core.sessions() as session:
        quarantined = session.scalar(select(Worker.quarantined_at).where(Worker.id == liar.id))
    assert quarantined is not None
    # Quarantined (its cached row says so within 2 s): plain jobs are not its to take.
    submit(core, owner, n=3)
    assert core.queue.claim(replace(liar, quarantined_at=quarantined), 1) == []


def test_held_jobs_completed_by_many_parties_at_once_are_each_accepted_once(
    core: Core,
) -> None:
    owner = new_identity(core)
    alice, bob = new_identity(core), new_identity(core)
    firsts = [contributed_worker(core, alice) for _ in range(4)]  # one party
    seconds = [contributed_worker(core, bob) for _ in range(4)]  # another
    jobs = [submit(core, owner, n=i) for i in range(40)]

    def run_all(worker: WorkerRow) -> int:
        ran = 0
        while claimed := core.queue.claim(worker, 2):
            for j in claimed:
                core.queue.complete(worker, j.id, done(j.params, j.lease_id))
                ran += 1
        return ran

    with ThreadPoolExecutor(4) as pool:
        first_runs = sum(pool.map(run_all, firsts))
    assert first_runs == 40  # every job ran once, and is held
    assert set(states(core).values()) == {"queued"}
    with ThreadPoolExecutor(4) as pool:
        second_runs = sum(pool.map(run_all, seconds))
    assert second_runs == 40
    for job_id in jobs:
        state, result = result_of(core, job_id)
        assert state == "succeeded" and isinstance(result, dict)
    with core.sessions() as session:
        agreements = session.scalars(
            select(Worker.agreements).where(Worker.id.in_([w.id for w in firsts + seconds]))
        ).all()
    assert sum(agreements) == 80  # each run agreed once, no update lost
