"""Placement on PostgreSQL: the claim filter and the warm-model window run as the one
claim statement, and a claim with requirements in the queue costs what a plain one does
once this coordinator knows the app's requirement keys."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from csml.coordinator.state import Core
from csml.schemas import JobSpec
from csml.store.db import counters
from csml.store.tables import Worker
from tests.integration.postgres.support import new_identity, new_worker, submit

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


def labelled(core: Core, **labels: Any) -> Worker:
    return new_worker(core, labels=labels or None)


def needing(core: Core, owner: str, n: int, **requires: Any) -> str:
    spec = JobSpec(app="echo", operation="echo", params={"n": n}, requires=requires)
    return core.queue.submit(owner, spec, None, {}).id


def test_requirements_filter_the_claim_in_five_statements(core: Core) -> None:
    owner = new_identity(core)
    cpu, gpu = labelled(core, gpu=False), labelled(core, gpu=True, mem=24)
    gpu_jobs = [needing(core, owner, i, gpu=True) for i in range(3)]
    big = needing(core, owner, 9, mem={"min": 32})
    plain = [submit(core, owner, n=i) for i in range(3)]
    assert [j.id for j in core.queue.claim(cpu, 1)] == [plain[0]]  # learns the keys
    tally = counters(core.engine)
    before = tally.statements
    assert [j.id for j in core.queue.claim(cpu, 5)] == plain[1:]
    assert tally.statements - before <= 5
    assert [j.id for j in core.queue.claim(gpu, 5)] == gpu_jobs
    assert core.queue.claim(gpu, 5) == [] and core.queue.claim(cpu, 5) == []
    assert big not in {j.id for j in core.queue.claim(labelled(core, mem=16), 5)}
    assert [j.id for j in core.queue.claim(labelled(core, mem=32.5), 5)] == [big]


def test_concurrent_warm_claims_take_each_job_once(core: Core) -> None:
    owners = [new_identity(core) for _ in range(4)]
    workers = [labelled(core) for _ in range(4)]
    queued = {submit(core, owners[i % 4], n=i) for i in range(200)}
    warm = ["0" * 64]  # no job has it: the windowed statement, fair order

    def drain(worker: Worker) -> list[str]:
        got: list[str] = []
        while True:
            taken = core.queue.claim_and_beat(worker, 3, warm=warm).jobs
            if not taken:
                return got
            got += [j.id for j in taken]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(drain, workers))
    taken = [j for r in results for j in r]
    assert len(taken) == len(set(taken)) == len(queued)
    assert set(taken) == queued
