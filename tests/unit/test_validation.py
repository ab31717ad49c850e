"""Bad requests get a 4xx JSON error naming the field at fault, and change nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from csml.client import InvalidRequest, NotFound
from tests.unit.inproc import HttpWorker, InProcessCoordinator, error_of


def post_job(coordinator: InProcessCoordinator, token: str, spec: Any) -> httpx.Response:
    return coordinator.http.post(
        "/v1/jobs", json=spec, headers={"Authorization": f"Bearer {token}"}
    )


@pytest.mark.parametrize(
    ("spec", "status", "code", "field"),
    [
        ({"app": "echo", "operation": "echo", "params": {"sleep": -1}}, 422, "invalid_params",
         "params.sleep"),
        ({"app": "echo", "operation": "echo", "params": {"sleep": "long"}}, 422,
         "invalid_params", "params.sleep"),
        ({"app": "opencv", "operation": "detect_faces", "params": {"bogus": 1}}, 422,
         "invalid_params", "params.bogus"),
        ({"app": "nope", "operation": "echo"}, 404, "unknown_app", "spec.app"),
        ({"app": "echo", "operation": "nope"}, 404, "unknown_operation", "spec.operation"),
        ({"app": "opencv", "operation": "detect_faces"}, 422, "missing_input", "image"),
        ({"app": "echo", "operation": "echo", "limits": {"timeout_seconds": 10**9}}, 422,
         "limit_too_high", "spec.limits.timeout_seconds"),
        ({"app": "echo", "operation": "echo", "params": []}, 422, "invalid_spec", "spec.params"),
        ({"operation": "echo"}, 422, "invalid_spec", "spec.app"),
    ],
)  # fmt: skip
def test_a_bad_submission_names_the_field(
    coordinator: InProcessCoordinator, spec: Any, status: int, code: str, field: str
) -> None:
    user = coordinator.new_user()
    assert user.token
    r = post_job(coordinator, user.token, spec)
    assert r.status_code == status, r.text
    error = error_of(r)
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]
    assert user.jobs() == []  # nothing was queued


def test_not_json_is_refused(coordinator: InProcessCoordinator) -> None:
    user = coordinator.new_user()
    r = coordinator.http.post(
        "/v1/jobs",
        content=b"{not json",
        headers={"Authorization": f"Bearer {user.token}", "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert (error_of(r)["code"], error_of(r)["field"]) == ("invalid_spec", "spec")


def test_an_unknown_input_file_is_refused(coordinator: InProcessCoordinator) -> None:
    user = coordinator.new_user()
    with pytest.raises(InvalidRequest) as err:
        user.submit("echo", "echo", files={"photo": b"x"})
    assert (err.value.status, err.value.code, err.value.field) == (422, "unknown_input", "photo")
    assert "it takes: data" in err.value.message


def test_the_sdk_raises_with_the_field(coordinator: InProcessCoordinator) -> None:
    user = coordinator.new_user()
    with pytest.raises(InvalidRequest) as err:
        user.submit("echo", "echo", params={"sleep": -1})
    assert (err.value.code, err.value.field) == ("invalid_params", "params.sleep")
    with pytest.raises(NotFound) as missing:
        user.submit("nope", "echo")
    assert missing.value.field == "spec.app" and "known applications" in missing.value.message


def test_no_token_is_401(coordinator: InProcessCoordinator) -> None:
    r = coordinator.http.post("/v1/jobs", json={"app": "echo", "operation": "echo"})
    assert r.status_code == 401 and "Authorization: Bearer" in error_of(r)["message"]
    r = coordinator.http.get("/v1/jobs", headers={"Authorization": "Bearer csml_wrong"})
    assert r.status_code == 401


def test_bad_worker_requests_name_the_field(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    r = echo_worker.post("/claim", {"max_jobs": 0})
    assert r.status_code == 422 and error_of(r)["field"] == "max_jobs"
    r = echo_worker.post("/heartbeat", {"running": [{"job_id": "x"}]})
    assert r.status_code == 422 and error_of(r)["field"] == "running.0.lease_id"
    r = echo_worker.post("/jobs/x/complete", {"lease_id": "l", "state": "lost"})
    assert r.status_code == 422 and error_of(r)["field"] == "state"
    reserved = coordinator.http.post(
        "/v1/workers",
        json={
            "app": {"name": "pipeline", "version": "1", "operations": []},
            "slots": 1,
        },
        headers={"Authorization": f"Bearer {coordinator.join_token('pipeline')}"},
    )
    assert reserved.status_code == 422 and error_of(reserved)["field"] == "app.name"
    no_join = coordinator.http.post(
        "/v1/workers",
        json={"app": {"name": "echo", "version": "1", "operations": []}, "slots": 1},
        headers={"Authorization": "Bearer csmljoin_forged"},
    )
    assert no_join.status_code == 401
