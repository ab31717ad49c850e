"""Every route x every kind of caller: owner, other identity, no token, bad token, revoked worker.

The route list comes from the OpenAPI document, so a new route without a row
here fails this test until someone decides who may call it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from csml.apps.registry import load_app
from tests.cluster import Cluster, running_cluster, wait_for

# Starts a coordinator and worker processes (30-200 s under load).
pytestmark = pytest.mark.timeout(300)

PUBLIC = {
    ("post", "/v1/identities/challenge"),
    ("post", "/v1/identities"),
    ("get", "/v1/apps"),
    ("get", "/v1/apps/{name}"),
    ("get", "/v1/apps/{name}/workers"),
    ("get", "/healthz"),
}
IDENTITY = {
    ("get", "/v1/identities/me"),
    ("delete", "/v1/identities/me"),
    ("post", "/v1/jobs"),
    ("post", "/v1/jobs/batch"),
    ("get", "/v1/jobs"),
    ("get", "/v1/jobs/{job_id}"),
    ("delete", "/v1/jobs/{job_id}"),
    ("get", "/v1/jobs/{job_id}/outputs/{name}"),
    ("get", "/v1/models"),
    ("post", "/v1/models"),
    ("get", "/v1/models/{model_id}"),
    ("get", "/v1/models/{model_id}/info"),
    ("delete", "/v1/models/{model_id}"),
    ("get", "/v1/jobs/events"),
    ("post", "/v1/contributions"),
    ("get", "/v1/contributions"),
    ("delete", "/v1/contributions/{token_id}"),
    ("get", "/v1/credit"),
}
JOB_SCOPED = {r for r in IDENTITY if "{job_id}" in r[1] or "{model_id}" in r[1]}
JOIN_TOKEN = {("post", "/v1/workers")}
OPERATOR = {
    ("get", "/v1/operator/overview"),
    ("get", "/v1/operator/stats"),
    ("get", "/v1/operator/join-tokens"),
    ("post", "/v1/operator/join-tokens"),
    ("delete", "/v1/operator/join-tokens/{token_id}"),
    ("get", "/v1/operator/contributions"),
    ("put", "/v1/operator/contributions/{app}"),
    ("delete", "/v1/operator/contributions/tokens/{token_id}"),
    ("get", "/v1/operator/credit"),
    ("get", "/v1/operator/contributions/workers"),
    ("delete", "/v1/operator/contributions/workers/{worker_id}/quarantine"),
}
OPERATOR_TOKEN = "csmlop_matrix-operator-token"
WORKER = {
    ("delete", "/v1/workers/{worker_id}"),
    ("post", "/v1/workers/{worker_id}/claim"),
    ("post", "/v1/workers/{worker_id}/heartbeat"),
    ("get", "/v1/workers/{worker_id}/jobs/{job_id}/inputs/{name}"),
    ("put", "/v1/workers/{worker_id}/jobs/{job_id}/outputs/{name}"),
    ("post", "/v1/workers/{worker_id}/jobs/{job_id}/complete"),
    ("post", "/v1/workers/{worker_id}/complete"),
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(
    cluster: Cluster, method: str, template: str, headers: dict[str, str], **values: str
) -> httpx.Response:
    path = template.format(**values)
    body: dict[str, Any] = {}
    if template.endswith("{worker_id}/complete"):
        done = {"job_id": values["job_id"], "lease_id": "0" * 64, "state": "failed"}
        body = {"json": {"completions": [done]}}
    elif template.endswith("/complete"):
        body = {"json": {"lease_id": "0" * 64, "state": "failed", "error": "x"}}
    elif template.endswith("/join-tokens") and method == "post":
        body = {"json": {"apps": ["echo"]}}  # a token names its apps
    elif method in ("post", "put"):
        body = {"json": {}}
    return httpx.request(
        method.upper(),
        f"{cluster.url}{path}",
        headers=headers,
        timeout=30,
        params={"lease_id": "0" * 64} if "{worker_id}/jobs" in template else None,
        **body,
    )


def register_worker(cluster: Cluster, token: str) -> dict[str, Any]:
    manifest = load_app("echo").manifest().model_dump(mode="json")
    r = httpx.post(
        f"{cluster.url}/v1/workers", headers=bearer(token), json={"app": manifest, "slots": 1}
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_every_route_is_classified(cluster: Cluster) -> None:
    routes = {
        (method, path)
        for path, ops in httpx.get(f"{cluster.url}/openapi.json").json()["paths"].items()
        for method in ops
    }
    assert routes == PUBLIC | IDENTITY | JOIN_TOKEN | WORKER | OPERATOR


def test_identity_routes(cluster: Cluster) -> None:
    owner, other = cluster.new_user(), cluster.new_user()
    job = owner.submit("echo", "echo", files={"data": b"secret"}).wait(30)
    model = owner.import_model("dlib", "csml-dlib-svm", b'{"secret": 1}')
    values = {"job_id": job.id, "name": "data", "model_id": model.id, "token_id": "0" * 64}
    for method, template in sorted(IDENTITY):
        for headers in ({}, bearer("csml_not-a-token"), {"Authorization": "Basic eA=="}):
            r = call(cluster, method, template, headers, **values)
            assert r.status_code == 401, (method, template, headers, r.status_code)
        if (method, template) in JOB_SCOPED:
            r = call(cluster, method, template, bearer(other.token or ""), **values)
            assert r.status_code == 404, (method, template, r.status_code)
            assert b"secret" not in r.content
    assert other.jobs() == [] and other.models() == []
    # The owner still has everything, untouched by the others' attempts.
    assert owner.job(job.id).state.value == "succeeded"
    assert [m.id for m in owner.models()] == [model.id]
    r = call(
        cluster, "get", "/v1/jobs/{job_id}/outputs/{name}", bearer(owner.token or ""), **values
    )
    assert r.status_code == 200 and r.content == b"secret"


def test_worker_routes(tmp_path: Any) -> None:
    with running_cluster(tmp_path / "c") as cluster:
        user = cluster.new_user()
        job = user.submit("echo", "echo", files={"data": b"worker-secret"})
        mine = register_worker(cluster, cluster.join_token)
        theirs = register_worker(cluster, cluster.join_token)
        values = {"worker_id": mine["worker_id"], "job_id": job.id, "name": "data"}
        for headers in (
            {},
            bearer("csmlw_wrong"),
            bearer(user.token or ""),
            bearer(theirs["worker_token"] + "x"),
        ):
            for method, template in sorted(WORKER | JOIN_TOKEN):
                r = call(cluster, method, template, headers, **values)
                assert r.status_code == 401, (method, template, headers, r.status_code)
        # Another worker's token on my worker id: not found, never my jobs.
        for method, template in sorted(WORKER):
            r = call(cluster, method, template, bearer(theirs["worker_token"]), **values)
            assert r.status_code == 404, (method, template, r.status_code)
        # My own token works (claim gets the job).
        r = httpx.post(
            f"{cluster.url}/v1/workers/{mine['worker_id']}/claim",
            headers=bearer(mine["worker_token"]),
            json={"max_jobs": 1, "wait": 0},
        )
        assert [j["id"] for j in r.json()["jobs"]] == [job.id]
        # Revoking the join token locks out every worker that joined with it.
        token_id = cluster.csml("join-token", "list").stdout.split()[0]
        cluster.csml("join-token", "revoke", token_id)
        # Revoked outside the coordinator (the CLI writes the store): refused once the
        # coordinator's worker-token cache entry ends (csml.coordinator.worker_tokens).
        # (wait 0: within the cache entry the claim is still accepted and would otherwise
        # long-poll its default 20 s, taking nothing: a stopped worker takes no job.)
        wait_for(
            lambda: (
                httpx.post(
                    f"{cluster.url}/v1/workers/{mine['worker_id']}/claim",
                    headers=bearer(mine["worker_token"]),
                    json={"max_jobs": 1, "wait": 0},
                ).status_code
                == 401
            ),
            timeout=10,
        )
        for method, template in sorted(WORKER):
            r = call(cluster, method, template, bearer(mine["worker_token"]), **values)
            assert r.status_code == 401, (method, template, r.status_code)
        r = httpx.post(
            f"{cluster.url}/v1/workers",
            headers=bearer(cluster.join_token),
            json={"app": load_app("echo").manifest().model_dump(mode="json"), "slots": 1},
        )
        assert r.status_code == 401
        # The job comes back to the queue when the revoked worker's lease ends.
        wait_for(lambda: user.job(job.id).state.value == "queued", timeout=30)


def test_operator_routes(cluster: Cluster, tmp_path: Any) -> None:
    # Without CSML_OPERATOR_TOKEN the operator view is off for everyone.
    user = cluster.new_user()
    for method, template in sorted(OPERATOR):
        for headers in ({}, bearer(OPERATOR_TOKEN), bearer(user.token or "")):
            r = call(
                cluster, method, template, headers, token_id="0" * 64, app="echo", worker_id="0"
            )
            assert r.status_code == 403, (method, template, r.status_code)
    with running_cluster(tmp_path / "c", {"CSML_OPERATOR_TOKEN": OPERATOR_TOKEN}) as op_cluster:
        user = op_cluster.new_user()
        worker = register_worker(op_cluster, op_cluster.join_token)
        token_id = op_cluster.csml("join-token", "list").stdout.split()[0]
        callers: tuple[dict[str, str], ...] = (
            {},
            bearer(OPERATOR_TOKEN + "x"),
            bearer(OPERATOR_TOKEN[:-1]),
            bearer(user.token or ""),
            bearer(op_cluster.join_token),
            bearer(worker["worker_token"]),
        )
        for method, template in sorted(OPERATOR):
            for headers in callers:
                r = call(
                    op_cluster,
                    method,
                    template,
                    headers,
                    token_id=token_id,
                    app="echo",
                    worker_id=worker["worker_id"],
                )
                assert r.status_code == 401, (method, template, headers, r.status_code)
                assert r.json()["error"]["code"] == "unauthorized"
        # The operator token works, and the user and worker tokens were not spent on it.
        ok = bearer(OPERATOR_TOKEN)
        revoke = ("delete", "/v1/operator/join-tokens/{token_id}")
        contributed = ("delete", "/v1/operator/contributions/tokens/{token_id}")
        lift = ("delete", "/v1/operator/contributions/workers/{worker_id}/quarantine")
        for method, template in sorted(OPERATOR - {revoke, contributed, lift}):
            r = call(op_cluster, method, template, ok, token_id=token_id, app="echo")
            assert r.status_code in (200, 201), (method, template, r.status_code, r.text)
        # The operator's own token is no contribution: that route revokes only those.
        r = call(op_cluster, *contributed, ok, token_id=token_id)
        assert r.status_code == 404
        # Nor is the operator's worker contributed (or quarantined): nothing to lift.
        r = call(op_cluster, *lift, ok, worker_id=worker["worker_id"])
        assert r.status_code == 404
        r = call(op_cluster, "delete", "/v1/operator/join-tokens/{token_id}", ok, token_id=token_id)
        assert r.status_code == 204
        assert user.jobs() == []
