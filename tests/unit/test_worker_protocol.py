"""The batched worker protocol: heartbeats riding on claims, several jobs per claim,
small inputs inline in the claim and small outputs inline in a batch of completions,
exactly one result per job; an empty claim writes nothing; the worker-token cache
forgets a worker that left."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from csml.schemas import ClaimResponse
from csml.schemas.workers import COMPLETIONS_RIDE_CLAIMS, PROTOCOL, CompletionResults
from csml.store.db import counters
from tests.unit.inproc import HttpWorker, InProcessCoordinator, sent_statements


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


def test_registration_says_completions_may_ride_claims(echo_worker: HttpWorker) -> None:
    assert echo_worker.registered.protocol == PROTOCOL >= COMPLETIONS_RIDE_CLAIMS


def test_completions_riding_a_claim_are_kept_before_it_takes_jobs(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo", params={"i": i}) for i in range(4)]
    first, second = claim(echo_worker, 2).jobs
    done = [
        {"job_id": first.id, "lease_id": first.lease_id, "state": "succeeded", "result": {"i": 0}},
        {"job_id": second.id, "lease_id": "not-the-lease", "state": "succeeded", "result": {}},
    ]
    tally = counters(coordinator.core.engine)
    before = tally.write_commits
    r = echo_worker.post("/claim", {"max_jobs": 2, "wait": 0, "completions": done})
    assert r.status_code == 200, r.text
    answer = ClaimResponse.model_validate(r.json())
    assert tally.write_commits == before + 1  # the completions and the claim: one commit
    assert [(o.job_id, o.status) for o in answer.results] == [(first.id, 204), (second.id, 409)]
    assert "no longer yours" in answer.results[1].error
    assert [j.id for j in answer.jobs] == [jobs[2].id, jobs[3].id]
    jobs[0].wait(timeout=10)
    assert jobs[0].state.value == "succeeded" and jobs[0].result == {"i": 0}
    # Exactly one result: the same completion again (riding the next claim) is refused,
    # and the job refused above is still running under its lease.
    again = [done[0], {**done[1], "lease_id": second.lease_id, "state": "failed"}]
    r = echo_worker.post("/claim", {"max_jobs": 1, "wait": 0, "completions": again})
    assert r.status_code == 200, r.text
    answer = ClaimResponse.model_validate(r.json())
    assert [o.status for o in answer.results] == [409, 204] and answer.jobs == []
    jobs[1].wait(timeout=10)
    assert jobs[1].state.value == "failed"
    jobs[0].refresh()
    assert jobs[0].result == {"i": 0}


def test_a_claim_carrying_completions_answers_even_when_nothing_is_queued(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    job = coordinator.new_user().submit("echo", "echo")
    [taken] = claim(echo_worker, 1).jobs
    done = {"job_id": job.id, "lease_id": taken.lease_id, "state": "succeeded", "result": {}}
    r = echo_worker.post("/claim", {"max_jobs": 4, "wait": 0, "completions": [done]})
    assert r.status_code == 200, r.text
    answer = ClaimResponse.model_validate(r.json())
    assert answer.jobs == [] and [o.status for o in answer.results] == [204]
    job.wait(timeout=10)
    assert job.state.value == "succeeded"


def statements_of(coordinator: InProcessCoordinator, call: Callable[[], Any]) -> list[str]:
    """The SQL statements `call` sent, each on one line."""
    with sent_statements(coordinator) as sent:
        call()
    return sent


def test_a_claim_of_plain_jobs_reads_neither_files_nor_envelopes(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """Pinned count: the claim's RETURNING says whether a job has an envelope and gives
    its input files, so a claim of plain jobs, with inputs or without, is its probe, the
    claim and the served rank (there were a `SELECT job_files` and a `SELECT EXISTS
    job_confidential` more, then a `SELECT job_files` for a job with inputs)."""
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo") for _ in range(2)]
    with_input = user.submit("echo", "echo", files={"data": b"bytes"})
    claim(echo_worker, 1)  # also stamps this worker's liveness (a write of its own)
    taken: list[ClaimResponse] = []
    sent = statements_of(coordinator, lambda: taken.append(claim(echo_worker, 1)))
    assert [j.id for j in taken[0].jobs] == [jobs[1].id]
    assert [s.split(" ")[0] for s in sent] == ["SELECT", "BEGIN", "UPDATE", "UPDATE"]
    assert sent[2].startswith("UPDATE jobs") and sent[3].startswith("UPDATE apps"), sent
    # A job with an input: its files come with the claim, its envelope is not read.
    sent = statements_of(coordinator, lambda: taken.append(claim(echo_worker, 1)))
    assert [j.id for j in taken[1].jobs] == [with_input.id]
    [got] = taken[1].jobs[0].inputs
    assert (got.name, got.size, got.sha256) == ("data", 5, hashlib.sha256(b"bytes").hexdigest())
    assert taken[1].jobs[0].inline_inputs == {"data": base64.b64encode(b"bytes").decode()}
    assert [s.split(" ")[0] for s in sent] == ["SELECT", "BEGIN", "UPDATE", "UPDATE"], sent


def test_a_plain_jobs_completion_riding_a_claim_is_one_statement(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """Pinned count: a plain job's completion riding a claim adds one statement to the
    claim's transaction, its end: an `UPDATE … RETURNING` that checks the lease (there
    were a `SELECT … jobs` of the lease under lock and an `UPDATE` of the job, and a
    request and a transaction of their own). The claim does not probe the queue first:
    the completions are a write, and it takes in it (there was a `SELECT` before)."""
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo") for _ in range(2)]
    [first] = claim(echo_worker, 1).jobs  # also stamps this worker's liveness
    done = {"job_id": first.id, "lease_id": first.lease_id, "state": "succeeded", "result": {}}
    answers: list[Any] = []
    tally = counters(coordinator.core.engine)
    before = tally.write_commits
    sent = statements_of(
        coordinator,
        lambda: answers.append(
            echo_worker.post("/claim", {"max_jobs": 1, "wait": 0, "completions": [done]})
        ),
    )
    answer = ClaimResponse.model_validate(answers[0].json())
    assert [o.status for o in answer.results] == [204]
    assert [j.id for j in answer.jobs] == [jobs[1].id]
    assert tally.write_commits == before + 1
    kinds = [s.split(" ")[0] for s in sent]
    assert kinds == ["BEGIN", "UPDATE", "UPDATE", "UPDATE"], sent
    assert sent[1].startswith("UPDATE jobs SET state=?, finished_at=?") and "RETURNING" in sent[1]
    jobs[0].wait(timeout=10)
    assert jobs[0].state.value == "succeeded" and jobs[0].result == {}


def test_a_long_poll_carrying_completions_takes_nothing_in_their_write_when_known_empty(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """Pinned count: a claim that carries completions and long-polls (a worker with no
    other job: one job at a time), from a worker whose last claim here took all there
    was (and nothing was queued since), writes only the completions' end: no take in
    their transaction, whose commit their results wait for (there was an `UPDATE jobs`
    taking nothing). It then waits, and re-checks as any long-poll does."""
    job = coordinator.new_user().submit("echo", "echo")
    [taken] = claim(echo_worker, 2).jobs  # fewer than asked: nothing else waits for it
    done = {"job_id": job.id, "lease_id": taken.lease_id, "state": "succeeded", "result": {}}
    answers: list[Any] = []
    sent = statements_of(
        coordinator,
        lambda: answers.append(
            echo_worker.post("/claim", {"max_jobs": 2, "wait": 0.2, "completions": [done]})
        ),
    )
    answer = ClaimResponse.model_validate(answers[0].json())
    assert answer.jobs == [] and [o.status for o in answer.results] == [204]
    write = sent[: next(i for i, s in enumerate(sent) if s.startswith("SELECT"))]
    assert [s.split(" ")[0] for s in write] == ["BEGIN", "UPDATE"], sent
    assert write[1].startswith("UPDATE jobs SET state=?, finished_at=?"), sent
    job.wait(timeout=10)
    assert job.state.value == "succeeded"


def test_several_plain_completions_riding_a_claim_are_one_statement(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """Pinned count: on SQLite, the plain jobs' completions riding a claim end in one
    `WITH v AS (VALUES …) UPDATE jobs … FROM v RETURNING` (there was one `UPDATE …
    RETURNING` per job), each checked against its own lease: a completion of a lease
    not the job's is refused and leaves its job running; the others end, each with its
    own state, result and error."""
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo") for _ in range(4)]
    taken = claim(echo_worker, 3).jobs  # also stamps this worker's liveness
    assert [j.id for j in taken] == [j.id for j in jobs[:3]]
    first, second, third = taken
    completions = [
        {"job_id": first.id, "lease_id": first.lease_id, "state": "succeeded", "result": {"a": 1}},
        {"job_id": second.id, "lease_id": second.lease_id, "state": "failed", "error": "no"},
        {"job_id": third.id, "lease_id": "not-its-lease", "state": "succeeded", "result": {}},
    ]
    answers: list[Any] = []
    sent = statements_of(
        coordinator,
        lambda: answers.append(
            echo_worker.post("/claim", {"max_jobs": 1, "wait": 0, "completions": completions})
        ),
    )
    answer = ClaimResponse.model_validate(answers[0].json())
    assert [o.status for o in answer.results] == [204, 204, 409]
    assert [j.id for j in answer.jobs] == [jobs[3].id]
    ends = [s for s in sent if "UPDATE jobs SET state=v.v_state" in s]
    assert len(ends) == 1 and ends[0].startswith("WITH v(v_job, v_lease"), sent
    jobs[0].wait(timeout=10)
    jobs[1].wait(timeout=10)
    assert (jobs[0].state.value, jobs[0].result) == ("succeeded", {"a": 1})
    assert (jobs[1].state.value, jobs[1].error) == ("failed", "no")
    assert user.job(jobs[2].id).state.value == "running"


def test_a_claims_lease_check_and_probe_run_without_a_read_transaction(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """Pinned count: a claim carrying a heartbeat that is not due, of a lease this
    coordinator does not know (here: forgotten, as when notifications may have been
    lost), reads the leases and probes the queue each in its own implicit transaction (no
    BEGIN; there were two: the two are hints that the claim's write checks again), then
    claims."""
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo") for _ in range(2)]
    [first] = claim(echo_worker, 1).jobs  # also stamps this worker's liveness
    coordinator.core.queue.leases._drop(None)  # forget every lease
    taken: list[ClaimResponse] = []
    sent = statements_of(coordinator, lambda: taken.append(claim(echo_worker, 1, first)))
    assert [j.id for j in taken[0].jobs] == [jobs[1].id] and taken[0].abort == []
    kinds = [s.split(" ")[0] for s in sent]
    assert kinds == ["SELECT", "SELECT", "BEGIN", "UPDATE", "UPDATE"], sent
    assert sent[0].startswith("SELECT jobs.id, jobs.state, jobs.worker_id, jobs.lease_id")
    assert not any(s.startswith("UPDATE jobs SET lease_expires_at") for s in sent), sent


def test_a_heartbeat_not_due_of_a_lease_this_coordinator_granted_reads_no_lease(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """Pinned count: the coordinator remembers the leases it granted (`lease_memo`), so a
    claim carrying the heartbeat of a job it just handed out reads no lease: its probe,
    then the claim (there was a `SELECT` of the leases first). A lease read once is
    remembered too: the next claim's heartbeat reads nothing either."""
    user = coordinator.new_user()
    jobs = [user.submit("echo", "echo") for _ in range(2)]
    [first] = claim(echo_worker, 1).jobs  # also stamps this worker's liveness
    taken: list[ClaimResponse] = []
    sent = statements_of(coordinator, lambda: taken.append(claim(echo_worker, 1, first)))
    assert [j.id for j in taken[0].jobs] == [jobs[1].id] and taken[0].abort == []
    assert [s.split(" ")[0] for s in sent] == ["SELECT", "BEGIN", "UPDATE", "UPDATE"], sent
    assert sent[0].startswith("SELECT (SELECT jobs.seq FROM jobs"), sent  # the probe
    second = taken[0].jobs[0]
    coordinator.core.queue.leases._drop(None)
    sent = statements_of(coordinator, lambda: taken.append(claim(echo_worker, 1, first, second)))
    assert len([s for s in sent if s.startswith("SELECT jobs.id, jobs.state")]) == 1, sent
    jobs.append(user.submit("echo", "echo"))
    sent = statements_of(coordinator, lambda: taken.append(claim(echo_worker, 1, first, second)))
    assert [j.id for j in taken[-1].jobs] == [jobs[2].id]
    assert not any(s.startswith("SELECT jobs.id, jobs.state") for s in sent), sent


def test_a_cancel_reaches_the_next_claims_heartbeat_though_the_lease_was_known(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    """The lease memo forgets a job as soon as its change is announced: a job cancelled
    after this coordinator granted its lease is in the next claim's `abort`."""
    user = coordinator.new_user()
    job = user.submit("echo", "echo")
    [held] = claim(echo_worker, 1).jobs
    assert coordinator.core.queue.leases.get(job.id) is not None
    job.cancel()
    assert coordinator.core.queue.leases.get(job.id) is None
    assert claim(echo_worker, 1, held).abort == [job.id]
