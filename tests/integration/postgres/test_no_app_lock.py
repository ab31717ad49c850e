"""Submit and claim take no per-app lock on PostgreSQL: with another transaction holding
the app's row (as the old submit and claim did), both still go through, the claim in one
statement; the ranks still interleave identities (fair counters per (app, identity))."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from csml.coordinator.state import Core
from csml.store.db import counters, transaction
from csml.store.tables import AppRecord
from tests.integration.postgres.support import new_identity, new_worker, submit

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


def test_submit_and_claim_go_through_while_the_app_row_is_locked(core: Core) -> None:
    alice, bob = new_identity(core), new_identity(core)
    worker = new_worker(core)
    first = submit(core, alice, n=0)
    with transaction(core.sessions) as holder, ThreadPoolExecutor(2) as pool:
        holder.execute(select(AppRecord.name).where(AppRecord.name == "echo").with_for_update())
        # Both would wait for `holder` forever if they locked the app's row.
        later = [pool.submit(submit, core, owner, n=1).result(timeout=60) for owner in (alice, bob)]
        claimed = pool.submit(core.queue.claim, worker, 3).result(timeout=60)
    assert [j.id for j in claimed] == [first, later[1], later[0]]  # bob's first before alice's 2nd


def test_a_claim_is_few_statements(core: Core) -> None:
    owner = new_identity(core)
    worker = new_worker(core)
    for i in range(4):
        submit(core, owner, n=i)
    core.queue.claim(worker, 1)  # the first claim also writes this worker's liveness
    tally = counters(core.engine)
    before = tally.statements
    assert len(core.queue.claim(worker, 3)) == 3
    # Probe, claim (UPDATE … RETURNING), served rank, inputs, envelopes (+ BEGIN/COMMIT
    # issued by the driver are not statements here).
    assert tally.statements - before <= 5
