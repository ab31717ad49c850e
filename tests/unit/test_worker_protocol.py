"""The batched worker protocol: heartbeats riding on claims, several jobs per claim,
small inputs inline in the claim and small outputs inline in a batch of completions,
exactly one result per job; an empty claim writes nothing; the worker-token cache
forgets a worker that left."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

from csml.schemas import ClaimResponse
from csml.schemas.workers import CompletionResults
from csml.store.db import counters
from tests.unit.inproc import HttpWorker, InProcessCoordinator


def claim(worker: HttpWorker, max_jobs: int, *running: Any) -> ClaimResponse:
    beats = [{"job_id": j.id, "lease_id": j.lease_id} for j in running]
    r = worker.post("/claim", {"max_jobs": max_jobs, "wait": 0, "running": beats})
    assert r.status_code == 200, r.text
    return ClaimResponse.model_validate(r.json())


def complete_batch(worker: HttpWorker, *items: dict[str, Any]) -> CompletionResults:
    r = worker.post("/complete", {"completions": list(items)})
    assert r.status_code == 200, r.text
    return CompletionResults.model_validate(r.json())


def test_one_claim_takes_several_jobs_and_carries_the_heartbeat(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo", params={"i": i}) for i in range(3)]
    first = claim(echo_worker, 2)
    assert [j.id for j in first.jobs] == [jobs[0].id, jobs[1].id]
    jobs[1].cancel()
    # The next claim extends the leases it names and says which job to stop.
    second = claim(echo_worker, 2, *first.jobs)
    assert [j.id for j in second.jobs] == [jobs[2].id]
    assert second.abort == [jobs[1].id]


def test_an_empty_claim_writes_nothing(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    assert claim(echo_worker, 4).jobs == []  # may write this worker's liveness once
    tally = counters(coordinator.core.engine)
    before = tally.write_commits
    for _ in range(3):
        assert claim(echo_worker, 4).jobs == []
    assert tally.write_commits == before


def test_inline_files_and_a_batch_of_completions_keep_one_result_each(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    user = coordinator.new_user()
    with_file = user.submit("echo", "echo", files={"data": b"small bytes"})
    plain = user.submit("echo", "echo", params={"k": 1})
    taken = claim(echo_worker, 2).jobs
    by_id = {j.id: j for j in taken}
    assert base64.b64decode(by_id[with_file.id].inline_inputs["data"]) == b"small bytes"
    assert by_id[plain.id].inline_inputs == {}
    out = base64.b64encode(b"result bytes").decode()
    results = complete_batch(
        echo_worker,
        {
            "job_id": with_file.id,
            "lease_id": by_id[with_file.id].lease_id,
            "state": "succeeded",
            "result": {"ok": 1},
            "inline_outputs": [{"name": "data", "content": out}],
        },
        {"job_id": plain.id, "lease_id": "not-the-lease", "state": "succeeded", "result": {}},
    )
    assert [(o.job_id, o.status) for o in results.results] == [
        (with_file.id, 204),
        (plain.id, 409),
    ]
    # The refused one is still running under its lease; completing it again works once.
    again = complete_batch(
        echo_worker,
        {"job_id": plain.id, "lease_id": by_id[plain.id].lease_id, "state": "failed"},
        {"job_id": with_file.id, "lease_id": by_id[with_file.id].lease_id, "state": "failed"},
    )
    assert [o.status for o in again.results] == [204, 409]
    with_file.wait(timeout=10)
    assert with_file.state.value == "succeeded" and with_file.result == {"ok": 1}
    assert with_file.download("data", tmp_path / "out").read_bytes() == b"result bytes"
    plain.wait(timeout=10)
    assert plain.state.value == "failed"


def test_an_inline_output_must_be_declared(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo")
    [taken] = claim(echo_worker, 1).jobs
    results = complete_batch(
        echo_worker,
        {
            "job_id": job.id,
            "lease_id": taken.lease_id,
            "state": "succeeded",
            "inline_outputs": [{"name": "../etc", "content": ""}],
        },
    )
    assert results.results[0].status == 422
    assert [j.id for j in claim(echo_worker, 1, taken).jobs] == []  # still running: no abort


def test_a_worker_that_left_is_refused_at_once(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    assert claim(echo_worker, 1).jobs == []  # its token is now cached
    r = coordinator.http.delete(f"/v1/workers/{echo_worker.id}", headers=echo_worker._headers())
    assert r.status_code == 204
    r = echo_worker.post("/claim", {"max_jobs": 1, "wait": 0})
    assert r.status_code == 401


def statements_of(coordinator: InProcessCoordinator, call: Callable[[], Any]) -> list[str]:
    """The SQL statements `call` sent, each on one line."""
    sent: list[str] = []
    engine = coordinator.core.engine

    def count(_conn: object, _cur: object, statement: str, *_: object) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", count)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return sent


def test_a_claim_of_plain_jobs_reads_neither_files_nor_envelopes(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """Pinned count: the claim's RETURNING says whether a job has inputs or an envelope,
    so a claim of plain jobs without inputs is its probe, the claim and the served rank
    (there were a `SELECT job_files` and a `SELECT EXISTS job_confidential` more)."""
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo") for _ in range(2)]
    with_input = user.submit("echo", "echo", files={"data": b"bytes"})
    claim(echo_worker, 1)  # also stamps this worker's liveness (a write of its own)
    taken: list[ClaimResponse] = []
    sent = statements_of(coordinator, lambda: taken.append(claim(echo_worker, 1)))
    assert [j.id for j in taken[0].jobs] == [jobs[1].id]
    assert [s.split(" ")[0] for s in sent] == ["BEGIN", "SELECT", "BEGIN", "UPDATE", "UPDATE"]
    assert sent[3].startswith("UPDATE jobs") and sent[4].startswith("UPDATE apps"), sent
    # A job with an input: its files are read (one statement), its envelope is not.
    sent = statements_of(coordinator, lambda: taken.append(claim(echo_worker, 1)))
    assert [j.id for j in taken[1].jobs] == [with_input.id]
    assert [i.name for i in taken[1].jobs[0].inputs] == ["data"]
    assert len([s for s in sent if s.startswith("SELECT job_files")]) == 1
    assert not any(s.startswith("SELECT EXISTS") for s in sent), sent
