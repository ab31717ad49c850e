"""What a submission costs the store (real SQLite store, no mocks): a job without inputs
is admitted (identity, queued + running jobs, stored bytes) by the statement that writes
its fair rank, so its write is two statements; a refused one writes nothing and is
refused as before."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from csml import ids
from csml.client import Client
from csml.client import pow as client_pow
from csml.coordinator import quotas
from csml.coordinator.uploads import SMALL_SUBMISSION_BYTES, StorageBudget
from csml.refusals import QuotaExceeded, Unauthenticated
from csml.schemas import JobSpec
from csml.store import jobs as store
from csml.store.db import counters, transaction
from csml.store.tables import Identity
from csml.store.tables_abuse import RateWindow
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import InProcessCoordinator, error_of, sent_statements

# The queue-depth recount (`JobQueue._far_from_full` refreshes it once a second of wall
# time, not of this test's clock): left out of the counts; any other count is counted.
DEPTH = "SELECT count(*) AS count_1 FROM jobs WHERE jobs.app ="


def owner_id(coordinator: InProcessCoordinator) -> str:
    user = coordinator.new_user()
    job = user.submit("echo", "echo")  # also warms the queue-depth view of the app
    with coordinator.core.queue.read() as conn:
        row = store.by_id(conn, job.id)
    assert row is not None
    return row.owner_id


def submit(coordinator: InProcessCoordinator, owner: str, **params: Any) -> str:
    spec = JobSpec(app="echo", operation="echo", params=params)
    return coordinator.core.queue.submit(owner, spec, None, {}).id


def writes(sent: list[str]) -> list[str]:
    """The statements sent but BEGIN and the queue-depth recount (`DEPTH`)."""
    return [s for s in sent if not s.startswith("BEGIN") and not s.startswith(DEPTH)]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"max_active_jobs": 0},
        {"max_stored_bytes": 0},
        {"max_active_jobs": 0, "max_stored_bytes": 0},
    ],
)
def test_a_submit_without_inputs_is_two_statements(
    make_coordinator: MakeCoordinator, settings: dict[str, int]
) -> None:
    coordinator = make_coordinator(**settings)
    owner = owner_id(coordinator)
    with sent_statements(coordinator) as sent:
        submit(coordinator, owner, text="hi")
    done = writes(sent)
    assert [s.split(" (")[0] for s in done] == ["INSERT INTO fair_counters", "INSERT INTO jobs"]
    # The quotas are part of the rank's statement: no statement of their own.
    upsert = done[0]
    assert ("FROM identities" in upsert) is True
    assert ("count(*)" in upsert) is bool(coordinator.settings.max_active_jobs)
    # Stored bytes: the identity's counter, never a sum over its jobs' files.
    assert ("identities.stored_bytes" in upsert) is bool(coordinator.settings.max_stored_bytes)
    assert "job_files" not in upsert and "models" not in upsert


def test_a_json_submit_request_is_few_statements(make_coordinator: MakeCoordinator) -> None:
    """POST /v1/jobs (JSON, no submission window): the job's write (rank with its quotas,
    job row) and no other write; reads are the identity's (cached after the first)."""
    coordinator = make_coordinator(submission_rate_limit=0)
    user = coordinator.new_user()
    headers = {"Authorization": f"Bearer {user.token}"}
    body = {"app": "echo", "operation": "echo", "params": {"text": "hi"}}
    assert coordinator.http.post("/v1/jobs", json=body, headers=headers).status_code == 202
    with sent_statements(coordinator) as sent:
        r = coordinator.http.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 202, r.text
    assert [s.split(" (")[0] for s in writes(sent)] == [
        "INSERT INTO fair_counters",
        "INSERT INTO jobs",
    ]


def test_a_refused_submit_writes_nothing_and_says_why(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(max_active_jobs=2, max_stored_bytes=60)
    owner = owner_id(coordinator)  # one active job

    def counters() -> list[Any]:
        with coordinator.core.queue.read() as conn:
            return list(conn.execute(select(store.COUNTERS)).all())

    before = counters()
    big = "x" * 100
    with pytest.raises(QuotaExceeded) as err:
        submit(coordinator, owner, text=big)  # its params alone pass the stored bytes
    assert err.value.code == "storage_quota"
    assert counters() == before  # the rank's upsert wrote nothing
    submit(coordinator, owner, text="hi")  # fits: two active now
    with pytest.raises(QuotaExceeded) as err:
        submit(coordinator, owner, text="hi")
    assert err.value.code == "active_jobs_limit"
    with pytest.raises(QuotaExceeded) as err:  # both past: the active jobs are said first
        submit(coordinator, owner, text=big)
    assert err.value.code == "active_jobs_limit"
    with coordinator.core.queue.read() as conn:
        active = conn.scalar(
            select(func.count()).select_from(store.JOBS).where(store.JOBS.c.owner_id == owner)
        )
    assert active == 2


def test_a_submit_of_an_erased_identity_is_refused(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator()
    owner = owner_id(coordinator)
    with transaction(coordinator.core.sessions) as session:  # erased while in flight
        session.execute(Identity.__table__.delete().where(Identity.id == owner))  # type: ignore[attr-defined]
    with pytest.raises(Unauthenticated):
        submit(coordinator, owner, text="hi")


def test_a_stored_bytes_limit_admits_exactly_up_to_it(make_coordinator: MakeCoordinator) -> None:
    """Stored bytes plus a new job's params may reach the limit, not pass it; once it is
    reached, a job that would store nothing more is refused too (as before)."""
    coordinator = make_coordinator(max_stored_bytes=10_000)
    owner = owner_id(coordinator)
    room = 10_000 - _stored(coordinator, owner)
    fill = room - len('{"text":""}')  # params of exactly `room` bytes (compact JSON)
    with pytest.raises(QuotaExceeded) as err:
        submit(coordinator, owner, text="y" * (fill + 1))
    assert err.value.code == "storage_quota"
    submit(coordinator, owner, text="y" * fill)
    assert _stored(coordinator, owner) >= 10_000
    with pytest.raises(QuotaExceeded) as err:
        submit(coordinator, owner)  # stores nothing, but the quota is reached
    assert err.value.code == "storage_quota"


def _stored(coordinator: InProcessCoordinator, owner: str) -> int:
    from csml.store import jobs_quota

    with coordinator.core.queue.read() as conn:
        return jobs_quota.stored_bytes(conn, owner)


def test_a_json_submit_counts_its_window_in_its_own_write(
    make_coordinator: MakeCoordinator,
) -> None:
    """With a submission window, POST /v1/jobs counts the job in the window's upsert
    inside the job's write: three statements and one commit, no transaction of its own."""
    coordinator = make_coordinator(submission_rate_limit=5)
    user = coordinator.new_user()
    headers = {"Authorization": f"Bearer {user.token}"}
    body = {"app": "echo", "operation": "echo", "params": {"text": "hi"}}
    assert coordinator.http.post("/v1/jobs", json=body, headers=headers).status_code == 202
    tally = counters(coordinator.core.engine)
    commits = tally.write_commits
    with sent_statements(coordinator) as sent:
        r = coordinator.http.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 202, r.text
    assert [s.split(" (")[0] for s in writes(sent)] == [
        "INSERT INTO rate_windows",
        "INSERT INTO fair_counters",
        "INSERT INTO jobs",
    ]
    assert tally.write_commits == commits + 1
    assert window_count(coordinator, user) == 2


def window_count(coordinator: InProcessCoordinator, user: Client) -> int:
    with coordinator.core.queue.read() as conn:
        owner = conn.scalar(
            select(Identity.id).where(Identity.token_hash == ids.hash_secret(user.token or ""))
        )
        assert owner is not None
        count = conn.scalar(
            select(RateWindow.count).where(RateWindow.key == quotas.submit_key(owner))
        )
    return int(count or 0)


def test_the_window_counts_what_it_counted_before(make_coordinator: MakeCoordinator) -> None:
    """A spec refused before its write is counted (or refused past the window) as
    before; a job refused in its write (here by the queue's bound) is not counted."""
    coordinator = make_coordinator(submission_rate_limit=3, queue_capacity=1)
    user = coordinator.new_user()
    headers = {"Authorization": f"Bearer {user.token}"}

    def post(body: dict[str, Any]) -> httpx.Response:
        return coordinator.http.post("/v1/jobs", json=body, headers=headers)

    ok = {"app": "echo", "operation": "echo", "params": {"text": "hi"}}
    bad = {"app": "echo", "operation": "no-such-operation", "params": {}}
    assert post(ok).status_code == 202
    assert window_count(coordinator, user) == 1
    r = post(ok)  # refused by the queue's bound in its write: not counted
    assert (r.status_code, error_of(r)["code"]) == (429, "queue_full")
    assert window_count(coordinator, user) == 1
    assert post(bad).status_code in (404, 422)  # refused before its write: counted
    assert window_count(coordinator, user) == 2
    assert post(bad).status_code in (404, 422)
    assert window_count(coordinator, user) == 3
    r = post(bad)  # past the window: the window's refusal comes first, as before
    assert (r.status_code, error_of(r)["code"]) == (429, "submission_rate_limited")
    r = post(ok)
    assert (r.status_code, error_of(r)["code"]) == (429, "submission_rate_limited")
    assert window_count(coordinator, user) == 3


def test_a_batch_counts_each_item_in_the_window(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(submission_rate_limit=3)
    user = coordinator.new_user()
    items = [{"spec": {"app": "echo", "operation": "echo", "params": {"i": i}}} for i in range(5)]
    r = coordinator.http.post(
        "/v1/jobs/batch", json={"items": items}, headers={"Authorization": f"Bearer {user.token}"}
    )
    assert r.status_code == 200, r.text
    statuses = [item["status"] for item in r.json()["items"]]
    assert statuses == [202, 202, 202, 429, 429]
    assert r.json()["items"][3]["error"]["code"] == "submission_rate_limited"
    assert window_count(coordinator, user) == 3


def test_the_identity_windows_cost_one_statement_each(make_coordinator: MakeCoordinator) -> None:
    """A challenge reads both identity windows in one statement; an identity holds each
    with one upsert (made if missing, locked) and counts itself with one update."""
    coordinator = make_coordinator(pow_difficulty=2, identity_rate_limit=1)
    for made in (1, 2):  # the windows are made by the first, found by the second
        with sent_statements(coordinator) as sent:
            issued = coordinator.http.post("/v1/identities/challenge").json()
        reads = [s for s in sent if "rate_windows" in s]
        assert len(reads) == 1 and reads[0].startswith("SELECT")
        body = {
            "challenge": issued["challenge"],
            "nonce": client_pow.solve(issued["challenge"], issued["difficulty"]),
        }
        with sent_statements(coordinator) as sent:
            assert coordinator.http.post("/v1/identities", json=body).status_code == 201
        assert [s.split(" (")[0].split(" SET")[0] for s in sent if "rate_windows" in s] == [
            "INSERT INTO rate_windows",
            "INSERT INTO rate_windows",
            "UPDATE rate_windows",
        ]
        with coordinator.core.queue.read() as conn:
            count = conn.scalar(select(RateWindow.count).where(RateWindow.key == "identities"))
        assert count == made


def test_a_multipart_submit_is_one_commit_and_counts_its_window(
    make_coordinator: MakeCoordinator,
) -> None:
    """The early check before a multipart body is read is a read (it refuses, never
    counts); the job's own write counts the window: one commit per submission."""
    coordinator = make_coordinator(submission_rate_limit=3)
    user = coordinator.new_user()
    headers = {"Authorization": f"Bearer {user.token}"}

    def post() -> httpx.Response:
        spec = '{"app": "echo", "operation": "echo", "params": {}}'
        files: dict[str, Any] = {
            "spec": (None, spec, "application/json"),
            "data": ("d", b"x" * 10),
        }
        return coordinator.http.post("/v1/jobs", files=files, headers=headers)

    tally = counters(coordinator.core.engine)
    for n in (1, 2, 3):
        commits = tally.write_commits
        assert post().status_code == 202
        assert tally.write_commits == commits + 1
        assert window_count(coordinator, user) == n
    commits = tally.write_commits
    r = post()
    assert (r.status_code, error_of(r)["code"]) == (429, "submission_rate_limited")
    assert tally.write_commits == commits and window_count(coordinator, user) == 3


def test_a_small_multipart_submit_is_its_write_only(make_coordinator: MakeCoordinator) -> None:
    """Without a window, a small multipart submission (at most `SMALL_SUBMISSION_BYTES`
    announced) is checked as a JSON one: no early read of the identity's stored bytes,
    its write alone (rank with the quotas, job row, its input's row)."""
    coordinator = make_coordinator(submission_rate_limit=0, max_active_jobs=0)
    user = coordinator.new_user()
    headers = {"Authorization": f"Bearer {user.token}"}
    spec = '{"app": "echo", "operation": "echo", "params": {}}'
    files: dict[str, Any] = {"spec": (None, spec, "application/json"), "data": ("d", b"x" * 10)}
    assert coordinator.http.post("/v1/jobs", files=files, headers=headers).status_code == 202
    with sent_statements(coordinator) as sent:
        r = coordinator.http.post("/v1/jobs", files=files, headers=headers)
    assert r.status_code == 202, r.text
    assert [s.split(" (")[0] for s in writes(sent)] == [
        "INSERT INTO fair_counters",
        "INSERT INTO jobs",
        "INSERT INTO job_files",
    ]


def test_a_large_multipart_submit_is_prechecked_once(make_coordinator: MakeCoordinator) -> None:
    """Past `SMALL_SUBMISSION_BYTES`: the early read before the body (the identity's
    stored bytes, which also says it exists, and seeds the upload's storage budget: not
    read again), then the write (rank with the quotas, job row, its input's row)."""
    coordinator = make_coordinator(submission_rate_limit=0, max_active_jobs=0)
    user = coordinator.new_user()
    headers = {"Authorization": f"Bearer {user.token}"}
    spec = '{"app": "echo", "operation": "echo", "params": {}}'
    data = b"x" * (SMALL_SUBMISSION_BYTES + 1)
    files: dict[str, Any] = {"spec": (None, spec, "application/json"), "data": ("d", data)}
    assert coordinator.http.post("/v1/jobs", files=files, headers=headers).status_code == 202
    with sent_statements(coordinator) as sent:
        r = coordinator.http.post("/v1/jobs", files=files, headers=headers)
    assert r.status_code == 202, r.text
    stored = "SELECT identities.stored_bytes FROM identities WHERE identities.id = ?"  # counter
    assert [stored if s.startswith(stored) else s.split(" (")[0] for s in writes(sent)] == [
        stored,  # the early read: the identity exists, and what it stores
        "INSERT INTO fair_counters",
        "INSERT INTO jobs",
        "INSERT INTO job_files",
    ]


def test_a_small_multipart_submit_counts_its_refusals_as_before(
    make_coordinator: MakeCoordinator,
) -> None:
    """Without its early read, a small multipart submission refused before its write is
    still counted in the window (or refused past it, the window's refusal first)."""
    coordinator = make_coordinator(submission_rate_limit=2)
    user = coordinator.new_user()
    headers = {"Authorization": f"Bearer {user.token}"}

    def post(operation: str) -> httpx.Response:
        spec = json.dumps({"app": "echo", "operation": operation, "params": {}})
        files: dict[str, Any] = {
            "spec": (None, spec, "application/json"),
            "data": ("d", b"x" * 10),
        }
        return coordinator.http.post("/v1/jobs", files=files, headers=headers)

    assert post("no-such-operation").status_code in (404, 422)  # refused: counted
    assert window_count(coordinator, user) == 1
    assert post("echo").status_code == 202
    assert window_count(coordinator, user) == 2
    for operation in ("no-such-operation", "echo"):
        r = post(operation)
        assert (r.status_code, error_of(r)["code"]) == (429, "submission_rate_limited")
    assert window_count(coordinator, user) == 2


def test_a_small_submissions_budget_looks_only_past_its_unchecked_bytes(
    make_coordinator: MakeCoordinator,
) -> None:
    """`StorageBudget(unchecked=n)` (a small submission's, without an early read) takes up
    to `n` bytes without a look at the store; past them it looks and refuses past the
    quota, whatever the request announced."""
    coordinator = make_coordinator(max_stored_bytes=1000)
    owner = owner_id(coordinator)
    budget = StorageBudget(coordinator.core, owner, unchecked=500)
    assert budget.covers(500) and not budget.covers(501)
    with sent_statements(coordinator) as sent:
        budget(500)
    assert sent == []
    with sent_statements(coordinator) as sent, pytest.raises(QuotaExceeded):
        budget(1001)
    assert any("stored_bytes" in s for s in sent)
