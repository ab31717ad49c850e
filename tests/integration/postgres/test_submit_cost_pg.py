"""A submission on PostgreSQL: two statements sent together (the identity's lock; the
fair rank with the job's quotas as its condition and the job row in one), and the quotas
folded into the rank's statement still land exactly k of N concurrent submissions from two
coordinators."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import delete, event, func, select

from csml.coordinator import quotas
from csml.coordinator.state import Core
from csml.refusals import RateLimited, Refusal, Unauthenticated
from csml.store import jobs as store
from csml.store.db import counters
from csml.store.jobs import COUNTERS
from csml.store.tables import Identity
from csml.store.tables_abuse import RateWindow
from tests.integration.postgres.support import MakeCore, echo, new_identity, run_threads, submit
from tests.integration.postgres.test_writer_pg import traced

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(180)]


# The queue-depth recount (`JobQueue._far_from_full` refreshes it once a second of wall
# time, not of this test's clock): left out of the counts; any other count is counted.
DEPTH = "SELECT count(*) AS count_1 FROM jobs WHERE jobs.app ="


def outcome(result: object) -> str:
    if isinstance(result, Refusal):
        return result.code
    if isinstance(result, Exception):
        return repr(result)
    return "ok"


def jobs_of(core: Core, owner: str) -> int:
    with core.queue.read() as conn:
        stmt = select(func.count()).select_from(store.JOBS).where(store.JOBS.c.owner_id == owner)
        return int(conn.scalar(stmt) or 0)


def test_a_submit_is_two_statements(core: Core) -> None:
    owner = new_identity(core)
    submit(core, owner, n=0)  # warms the queue-depth view of the app
    sent: list[str] = []

    def count(_conn: object, _cur: object, statement: str, *_: object) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(core.engine, "before_cursor_execute", count)
    tally = counters(core.engine)
    before = tally.statements
    try:
        submit(core, owner, n=1)
    finally:
        event.remove(core.engine, "before_cursor_execute", count)
    done = [s for s in sent if not s.startswith(DEPTH)]
    assert [s.split(" (")[0].split(" FROM")[0] for s in done] == [
        "SELECT identities.id",  # FOR NO KEY UPDATE: the owner's quotas serialise on it
        "WITH ranked AS",  # the rank's upsert (its quotas its condition), the job's row
    ], done
    assert "INSERT INTO fair_counters" in done[1] and "INSERT INTO jobs" in done[1]
    assert tally.statements - before == len(sent)


def test_a_submit_is_one_round_trip_and_its_commit(core: Core, tmp_path: Path) -> None:
    """The identity's lock and the statement that ranks and inserts the job go out
    together (a pipeline: one Sync for both), so a submission costs one round trip and
    "COMMIT; BEGIN", not one per statement (three) and that."""
    owner = new_identity(core)
    submit(core, owner, n=0)  # warms the queue-depth view of the app and the lane
    with traced(core.writer, tmp_path / "trace") as sent:
        submit(core, owner, n=1)
    statements = sent.count("Execute")
    assert statements in (2, 3), sent  # (3: the queue-depth recount, once a second)
    assert sent.count("Query") == 1, sent  # "COMMIT; BEGIN"
    assert sent.count("Sync") == statements - 1, sent
    assert jobs_of(core, owner) == 2


def test_a_windowed_submit_is_one_round_trip_too(make_core: MakeCore, tmp_path: Path) -> None:
    """`count_window=True` (the JSON, multipart and batch routes): the window's count goes
    in the same round trip (three statements, one Sync), and past the limit the job and
    the count are both undone."""
    core = make_core(queue_capacity=100_000, submission_rate_limit=3, max_active_jobs=0)
    owner = new_identity(core)

    def one(n: int) -> str:
        return core.queue.submit(owner, echo(n=n), None, {}, count_window=True).id

    one(0)  # warms the queue-depth view of the app and the lane
    with traced(core.writer, tmp_path / "trace") as sent:
        one(1)
    statements = sent.count("Execute")
    assert statements in (3, 4), sent  # (4: the queue-depth recount, once a second)
    assert sent.count("Query") == 1, sent  # "COMMIT; BEGIN"
    assert sent.count("Sync") == statements - 2, sent
    one(2)
    with pytest.raises(RateLimited) as refused:
        one(3)
    assert refused.value.code == "submission_rate_limited"
    assert jobs_of(core, owner) == 3
    with core.sessions() as session:
        row = session.get(RateWindow, quotas.submit_key(owner))
        assert row is not None and row.count == 3


def test_a_submit_for_an_erased_identity_is_refused_with_its_lock_and_rank_together(
    core: Core,
) -> None:
    """The identity gone between the request's checks and its write: 401 (as when the
    lock was a round trip of its own), and no job, no rank row."""
    owner = new_identity(core)
    with core.sessions() as session:
        session.execute(delete(Identity).where(Identity.id == owner))
        session.commit()
    with pytest.raises(Unauthenticated):
        submit(core, owner, n=1)
    assert jobs_of(core, owner) == 0
    with core.queue.read() as conn:
        stmt = select(func.count()).select_from(COUNTERS).where(COUNTERS.c.owner_id == owner)
        assert conn.scalar(stmt) == 0


def serially(core: Core, owner: str) -> int:
    """How many same-sized jobs one owner lands one after the other before a refusal."""
    for i in range(100):
        try:
            submit(core, owner, n=10 + i % 16)
        except Refusal:
            return i
    raise AssertionError("never refused")


@pytest.mark.parametrize(
    ("settings", "code"),
    [
        ({"max_active_jobs": 3, "max_stored_bytes": 0}, "active_jobs_limit"),
        # Each job's params `{"n": <2 digits>}` keep about 8 bytes: a few fit in 40.
        ({"max_active_jobs": 0, "max_stored_bytes": 40}, "storage_quota"),
    ],
)
def test_concurrent_submits_land_exactly_the_quota(
    make_core: MakeCore, settings: dict[str, int], code: str
) -> None:
    cores = [make_core(queue_capacity=100_000, **settings) for _ in range(2)]
    landed = serially(cores[0], new_identity(cores[0]))
    assert 3 <= landed < 16
    owner = new_identity(cores[0])
    results = run_threads(16, lambda i: submit(cores[i % 2], owner, n=10 + i))
    assert Counter(outcome(r) for r in results) == {"ok": landed, code: 16 - landed}
    assert jobs_of(cores[0], owner) == landed


def test_the_window_counted_in_the_job_write_is_exact(make_core: MakeCore) -> None:
    """`count_window=True` (JSON, batch and multipart submissions): the window's upsert
    in the job's own write lets exactly `limit` of N concurrent submissions through, on
    two coordinators, and counts exactly those."""
    cores = [
        make_core(queue_capacity=100_000, submission_rate_limit=5, max_active_jobs=0)
        for _ in range(2)
    ]
    owner = new_identity(cores[0])

    def one(i: int) -> str:
        spec = echo(n=10 + i)
        return cores[i % 2].queue.submit(owner, spec, None, {}, count_window=True).id

    results = run_threads(16, one)
    assert Counter(outcome(r) for r in results) == {"ok": 5, "submission_rate_limited": 11}
    assert jobs_of(cores[0], owner) == 5
    with cores[0].sessions() as session:
        row = session.get(RateWindow, quotas.submit_key(owner))
        assert row is not None and row.count == 5
