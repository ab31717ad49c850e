"""Row 3 of the hardening review: quotas hold under concurrency, where the rows land.

Against real coordinator processes on SQLite and PostgreSQL: N submissions sent
at the same moment against a limit k land exactly k (the rest are 429 naming the
limit) for queued + running jobs, stored bytes and models; a pipeline counts
every model its steps would keep, up front; and the transaction that keeps a
model checks the model quota again (here: a limit lowered across a restart).
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import running_cluster
from tests.pg_server import PostgresServer
from tests.security import stores
from tests.security.together import at_once

BASE = {"CSML_POW_DIFFICULTY": "0", "CSML_SUBMISSION_RATE_LIMIT": "0"}
needs_dlib = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None, reason="needs the dlib extra (a model-making app)"
)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with stores.postgres_server() as server:
        yield server


@pytest.fixture(params=stores.BACKENDS)
def store(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    yield from stores.store_env(request.param, request)


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refusals(responses: list[httpx.Response], status: int) -> list[dict[str, str]]:
    return [r.json()["error"] for r in responses if r.status_code == status]


def training_table(folder: Path) -> Path:
    """A small CSV that dlib's train_svm learns from (two separable classes)."""
    rows = ["x,y,label"] + [f"{i},{i % 3},{'a' if i < 10 else 'b'}" for i in range(20)]
    path = folder / "train.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def train_parts(table: Path) -> list[tuple[str, tuple[str | None, bytes, str]]]:
    spec = {"app": "dlib", "operation": "train_svm", "params": {"kernel": "linear"}}
    return [
        ("spec", (None, json.dumps(spec).encode(), "application/json")),
        ("data", ("train.csv", table.read_bytes(), "text/csv")),
    ]


def test_concurrent_submissions_land_exactly_the_active_job_limit(
    tmp_path: Path, store: dict[str, str]
) -> None:
    settings = {**BASE, **store, "CSML_MAX_ACTIVE_JOBS": "3"}
    with running_cluster(tmp_path, settings) as c:  # no worker: every job stays queued
        user = c.new_user()
        spec = {"app": "echo", "operation": "echo", "params": {}}
        responses = at_once(
            c.url, 10, lambda http, i: http.post("/v1/jobs", json=spec, headers=auth(user.token))
        )
        assert Counter(r.status_code for r in responses) == {202: 3, 429: 7}
        for error in refusals(responses, 429):
            assert error["code"] == "active_jobs_limit"
            assert "concurrent job limit: 3" in error["message"]
        assert len(user.jobs()) == 3


def test_concurrent_uploads_land_exactly_the_stored_bytes_quota(
    tmp_path: Path, store: dict[str, str]
) -> None:
    settings = {**BASE, **store, "CSML_MAX_STORED_BYTES": "1000000"}
    spec = json.dumps({"app": "echo", "operation": "echo", "params": {}}).encode()
    blob = b"x" * 300_000  # 3 fit in 1,000,000 bytes, a 4th does not
    with running_cluster(tmp_path, settings) as c:
        user = c.new_user()

        def upload(http: httpx.Client, i: int) -> httpx.Response:
            parts = [("spec", (None, spec, "application/json")), ("data", ("d", blob, "x/y"))]
            return http.post("/v1/jobs", files=parts, headers=auth(user.token))

        responses = at_once(c.url, 10, upload)
        assert Counter(r.status_code for r in responses) == {202: 3, 429: 7}
        for error in refusals(responses, 429):
            assert error["code"] == "storage_quota"
            assert "storage quota: 1000000 bytes" in error["message"]
        assert len(user.jobs()) == 3


@needs_dlib
def test_concurrent_trainings_keep_exactly_the_model_limit(
    tmp_path: Path, store: dict[str, str]
) -> None:
    settings = {**BASE, **store, "CSML_MAX_MODELS": "2"}
    table = training_table(tmp_path)
    with running_cluster(tmp_path, settings) as c:  # dlib is catalogued; no worker yet
        user = c.new_user()
        responses = at_once(
            c.url,
            6,
            lambda http, i: http.post(
                "/v1/jobs", files=train_parts(table), headers=auth(user.token)
            ),
        )
        assert Counter(r.status_code for r in responses) == {202: 2, 429: 4}
        for error in refusals(responses, 429):
            assert error["code"] == "model_quota"
            assert "model quota: 2 models" in error["message"]
        c.start_worker("dlib")
        for job in user.jobs():
            assert job.wait(timeout=180).state.value == "succeeded", job.data.error
        assert len(user.models()) == 2
        again = httpx.post(f"{c.url}/v1/jobs", files=train_parts(table), headers=auth(user.token))
        assert again.status_code == 429 and again.json()["error"]["code"] == "model_quota"


@needs_dlib
def test_keeping_a_model_checks_the_quota_in_its_own_transaction(
    tmp_path: Path, store: dict[str, str]
) -> None:
    """Three trainings accepted under a limit of 3 finish after a restart with a limit of 2:
    the transaction that keeps each model counts again, so two are kept and the third
    job's output stays a plain output, saying why."""
    table = training_table(tmp_path)
    with running_cluster(tmp_path, {**BASE, **store, "CSML_MAX_MODELS": "3"}) as c:
        user = c.new_user()
        for _ in range(3):
            r = httpx.post(f"{c.url}/v1/jobs", files=train_parts(table), headers=auth(user.token))
            assert r.status_code == 202, r.text
        c.stop_coordinator()
        c.env["CSML_MAX_MODELS"] = "2"
        c.start_coordinator()
        c.start_worker("dlib")
        jobs = [j.wait(timeout=180) for j in user.jobs()]
        assert all(j.state.value == "succeeded" for j in jobs), [j.data.error for j in jobs]
        assert len(user.models()) == 2
        unkept = [j for j in jobs if not j.data.models]
        assert len(unkept) == 1
        assert "model" in unkept[0].data.outputs
        assert "model quota" in unkept[0].data.progress.message


@needs_dlib
def test_a_pipeline_counts_every_model_its_steps_would_keep_up_front(
    tmp_path: Path, store: dict[str, str]
) -> None:
    table = training_table(tmp_path)
    with running_cluster(tmp_path, {**BASE, **store, "CSML_MAX_MODELS": "2"}) as c:
        user = c.new_user()

        def pipeline(n: int) -> httpx.Response:
            steps = [
                {
                    "name": f"t{i}",
                    "app": "dlib",
                    "operation": "train_svm",
                    "params": {"kernel": "linear"},
                    "inputs": {"data": "upload:data"},
                }
                for i in range(n)
            ]
            parts = train_parts(table)
            parts[0] = ("spec", (None, json.dumps({"steps": steps}).encode(), "application/json"))
            return httpx.post(f"{c.url}/v1/jobs", files=parts, headers=auth(user.token))

        eight = pipeline(8)
        assert eight.status_code in (422, 429), eight.text
        error = eight.json()["error"]
        assert error["code"] == "model_quota" and "8" in error["message"]
        assert "2 models" in error["message"]
        assert user.jobs() == []

        two = pipeline(2)  # fits: both its models are reserved at once, before any step runs
        assert two.status_code == 202, two.text
        one_more = httpx.post(
            f"{c.url}/v1/jobs", files=train_parts(table), headers=auth(user.token)
        )
        assert one_more.status_code == 429 and one_more.json()["error"]["code"] == "model_quota"
        assert len(user.jobs()) == 1
