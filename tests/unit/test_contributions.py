"""Contributed workers through the HTTP API: a token bound to its identity and one app,
the operator's allow/deny and cap, revocation, erasure, and what a contributed worker
may never do (publish a version, serve another app, reach operator routes, receive a
confidential job without a key)."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import csml.cli.main as cli_main
from csml.apps.echo import app as echo_app
from csml.client import CsmlError
from csml.coordinator import contributions
from csml.schemas import WorkerRegistered
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import (
    BASE_URL,
    OPERATOR_TOKEN,
    HttpWorker,
    InProcessCoordinator,
    error_of,
)
from tests.unit.test_sdk_cli import cli, run

__all__ = ["cli"]  # the CLI fixture, shared with test_sdk_cli

OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def open_coordinator(make_coordinator: MakeCoordinator) -> InProcessCoordinator:
    """Contributions on by default (CSML_CONTRIBUTIONS=1)."""
    return make_coordinator(contributions=True)


def register(
    coordinator: InProcessCoordinator, token: str, manifest: dict[str, Any] | None = None, **kw: Any
) -> httpx.Response:
    body = {
        "app": manifest or echo_app.manifest().model_dump(mode="json"),
        "slots": 2,
        "sandbox": "none",
        **kw,
    }
    return coordinator.http.post("/v1/workers", json=body, headers=bearer(token))


@dataclass(frozen=True)
class Caller:
    """A worker as the queue sees one whose request was already authenticated."""

    id: str
    app: str


def contributed_worker(coordinator: InProcessCoordinator, token: str) -> HttpWorker:
    r = register(coordinator, token)
    assert r.status_code == 201, r.text
    return HttpWorker(coordinator.http, echo_app, WorkerRegistered.model_validate(r.json()))


def submit(coordinator: InProcessCoordinator, token: str | None, **params: object) -> str:
    r = coordinator.http.post(
        "/v1/jobs",
        json={"app": "echo", "operation": "echo", "params": params},
        headers=bearer(token),
    )
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def rule(coordinator: InProcessCoordinator, app: str, **body: Any) -> dict[str, Any]:
    r = coordinator.http.put(f"/v1/operator/contributions/{app}", json=body, headers=OPERATOR)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def test_a_contributed_worker_serves_another_identitys_job(
    open_coordinator: InProcessCoordinator,
) -> None:
    alice, bob = open_coordinator.new_user(), open_coordinator.new_user()
    made = alice.contribute("echo", label="laptop")
    assert made.token.startswith("csmljoin") and made.app == "echo"
    assert made.worker_command[:2] == ["csml", "worker"]
    assert made.worker_command[-2:] == ["--join-token-file", "-"]
    assert "--app" in made.container_command and "--read-only" in made.container_command
    worker = contributed_worker(open_coordinator, made.token)

    job_id = submit(open_coordinator, bob.token, word="hi")
    [claimed] = worker.claim()
    assert claimed.id == job_id
    assert worker.complete(claimed, result={"word": "hi"}).status_code == 204
    # Verified (the default policy, replicate:2): held, with no result, until another
    # party's run agrees; an operator worker's run decides.
    held = bob.job(job_id)
    assert held.state.value == "queued" and held.result is None
    assert held.progress[1].startswith("verifying")
    operator = open_coordinator.worker(echo_app)
    [again] = operator.claim()
    assert again.id == job_id
    assert operator.complete(again, result={"word": "hi"}).status_code == 204
    assert bob.job(job_id).state.value == "succeeded"

    [mine] = alice.contributions()
    assert (mine.id, mine.app, mine.label, mine.revoked_at) == (made.id, "echo", "laptop", None)
    assert [w.id for w in mine.workers] == [worker.id]
    listed = open_coordinator.http.get("/v1/contributions", headers=bearer(alice.token)).text
    assert made.token not in listed  # never the token again
    assert bob.contributions() == []


def test_the_worker_counts_split_operator_run_and_contributed(
    open_coordinator: InProcessCoordinator,
) -> None:
    open_coordinator.worker(echo_app)
    alice = open_coordinator.new_user()
    contributed_worker(open_coordinator, alice.contribute("echo").token)
    contributed_worker(open_coordinator, alice.contribute("echo").token)
    counts = contributions.worker_counts(open_coordinator.core)
    assert counts["echo"] == (1, 2)
    r = open_coordinator.http.get("/v1/operator/overview", headers=OPERATOR)
    assert r.status_code == 200, r.text
    flags = sorted(w["contributed"] for w in r.json()["workers"])
    assert flags == [False, True, True]


def test_a_contributed_token_serves_only_its_app_and_never_publishes(
    open_coordinator: InProcessCoordinator,
) -> None:
    alice = open_coordinator.new_user()
    token = alice.contribute("echo").token
    other = echo_app.manifest().model_dump(mode="json")
    other["name"] = "echo2"
    refused = register(open_coordinator, token, other)
    assert refused.status_code == 403 and error_of(refused)["code"] == "app_not_allowed"

    newer = echo_app.manifest().model_dump(mode="json")
    newer["version"] = "99.0.0"
    refused = register(open_coordinator, token, newer)
    assert refused.status_code == 409 and error_of(refused)["code"] == "version_not_approved"
    changed = echo_app.manifest().model_dump(mode="json")
    changed["description"] = "a lie under the pinned version"
    refused = register(open_coordinator, token, changed)
    assert refused.status_code == 409 and error_of(refused)["code"] == "manifest_conflict"
    assert open_coordinator.client().apps()[0].version == echo_app.manifest().version

    # Neither the join token nor its worker's token opens the operator's routes.
    worker = contributed_worker(open_coordinator, token)
    for secret in (token, worker.registered.worker_token):
        r = open_coordinator.http.get("/v1/operator/join-tokens", headers=bearer(secret))
        assert r.status_code == 401
        r = open_coordinator.http.put(
            "/v1/operator/contributions/echo", json={"max_workers": 99}, headers=bearer(secret)
        )
        assert r.status_code == 401


def test_an_unknown_app_or_no_identity_is_refused(open_coordinator: InProcessCoordinator) -> None:
    alice = open_coordinator.new_user()
    with pytest.raises(CsmlError, match="no application 'nope'"):
        alice.contribute("nope")
    r = open_coordinator.http.post("/v1/contributions", json={"app": "echo"})
    assert r.status_code == 401


def test_contributions_are_off_unless_the_operator_allows_them(
    coordinator: InProcessCoordinator,
) -> None:
    alice = coordinator.new_user()
    with pytest.raises(CsmlError, match="does not take contributed workers for 'echo'"):
        alice.contribute("echo")
    assert rule(coordinator, "echo", allowed=True) == {
        "app": "echo",
        "allowed": True,
        "max_workers": None,
        "default": False,
        "contributed_workers": 0,
        "credit_weight": 1.0,
        "verification": "replicate:2",
        "verification_default": True,
    }
    contributed_worker(coordinator, alice.contribute("echo").token)


def test_denying_revokes_the_apps_contributed_tokens(
    open_coordinator: InProcessCoordinator,
) -> None:
    alice, bob = open_coordinator.new_user(), open_coordinator.new_user()
    made = alice.contribute("echo")
    worker = contributed_worker(open_coordinator, made.token)
    assert rule(open_coordinator, "echo", allowed=False)["allowed"] is False

    submit(open_coordinator, bob.token, word="x")
    r = worker.post("/claim", {"max_jobs": 1, "wait": 0})
    assert r.status_code == 401
    assert register(open_coordinator, made.token).status_code == 401  # revoked
    with pytest.raises(CsmlError, match="does not take contributed workers"):
        alice.contribute("echo")
    # A token made while allowed, registering after a deny, is refused by the rule itself.
    rule(open_coordinator, "echo", allowed=True)
    later = alice.contribute("echo").token
    with open_coordinator.core.sessions.begin() as session:
        from csml.store import contributions as rows
        from csml.store.tables import utcnow

        rows.put_setting(session, "echo", False, None, utcnow())
    refused = register(open_coordinator, later)
    assert refused.status_code == 403 and error_of(refused)["code"] == "contributions_off"


def test_the_cap_refuses_a_worker_beyond_it_by_name(
    open_coordinator: InProcessCoordinator,
) -> None:
    rule(open_coordinator, "echo", max_workers=2)
    alice, bob = open_coordinator.new_user(), open_coordinator.new_user()
    first = contributed_worker(open_coordinator, alice.contribute("echo").token)
    contributed_worker(open_coordinator, bob.contribute("echo").token)
    open_coordinator.worker(echo_app)  # the operator's own workers do not count
    refused = register(open_coordinator, alice.contribute("echo").token)
    assert refused.status_code == 409
    assert error_of(refused)["code"] == "contributed_workers_full"
    assert "cap of 2 contributed workers" in error_of(refused)["message"]

    r = first.http.delete(f"/v1/workers/{first.id}", headers=first._headers())
    assert r.status_code == 204
    contributed_worker(open_coordinator, alice.contribute("echo").token)  # room again
    info = rule(open_coordinator, "echo", max_workers=None)
    assert info["max_workers"] is None and info["contributed_workers"] == 2
    assert info["allowed"] is True  # left as it was
    apps = {a["name"]: a for a in open_coordinator.http.get("/v1/apps").json()}
    assert (apps["echo"]["operator_workers"], apps["echo"]["contributed_workers"]) == (1, 2)


def test_revoking_stops_claims_and_only_the_owner_or_operator_may(
    open_coordinator: InProcessCoordinator,
) -> None:
    alice, bob = open_coordinator.new_user(), open_coordinator.new_user()
    made = alice.contribute("echo")
    worker = contributed_worker(open_coordinator, made.token)

    # Bob neither sees nor revokes Alice's token: as if it did not exist.
    r = open_coordinator.http.delete(f"/v1/contributions/{made.id}", headers=bearer(bob.token))
    assert r.status_code == 404
    # Nor can an operator-made token be revoked through an identity's route.
    operator_token = open_coordinator.http.post(
        "/v1/operator/join-tokens", json={"apps": ["echo"]}, headers=OPERATOR
    ).json()["id"]
    r = open_coordinator.http.delete(
        f"/v1/contributions/{operator_token}", headers=bearer(alice.token)
    )
    assert r.status_code == 404

    submit(open_coordinator, bob.token, word="before")
    assert len(worker.claim()) == 1
    alice.revoke_contribution(made.id[:12])
    submit(open_coordinator, bob.token, word="after")
    assert worker.post("/claim", {"max_jobs": 1, "wait": 0}).status_code == 401
    # A claim that authenticated before the revocation (a long-poll still waiting) takes
    # nothing either: the claim itself checks that its worker is not stopped.
    assert open_coordinator.core.queue.claim(Caller(worker.id, "echo"), 1) == []
    [listed] = alice.contributions()
    assert listed.revoked_at is not None and listed.workers[0].stopped_at is not None

    other = alice.contribute("echo")
    contributed_worker(open_coordinator, other.token)
    r = open_coordinator.http.delete(
        f"/v1/operator/contributions/tokens/{other.id}", headers=OPERATOR
    )
    assert r.status_code == 204
    assert register(open_coordinator, other.token).status_code == 401


def test_erasing_the_identity_removes_its_tokens_and_workers(
    open_coordinator: InProcessCoordinator,
) -> None:
    alice, bob = open_coordinator.new_user(), open_coordinator.new_user()
    made = alice.contribute("echo")
    worker = contributed_worker(open_coordinator, made.token)
    assert worker.claim() == []  # its token is now in the worker-token cache
    alice.delete_identity()

    r = worker.post("/claim", {"max_jobs": 1, "wait": 0})
    assert r.status_code == 401
    assert register(open_coordinator, made.token).status_code == 401
    r = open_coordinator.http.get("/v1/operator/join-tokens", headers=OPERATOR)
    assert made.id not in r.text
    assert contributions.worker_counts(open_coordinator.core).get("echo", (0, 0)) == (0, 0)
    assert bob.contributions() == []


def test_a_contributed_worker_without_a_key_gets_no_confidential_job(
    open_coordinator: InProcessCoordinator,
) -> None:
    """Clients seal to the keys `GET /v1/apps/{app}/workers` lists: a contributed worker
    that registered none is not there, cannot be named a recipient, and claims no
    confidential job sealed to another worker."""
    alice, bob = open_coordinator.new_user(), open_coordinator.new_user()
    contributed = contributed_worker(open_coordinator, alice.contribute("echo").token)
    key = base64.b64encode(os.urandom(32)).decode()
    r = register(
        open_coordinator,
        open_coordinator.join_token("echo"),
        attestation={"kind": "none", "public_key": key},
    )
    assert r.status_code == 201, r.text
    keyed = r.json()["worker_id"]

    listed = open_coordinator.http.get("/v1/apps/echo/workers", headers=bearer(bob.token))
    assert listed.status_code == 200, listed.text
    assert [w["worker_id"] for w in listed.json()] == [keyed]

    def b64(n: int) -> str:
        return base64.b64encode(os.urandom(n)).decode()

    def confidential(recipient: str) -> httpx.Response:
        spec = {
            "app": "echo",
            "operation": "echo",
            "params": {},
            "confidential": {
                "job_nonce": b64(32),
                "recipients": [{"worker_id": recipient, "wrapped_key": b64(80)}],
                "result_public_key": b64(32),
                "encrypted_params": b64(64),
            },
        }
        return open_coordinator.http.post("/v1/jobs", json=spec, headers=bearer(bob.token))

    refused = confidential(contributed.id)
    assert refused.status_code == 422 and error_of(refused)["code"] == "unknown_recipient"
    accepted = confidential(keyed)
    assert accepted.status_code == 202, accepted.text
    assert contributed.claim(4) == []


def test_the_cli_contributes_lists_revokes_and_the_operator_rules(
    cli: CliRunner,
    coordinator: InProcessCoordinator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run(cli, "id", "new", "--url", BASE_URL)
    refused = cli.invoke(cli_main.app, ["contribute", "echo"])
    assert isinstance(refused.exception, CsmlError)
    assert "does not take contributed workers for 'echo'" in refused.exception.message

    # The operator's command works on the coordinator's store, from its settings.
    monkeypatch.setenv("CSML_DATA_DIR", str(coordinator.settings.data_dir))
    monkeypatch.setenv("CSML_DATABASE_URL", str(coordinator.settings.database_url))
    out = run(cli, "apps", "contribution", "echo", "--allow", "--max-workers", "1")
    assert out.strip() == "echo: contributed workers allowed, at most 1; 0 live"

    out = run(cli, "contribute", "echo", "--label", "attic")
    token = out.split("join token")[1].split()[0]
    assert f"csml worker --coordinator {BASE_URL} --app echo --join-token-file -" in out
    contributed_worker(coordinator, token)
    assert "podman run" in run(cli, "contribute", "echo", "--container")
    listed = run(cli, "contribute", "list")
    assert token not in listed and "attic" in listed and "workers 1 live / 1" in listed

    [attic] = [line.split()[0] for line in listed.splitlines() if "attic" in line]
    assert "revoked" in run(cli, "contribute", "revoke", attic)
    assert register(coordinator, token).status_code == 401

    out = run(cli, "apps", "contribution", "echo", "--deny")
    assert out.strip() == "echo: contributed workers denied, at most 1; 0 live"
    monkeypatch.setattr("sys.argv", ["csml", "contribute", "revoke", "0" * 12])
    with pytest.raises(SystemExit) as exit_:
        cli_main.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no contribution '000000000000'") and "Traceback" not in err


def test_the_migration_keeps_existing_workers_and_cascades_erasure(tmp_path: Path) -> None:
    """0007 on SQLite adds join_tokens.contributor_id in place: a batch copy of the table
    would drop it, and with foreign keys on that deletes every worker's row."""
    from sqlalchemy import text

    from csml.store.db import migrate
    from tests.unit.migrations import STAMP, add_worker_rows, store_at

    with store_at(tmp_path, "0006_fair_counters") as store:
        with store.engine.connect() as conn:
            add_worker_rows(conn)
        migrate(store.engine)
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM workers")).scalars().all() == ["w"]
            assert conn.execute(text("SELECT contributor_id FROM join_tokens")).all() == [(None,)]
            conn.execute(
                text(
                    "INSERT INTO identities (id, token_hash, created_at) "
                    f"VALUES ('i', 'ih', {STAMP})"
                )
            )
            conn.execute(text("UPDATE join_tokens SET contributor_id = 'i'"))
            conn.commit()
            conn.execute(text("DELETE FROM identities WHERE id = 'i'"))
            conn.commit()
            assert conn.execute(text("SELECT count(*) FROM workers")).scalar() == 0


def test_an_identity_holds_a_bounded_number_of_tokens(
    open_coordinator: InProcessCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(contributions, "MAX_LIVE_TOKENS", 2)
    monkeypatch.setattr(contributions, "MAX_TOKENS", 3)
    alice = open_coordinator.new_user()
    first, second = alice.contribute("echo"), alice.contribute("echo")
    with pytest.raises(CsmlError, match="you hold 2 contributed join tokens already"):
        alice.contribute("echo")
    alice.revoke_contribution(first.id)
    alice.contribute("echo")
    alice.revoke_contribution(first.id)  # again: harmless
    alice.revoke_contribution(second.id)  # one live: only the total refuses now
    with pytest.raises(CsmlError, match="you have made 3 contributed join tokens"):
        alice.contribute("echo")
    open_coordinator.new_user().contribute("echo")  # another identity is not affected
