"""Row 12 (nesting and NaN) and row 1 (params) of the hardening review: a spec's
shape is bounded before anything parses it for real.

Against a real coordinator process: 100,000 nested `[` are a 400 (not a 500 from
a RecursionError), as JSON or as the `spec` form part; `NaN` and `Infinity` are a
422 naming the field; params over their size or nesting cap are refused naming
the limit; and params count toward the stored-bytes quota.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster import Cluster, running_cluster
from tests.security.raw_http import FORM, form, send

QUOTA = 300_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("row12")
    with running_cluster(root, {"CSML_MAX_STORED_BYTES": str(QUOTA)}) as c:
        yield c


@pytest.fixture(scope="module")
def token(cluster: Cluster) -> str:
    return cluster.new_user().token or ""


def submit_json(cluster: Cluster, token: str, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{cluster.url}/v1/jobs",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=60,
    )


NESTED = b"[" * 100_000


def test_deeply_nested_spec_is_400(cluster: Cluster, token: str) -> None:
    for body in (NESTED, b'{"app": "echo", "operation": "echo", "params": {"x": ' + NESTED):
        answer = submit_json(cluster, token, body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "too_deeply_nested"
    # The same as the spec part of a form.
    headers = {**FORM, "Authorization": f"Bearer {token}"}
    raw = send(
        cluster.url, "POST", "/v1/jobs", form([("spec", [NESTED])]), length=None, headers=headers
    )
    assert raw.status == 400, raw.body
    assert raw.json()["error"]["code"] == "too_deeply_nested"
    assert httpx.get(f"{cluster.url}/healthz").status_code == 200


def test_params_nesting_capped(cluster: Cluster, token: str) -> None:
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    spec = {"app": "echo", "operation": "echo", "params": {"x": deep}}
    answer = submit_json(cluster, token, json.dumps(spec).encode())
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "too_deeply_nested"
    assert error["field"].startswith("spec.params.x")
    assert "CSML_MAX_PARAMS_DEPTH" in error["message"]


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_422_naming_the_field(
    cluster: Cluster, token: str, number: bytes
) -> None:
    body = b'{"app": "echo", "operation": "echo", "params": {"sleep": %s}}' % number
    answer = submit_json(cluster, token, body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == "spec.params.sleep"
    assert error["code"] == "invalid_number"
    headers = {**FORM, "Authorization": f"Bearer {token}"}
    raw = send(
        cluster.url, "POST", "/v1/jobs", form([("spec", [body])]), length=None, headers=headers
    )
    assert raw.status == 422, raw.body
    assert raw.json()["error"]["field"] == "spec.params.sleep"


def test_params_over_the_cap_refused_naming_it(cluster: Cluster, token: str) -> None:
    spec = {"app": "echo", "operation": "echo", "params": {"blob": "x" * 100_000}}
    answer = submit_json(cluster, token, json.dumps(spec).encode())
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["code"] == "params_too_large" and error["field"] == "spec.params"
    assert "CSML_MAX_PARAMS_BYTES" in error["message"]
    # 20 MB of params (accepted and stored twice before): refused by the spec's body limit.
    spec = {"app": "echo", "operation": "echo", "params": {"blob": "x" * 20_000_000}}
    answer = submit_json(cluster, token, json.dumps(spec).encode())
    assert answer.status_code == 413, answer.text
    assert "CSML_MAX_SPEC_BYTES" in answer.json()["error"]["message"]


def test_params_count_toward_stored_bytes(cluster: Cluster) -> None:
    user = cluster.new_user()
    spec = {"app": "echo", "operation": "echo", "params": {"blob": "x" * 60_000}}
    accepted = 0
    for _ in range(10):  # 10 x 60 kB of params against a 300 kB quota
        answer = submit_json(cluster, user.token or "", json.dumps(spec).encode())
        if answer.status_code != 202:
            assert answer.status_code == 429, answer.text
            assert answer.json()["error"]["code"] == "storage_quota"
            break
        accepted += 1
    assert 1 <= accepted < 10
