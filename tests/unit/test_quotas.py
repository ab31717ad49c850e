"""Per-identity limits and the queue bound, counted in the store: each refusal is a 429
naming the limit, its value and when to retry; windows and quotas reset with the clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import Field

from csml.apps.base import App, JobContext, ModelSpec, OperationParams, Output
from csml.apps.echo import app as echo_app
from csml.client import Client, QueueFull, RateLimited
from csml.client import pow as client_pow
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import InProcessCoordinator, error_of

trainer = App("trainer", version="1.0", description="Writes a tiny model (a test app).")


class TrainParams(OperationParams):
    size: int = Field(2, ge=1, le=64)


@trainer.operation(
    outputs=[Output("model", "The weights.", "application/json", model=ModelSpec("toy", "toy"))]
)
def train(ctx: JobContext, params: TrainParams) -> dict[str, Any]:
    """Write `size` zero weights."""
    ctx.output("model").write_text(json.dumps([0.0] * params.size))
    return {"size": params.size}


def submit_raw(coordinator: InProcessCoordinator, user: Client, **params: Any) -> httpx.Response:
    return coordinator.http.post(
        "/v1/jobs",
        json={"app": "echo", "operation": "echo", "params": params},
        headers={"Authorization": f"Bearer {user.token}"},
    )


def refused(r: httpx.Response, code: str, starts: str) -> dict[str, Any]:
    """The 429 refusal's only detail, after checking its code, message and Retry-After."""
    assert r.status_code == 429, r.text
    error = error_of(r)
    assert error["code"] == code
    assert error["message"].startswith(starts), error["message"]
    [detail] = error["details"]
    assert int(r.headers["retry-after"]) == detail["retry_after"] >= 1
    detail_: dict[str, Any] = detail
    return detail_


def solved_challenge(coordinator: InProcessCoordinator) -> dict[str, str]:
    issued = coordinator.http.post("/v1/identities/challenge").json()
    nonce = client_pow.solve(issued["challenge"], issued["difficulty"])
    return {"challenge": issued["challenge"], "nonce": nonce}


def test_active_jobs_limit(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(max_active_jobs=2)
    worker = coordinator.worker(echo_app)
    user, bystander = coordinator.new_user(), coordinator.new_user()
    first = user.submit("echo", "echo")
    user.submit("echo", "echo")
    detail = refused(
        submit_raw(coordinator, user),
        "active_jobs_limit",
        "concurrent job limit: 2 queued or running jobs reached; resets when one",
    )
    assert (detail["limit"], detail["value"]) == ("concurrent job limit", 2)
    with pytest.raises(RateLimited, match="concurrent job limit") as err:
        user.submit("echo", "echo")
    assert err.value.code == "active_jobs_limit"
    assert submit_raw(coordinator, bystander).status_code == 202  # per identity
    # Running jobs count too; ended ones do not.
    [running] = worker.claim()
    assert running.id == first.id
    assert submit_raw(coordinator, user).status_code == 429
    assert worker.complete(running, result={}).status_code == 204
    assert submit_raw(coordinator, user).status_code == 202
    assert submit_raw(coordinator, user).status_code == 429
    user.jobs()[0].cancel()
    assert submit_raw(coordinator, user).status_code == 202


def test_stored_bytes_quota_resets_when_files_expire(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    coordinator = make_coordinator(max_stored_bytes=1000, retention_hours=1)
    worker = coordinator.worker(echo_app)
    user = coordinator.new_user()
    # Announced too big: refused before any byte is stored.
    with pytest.raises(RateLimited, match="storage quota: 1000 bytes per identity") as err:
        user.submit("echo", "echo", files={"data": b"x" * 2000})
    assert "this upload is" in err.value.message and err.value.code == "storage_quota"
    assert user.jobs() == []
    # 600 bytes in, 600 out (echo copies its file): 1200 stored, over the quota.
    job = user.submit("echo", "echo", files={"data": b"y" * 600})
    [claimed] = worker.claim()
    assert worker.run(claimed, tmp_path).status_code == 204
    assert job.refresh().state.value == "succeeded"
    r = submit_raw(coordinator, user)
    detail = refused(
        r, "storage_quota", "storage quota: 1000 bytes per identity reached (1200 stored); "
    )
    assert "when your oldest finished job expires" in error_of(r)["message"]
    assert (detail["limit"], detail["value"], detail["stored"]) == ("storage quota", 1000, 1200)
    assert detail["retry_after"] == 3600  # the job ended just now; it expires in an hour
    # An hour on, the retention sweep erases the job and its files: room again.
    coordinator.clock.advance(3599)
    assert coordinator.sweep() == 0
    assert submit_raw(coordinator, user).status_code == 429
    coordinator.clock.advance(2)
    assert coordinator.sweep() == 1
    assert submit_raw(coordinator, user).status_code == 202


def test_model_quota(make_coordinator: MakeCoordinator, tmp_path: Path) -> None:
    coordinator = make_coordinator(max_models=1)
    worker = coordinator.worker(trainer)
    user = coordinator.new_user()
    job = user.submit("trainer", "train", params={"size": 3})
    [claimed] = worker.claim()
    assert worker.run(claimed, tmp_path).status_code == 204
    assert job.refresh().state.value == "succeeded"
    assert len(user.models()) == 1
    r = coordinator.http.post(
        "/v1/jobs",
        json={"app": "trainer", "operation": "train", "params": {}},
        headers={"Authorization": f"Bearer {user.token}"},
    )
    detail = refused(r, "model_quota", "model quota: 1 models per identity reached (1 kept)")
    assert (detail["limit"], detail["value"]) == ("model quota", 1)
    # Jobs that keep no model are not counted against it.
    assert submit_raw(coordinator, user).status_code == 202
    user.delete_model(user.models()[0].id)
    assert user.submit("trainer", "train").state.value == "queued"


def test_submissions_per_window_across_coordinators(make_coordinator: MakeCoordinator) -> None:
    one = make_coordinator(submission_rate_limit=3, submission_rate_window_seconds=60)
    two = make_coordinator(submission_rate_limit=3, submission_rate_window_seconds=60)
    user, bystander = one.new_user(), one.new_user()
    assert submit_raw(one, user, i=1).status_code == 202
    assert submit_raw(two, user, i=2).status_code == 202
    assert submit_raw(one, user, i=3).status_code == 202
    r = submit_raw(two, user, i=4)  # the count is kept in the store both share
    detail = refused(r, "submission_rate_limited", "submission rate limit: 3 per minute reached")
    assert detail["window_seconds"] == 60 and detail["retry_after"] == 60
    assert submit_raw(one, bystander).status_code == 202  # per identity
    one.clock.advance(59)
    assert submit_raw(one, user, i=5).status_code == 429
    one.clock.advance(1)  # the window resets
    assert submit_raw(two, user, i=6).status_code == 202
    assert len(user.jobs()) == 4  # refused submissions were not counted or stored


def test_an_expired_challenge_is_refused(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(pow_difficulty=4, pow_challenge_seconds=300)
    body = solved_challenge(coordinator)
    coordinator.clock.advance(301)
    r = coordinator.http.post("/v1/identities", json=body)
    assert r.status_code == 422, r.text
    assert (error_of(r)["code"], error_of(r)["field"]) == ("challenge_expired", "challenge")
    assert "expired" in error_of(r)["message"]


def test_a_full_queue_is_429_with_retry_after(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(queue_capacity=2, retry_after_seconds=7)
    user = coordinator.new_user()
    user.submit("echo", "echo")
    user.submit("echo", "echo")
    r = submit_raw(coordinator, user)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert error_of(r)["code"] == "queue_full"
    assert "the echo queue is full (2 of 2)" in error_of(r)["message"]
    with pytest.raises(QueueFull) as err:
        user.submit("echo", "echo")
    assert err.value.retry_after == 7
    assert coordinator.client(user.token).app("echo").queue.depth == 2
