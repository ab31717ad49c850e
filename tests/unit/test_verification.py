"""The verification state machine (`csml.coordinator.verification`): its pure step
(`decide`), digests and policies, and the whole machine through the HTTP API of an
in-process coordinator with operator and contributed workers (claims filtered, results
held until accepted, reputation, quarantine, the operator's views)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

import csml.cli.main as cli_main
from csml.apps.echo import app as echo_app
from csml.client import CsmlError
from csml.coordinator.verification import (
    PENALTY,
    Decision,
    NewRun,
    Policy,
    decide,
    digest,
    parse,
)
from csml.refusals import Invalid
from csml.schemas import ClaimedJob, WorkerRegistered
from csml.store import verification as store
from csml.store.jobs import JOBS
from csml.store.verification import Run
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import OPERATOR_TOKEN, HttpWorker, InProcessCoordinator
from tests.unit.test_sdk_cli import cli
from tests.unit.test_sdk_cli import run as run_cli

__all__ = ["cli"]  # the CLI fixture, shared with test_sdk_cli

OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}

# -- the pure step --------------------------------------------------------------------


def run(party: str | None, d: str, counts: bool = True, n: int = 0) -> Run:
    return Run(n, f"w-{party}", party, d, counts, 1.0)


def new(party: str, d: str, *, counts: bool = True, probation: bool = False) -> NewRun:
    return NewRun(party, d, counts, probation)


def never() -> float:
    raise AssertionError("no draw expected")


R2 = Policy("replicate", k=2)


def step(
    policy: Policy, pending: list[Run], n: NewRun, draw: Any = never, det: bool = True
) -> Decision:
    return decide(policy, pending, n, deterministic=det, draw=draw)


def test_replicate_accepts_when_k_parties_agree() -> None:
    assert step(R2, [], new("a", "x")) is Decision.CHECKING
    assert step(R2, [run("a", "x")], new("b", "x")) is Decision.ACCEPT
    r3 = Policy("replicate", k=3)
    assert step(r3, [run("a", "x")], new("b", "x")) is Decision.CHECKING
    assert step(r3, [run("a", "x"), run("b", "x")], new("c", "x")) is Decision.ACCEPT


def test_replicate_on_disagreement_wants_a_majority_then_a_trusted_run() -> None:
    assert step(R2, [run("a", "x")], new("b", "y")) is Decision.CHECKING
    # x 2 votes vs y 1: a majority of k agreeing parties.
    assert step(R2, [run("a", "x"), run("b", "y")], new("c", "x")) is Decision.ACCEPT
    # x 1, y 1, z 1: no majority; at k + 2 = 4 counted runs a trusted run decides.
    assert step(R2, [run("a", "x"), run("b", "y")], new("c", "z")) is Decision.CHECKING
    pending = [run("a", "x"), run("b", "y"), run("c", "z")]
    assert step(R2, pending, new("d", "w")) is Decision.TRUSTED
    # y 2 vs x 2: a tie is no majority.
    tied = [run("a", "x"), run("b", "y"), run("c", "x")]
    assert step(R2, tied, new("d", "y")) is Decision.TRUSTED


def test_a_party_votes_once_and_quarantined_runs_never_count() -> None:
    # The same contributor twice (two of its workers) is one vote.
    assert step(R2, [run("a", "x")], new("a", "x")) is Decision.CHECKING
    # A quarantined worker's pending run is no vote; its own new run decides nothing.
    assert step(R2, [run("q", "x", counts=False)], new("b", "x")) is Decision.CHECKING
    assert step(R2, [run("a", "x")], new("q", "x", counts=False)) is Decision.CHECKING


def test_spot_check_draws_and_probation_always_goes_to_a_trusted_run() -> None:
    s = Policy("spot-check", p=0.25)
    assert step(s, [], new("a", "x"), draw=lambda: 0.1) is Decision.TRUSTED
    assert step(s, [], new("a", "x"), draw=lambda: 0.9) is Decision.ACCEPT
    assert step(s, [], new("a", "x", probation=True)) is Decision.TRUSTED


def test_none_verifies_only_probation_and_never_compares_a_nondeterministic_operation() -> None:
    none = Policy("none")
    assert step(none, [], new("a", "x", probation=True)) is Decision.CHECKING
    assert step(none, [run("a", "x")], new("b", "x")) is Decision.ACCEPT
    assert step(R2, [run("a", "x")], new("b", "x"), det=False) is Decision.TRUSTED


def test_digests_are_canonical() -> None:
    one = digest("succeeded", {"b": 1, "a": [1, 2]}, None, [("o2", "22"), ("o1", "11")])
    two = digest("succeeded", {"a": [1, 2], "b": 1}, "ignored", [("o1", "11"), ("o2", "22")])
    assert one == two
    assert one != digest("succeeded", {"a": [1, 2], "b": 2}, None, [("o1", "11"), ("o2", "22")])
    assert one != digest("succeeded", {"a": [1, 2], "b": 1}, None, [("o1", "11"), ("o2", "23")])
    assert digest("failed", None, "boom", []) != digest("failed", None, "bang", [])


def test_policies_parse_or_are_refused_naming_the_field() -> None:
    assert str(parse("replicate:3")) == "replicate:3"
    assert str(parse("spot-check:0.1")) == "spot-check:0.1"
    assert str(parse("none")) == "none"
    for bad in ("replicate:1", "replicate:9", "spot-check:0", "spot-check:1.5", "always"):
        with pytest.raises(Invalid) as refused:
            parse(bad, "verification")
        assert refused.value.field == "verification"


# -- the machine, through the API --------------------------------------------------------


@pytest.fixture
def open_coordinator(make_coordinator: MakeCoordinator) -> InProcessCoordinator:
    return make_coordinator(contributions=True, verify_probation=2)


def set_policy(c: InProcessCoordinator, app: str, policy: str) -> dict[str, Any]:
    r = c.http.put(
        f"/v1/operator/contributions/{app}", json={"verification": policy}, headers=OPERATOR
    )
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


def contributed(c: InProcessCoordinator) -> HttpWorker:
    """A contributed echo worker of a new identity."""
    token = c.new_user().contribute("echo").token
    r = c.http.post(
        "/v1/workers",
        json={"app": echo_app.manifest().model_dump(mode="json"), "slots": 2, "sandbox": "none"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 201, r.text
    return HttpWorker(c.http, echo_app, WorkerRegistered.model_validate(r.json()))


def submit(c: InProcessCoordinator, token: str | None, **spec: Any) -> str:
    body = {"app": "echo", "operation": "echo", "params": {"n": 1}, **spec}
    r = c.http.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def done(worker: HttpWorker, job: ClaimedJob, result: dict[str, Any]) -> None:
    assert worker.complete(job, result=result).status_code == 204


def job_of(c: InProcessCoordinator, token: str | None, job_id: str) -> dict[str, Any]:
    r = c.http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


def record(c: InProcessCoordinator, worker_id: str) -> dict[str, Any]:
    r = c.http.get("/v1/operator/contributions/workers", headers=OPERATOR)
    assert r.status_code == 200, r.text
    [found] = [w for w in r.json()["workers"] if w["id"] == worker_id]
    return dict(found)


def earned_by(c: InProcessCoordinator, w: HttpWorker) -> int:
    """Milli-credits the ledger (`csml.store.credit`) holds as earned by `w`'s contributor."""
    from csml import ids
    from csml.store import credit as ledger
    from csml.store.workers import worker_by_token

    with c.core.engine.connect() as conn:
        auth = worker_by_token(conn, ids.hash_secret(w.registered.worker_token))
        assert auth is not None and auth.worker.contributor_id is not None
        return ledger.balance_of(conn, auth.worker.contributor_id).earned


def runs_of(c: InProcessCoordinator, worker_id: str) -> list[dict[str, Any]]:
    with c.core.engine.connect() as conn:
        return store.runs_of_worker(conn, worker_id)


def test_replicate_2_holds_a_result_until_another_party_agrees(
    open_coordinator: InProcessCoordinator,
) -> None:
    c = open_coordinator
    bob = c.new_user()
    a, b = contributed(c), contributed(c)
    job_id = submit(c, bob.token)
    [first] = a.claim()
    done(a, first, {"n": 1})
    held = job_of(c, bob.token, job_id)
    assert held["state"] == "queued" and held["result"] is None
    assert held["progress"]["message"].startswith("verifying")
    assert a.claim() == []  # its party ran it: never twice
    [second] = b.claim()
    assert second.id == job_id and second.attempt == 2
    done(b, second, {"n": 1})
    accepted = job_of(c, bob.token, job_id)
    assert accepted["state"] == "succeeded" and accepted["result"] == {"n": 1}
    # Both on probation (2 agreements needed here): their credit is held.
    assert [(r["outcome"], r["credit"]) for r in runs_of(c, a.id)] == [("agreed", "held")]
    assert [(r["outcome"], r["credit"]) for r in runs_of(c, b.id)] == [("accepted", "held")]
    assert record(c, a.id)["agreements"] == 1 and record(c, b.id)["agreements"] == 1
    assert earned_by(c, a) == earned_by(c, b) == 0  # held: nothing in the ledger yet
    # A second agreement each: out of probation, the held credit is earned.
    other = submit(c, bob.token, params={"n": 5})
    [j] = b.claim()
    done(b, j, {"n": 5})
    [j] = a.claim()
    done(a, j, {"n": 5})
    assert job_of(c, bob.token, other)["result"] == {"n": 5}
    for w in (a, b):
        assert [r["credit"] for r in runs_of(c, w.id)] == ["earned", "earned"]
        assert not record(c, w.id)["probation"]
        assert earned_by(c, w) > 0  # the ledger holds what the two runs earned


def test_a_liar_is_outvoted_quarantined_and_then_only_rechecks(
    open_coordinator: InProcessCoordinator,
) -> None:
    c = open_coordinator
    bob = c.new_user()
    liar, honest = contributed(c), contributed(c)
    operator = c.worker(echo_app)
    job_id = submit(c, bob.token)
    [j] = liar.claim()
    done(liar, j, {"n": 666})  # wrong
    [j] = honest.claim()
    done(honest, j, {"n": 1})
    assert job_of(c, bob.token, job_id)["state"] == "queued"  # 1 against 1: no majority
    [j] = operator.claim()
    done(operator, j, {"n": 1})  # a trusted run decides
    assert job_of(c, bob.token, job_id)["result"] == {"n": 1}
    caught = record(c, liar.id)
    assert caught["disagreements"] == 1 and caught["quarantined_at"] is not None
    assert caught["reputation"] == -PENALTY
    assert [(r["outcome"], r["credit"]) for r in runs_of(c, liar.id)] == [("disagreed", None)]
    assert [(r["outcome"], r["credit"]) for r in runs_of(c, honest.id)] == [("agreed", "held")]

    # Quarantined: a plain job is not its to take; a job being checked is, and its run
    # is compared but never decides.
    plain = submit(c, bob.token, params={"n": 2})
    assert liar.claim() == []
    [j] = honest.claim()
    assert j.id == plain
    done(honest, j, {"n": 2})
    [j] = liar.claim()
    assert j.id == plain
    done(liar, j, {"n": 2})  # agrees, but counts for nothing
    assert job_of(c, bob.token, plain)["state"] == "queued"
    [j] = operator.claim()
    done(operator, j, {"n": 2})
    assert job_of(c, bob.token, plain)["result"] == {"n": 2}
    assert [r["counts"] for r in runs_of(c, liar.id)] == [True, False]
    assert not any(r["credit"] for r in runs_of(c, liar.id))
    # The honest one's second agreement ends its probation: both runs earned.
    assert [r["credit"] for r in runs_of(c, honest.id)] == ["earned", "earned"]
    assert earned_by(c, liar) == 0 and earned_by(c, honest) > 0

    listed = c.http.get("/v1/operator/contributions/workers?quarantined=true", headers=OPERATOR)
    assert [w["id"] for w in listed.json()["workers"]] == [liar.id]
    apps = {a["name"]: a for a in c.http.get("/v1/apps").json()}
    assert apps["echo"]["quarantined_workers"] == 1
    assert apps["echo"]["probation_workers"] == 0  # the honest one has its 2 agreements
    assert record(c, honest.id)["agreements"] == 2 and not record(c, honest.id)["probation"]
    lifted = c.http.delete(
        f"/v1/operator/contributions/workers/{liar.id}/quarantine", headers=OPERATOR
    )
    assert lifted.status_code == 204
    again = record(c, liar.id)
    assert again["quarantined_at"] is None and again["probation"]
    assert (again["agreements"], again["disagreements"]) == (0, 0)
    assert (
        c.http.delete(
            f"/v1/operator/contributions/workers/{liar.id}/quarantine", headers=OPERATOR
        ).status_code
        == 404
    )


def test_trusted_only_and_min_reputation_keep_jobs_from_contributed_workers(
    open_coordinator: InProcessCoordinator,
) -> None:
    c = open_coordinator
    bob = c.new_user()
    set_policy(c, "echo", "none")
    w = contributed(c)
    trusted = submit(c, bob.token, trusted_only=True)
    picky = submit(c, bob.token, min_reputation=1)
    assert w.claim() == []
    assert job_of(c, bob.token, trusted)["trusted_only"] is True
    assert job_of(c, bob.token, picky)["min_reputation"] == 1
    by_sdk = bob.submit("echo", "echo", params={"n": 2}, trusted_only=True, min_reputation=3)
    assert (by_sdk.data.trusted_only, by_sdk.data.min_reputation) == (True, 3)
    assert w.claim() == []
    operator = c.worker(echo_app)
    assert sorted(operator.claim_ids(3)) == sorted([trusted, picky, by_sdk.id])
    bad = c.http.post(
        "/v1/jobs",
        json={"app": "echo", "operation": "echo", "min_reputation": -1},
        headers={"Authorization": f"Bearer {bob.token}"},
    )
    assert bad.status_code == 422


def test_policy_none_accepts_a_contributed_result_after_probation(
    make_coordinator: MakeCoordinator,
) -> None:
    c = make_coordinator(contributions=True, verify_probation=0)
    assert set_policy(c, "echo", "none")["verification"] == "none"
    bob = c.new_user()
    w = contributed(c)
    job_id = submit(c, bob.token)
    [j] = w.claim()
    done(w, j, {"n": 1})
    assert job_of(c, bob.token, job_id)["state"] == "succeeded"
    assert runs_of(c, w.id) == []  # taken as it is: nothing recorded
    assert set_policy(c, "echo", "default")["verification_default"] is True


def test_spot_check_1_sends_every_contributed_result_to_an_operator(
    make_coordinator: MakeCoordinator,
) -> None:
    c = make_coordinator(contributions=True, verify_probation=0)
    set_policy(c, "echo", "spot-check:1")
    bob = c.new_user()
    w, other = contributed(c), contributed(c)
    job_id = submit(c, bob.token)
    [j] = w.claim()
    done(w, j, {"n": 1})
    assert other.claim() == []  # trusted only now
    with c.core.engine.connect() as conn:
        trusted_only = conn.scalar(select(JOBS.c.trusted_only).where(JOBS.c.id == job_id))
    assert trusted_only is True
    operator = c.worker(echo_app)
    [j] = operator.claim()
    done(operator, j, {"n": 1})
    assert job_of(c, bob.token, job_id)["result"] == {"n": 1}
    assert [r["outcome"] for r in runs_of(c, w.id)] == ["agreed"]


def test_contributed_workers_get_only_deterministic_operations_under_a_policy(
    open_coordinator: InProcessCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = open_coordinator
    bob = c.new_user()
    w = contributed(c)
    submit(c, bob.token)
    monkeypatch.setattr(c.core.queue, "_deterministic", lambda app: ())
    assert w.claim() == []
    monkeypatch.undo()
    assert len(w.claim()) == 1


def test_an_operator_claim_on_a_plain_job_is_todays_statement(
    open_coordinator: InProcessCoordinator,
) -> None:
    """No filter is bound for an operator worker (the statement is the one built at import)."""
    from csml import ids
    from csml.store import jobs_write
    from csml.store.workers import worker_by_token

    assert jobs_write._take_statement(jobs_write.PLAIN, False, False, False) is jobs_write._TAKE
    c = open_coordinator
    operator, mine = c.worker(echo_app), contributed(c)
    with c.core.engine.connect() as conn:
        rows = [
            worker_by_token(conn, ids.hash_secret(w.registered.worker_token))
            for w in (operator, mine)
        ]
    assert rows[0] is not None and rows[1] is not None
    assert c.core.queue._claimant(rows[0].worker) is None
    claimant = c.core.queue._claimant(rows[1].worker)
    assert claimant is not None and claimant.operations == ("echo",)  # on probation


def test_the_operator_cli_sets_the_policy_lists_records_and_lifts(
    cli: CliRunner, coordinator: InProcessCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = coordinator
    monkeypatch.setenv("CSML_DATA_DIR", str(c.settings.data_dir))
    monkeypatch.setenv("CSML_DATABASE_URL", str(c.settings.database_url))
    assert run_cli(cli, "operator", "contributions", "policy", "echo", "replicate:3").strip() == (
        "echo: verification replicate:3"
    )
    refused = cli.invoke(cli_main.app, ["operator", "contributions", "policy", "echo", "twice"])
    assert isinstance(refused.exception, CsmlError) and "not a policy" in refused.exception.message
    run_cli(cli, "apps", "contribution", "echo", "--allow")
    assert run_cli(cli, "operator", "contributions", "policy", "echo", "default").strip() == (
        "echo: verification replicate:2 (the default)"
    )
    bob = c.new_user()
    liar, operator = contributed(c), c.worker(echo_app)
    job_id = submit(c, bob.token)
    [j] = liar.claim()
    done(liar, j, {"n": 3})
    [j] = operator.claim()
    done(operator, j, {"n": 1})
    assert job_of(c, bob.token, job_id)["result"] == {"n": 1}
    lines = run_cli(cli, "operator", "contributions", "workers", "--quarantined", "--json")
    [caught] = [json.loads(line) for line in lines.splitlines()]
    assert caught["id"] == liar.id and caught["disagreements"] == 1
    assert "quarantined" in run_cli(cli, "operator", "contributions", "workers")
    out = run_cli(cli, "operator", "contributions", "lift", liar.id[:12])
    assert out.startswith(f"lifted the quarantine of {liar.id[:12]}")
    assert run_cli(cli, "operator", "contributions", "workers", "--quarantined", "--json") == ""


def test_erasing_an_owner_or_a_contributor_takes_their_runs(
    open_coordinator: InProcessCoordinator,
) -> None:
    c = open_coordinator
    bob = c.new_user()
    a = contributed(c)
    held = submit(c, bob.token)
    [j] = a.claim()
    done(a, j, {"n": 1})
    assert len(runs_of(c, a.id)) == 1
    bob.delete_identity()  # the owner: the job and its runs go
    assert runs_of(c, a.id) == []
    carol, dave = c.new_user(), c.new_user()
    r = c.http.post(
        "/v1/workers",
        json={"app": echo_app.manifest().model_dump(mode="json"), "slots": 2, "sandbox": "none"},
        headers={"Authorization": f"Bearer {dave.contribute('echo').token}"},
    )
    assert r.status_code == 201, r.text
    b = HttpWorker(c.http, echo_app, WorkerRegistered.model_validate(r.json()))
    other = submit(c, carol.token)
    [j] = b.claim()
    done(b, j, {"n": 1})
    assert len(runs_of(c, b.id)) == 1
    dave.delete_identity()  # the contributor: its worker and runs go, the job waits on
    assert runs_of(c, b.id) == []
    assert job_of(c, carol.token, other)["state"] == "queued"
    operator = c.worker(echo_app)
    [j] = operator.claim()
    done(operator, j, {"n": 1})
    assert job_of(c, carol.token, other)["result"] == {"n": 1}
    assert held != other


def test_the_migration_adds_its_columns_in_place_and_goes_back(tmp_path: Any) -> None:
    """0009 on SQLite adds columns to workers, jobs and contribution_settings in place (no
    batch copy: rows referencing them stay), and its downgrade drops them again."""
    from sqlalchemy import inspect, text

    from tests.unit.migrations import add_worker_rows, store_at

    with store_at(tmp_path, "0007_contributions") as store, store.engine.connect() as conn:
        add_worker_rows(conn)
        store.to(conn, "0009_verification")
        row = conn.execute(
            text("SELECT agreements, disagreements, quarantined_at FROM workers")
        ).one()
        assert tuple(row) == (0, 0, None)
        assert "job_runs" in inspect(conn).get_table_names()
        store.to(conn, "0007_contributions", down=True)
        columns = {c["name"] for c in inspect(conn).get_columns("workers")}
        assert "agreements" not in columns and "job_runs" not in inspect(conn).get_table_names()
        assert conn.execute(text("SELECT id FROM workers")).scalars().all() == ["w"]


def test_a_failure_is_compared_but_costs_no_reputation(
    open_coordinator: InProcessCoordinator,
) -> None:
    c = open_coordinator
    bob = c.new_user()
    flaky, operator = contributed(c), c.worker(echo_app)
    job_id = submit(c, bob.token)
    [j] = flaky.claim()
    assert flaky.complete(j, state="failed", error="out of memory").status_code == 204
    assert job_of(c, bob.token, job_id)["state"] == "queued"  # a failure is checked too
    [j] = operator.claim()
    done(operator, j, {"n": 1})
    assert job_of(c, bob.token, job_id)["result"] == {"n": 1}
    mine = record(c, flaky.id)
    assert (mine["disagreements"], mine["quarantined_at"]) == (0, None)
    assert [(r["outcome"], r["credit"]) for r in runs_of(c, flaky.id)] == [("disagreed", None)]
    assert digest("failed", None, "x", []).startswith("failed:")


def test_a_caught_workers_token_joins_quarantined(open_coordinator: InProcessCoordinator) -> None:
    """Restarting a quarantined worker (same join token) does not clear its record."""
    c = open_coordinator
    bob, mallory = c.new_user(), c.new_user()
    token = mallory.contribute("echo").token

    def join() -> HttpWorker:
        r = c.http.post(
            "/v1/workers",
            json={"app": echo_app.manifest().model_dump(mode="json"), "slots": 1, "sandbox": ""},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 201, r.text
        return HttpWorker(c.http, echo_app, WorkerRegistered.model_validate(r.json()))

    liar, operator = join(), c.worker(echo_app)
    fresh = join()  # joined before it was caught: not quarantined
    job_id = submit(c, bob.token)
    [j] = liar.claim()
    done(liar, j, {"n": 13})
    [j] = operator.claim()
    done(operator, j, {"n": 1})
    assert record(c, liar.id)["quarantined_at"] is not None
    assert record(c, fresh.id)["quarantined_at"] is None
    again = join()
    assert record(c, again.id)["quarantined_at"] is not None
    submit(c, bob.token, params={"n": 2})
    assert again.claim() == []  # a plain job is not a quarantined worker's
    assert job_of(c, bob.token, job_id)["result"] == {"n": 1}
