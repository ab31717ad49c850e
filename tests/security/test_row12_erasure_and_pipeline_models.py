"""Row 12 of the hardening review (two of its items), against real processes.

- Erasing an identity (`DELETE /v1/identities/me`) while one of its uploads is
  still streaming: the erasure succeeds, the upload ends in a clean 4xx (not a
  500), and nothing of it is left: no job, file or rate-window row, no blob.
- A pipeline whose later step names a model by id (`params.model`) that is
  deleted after submission: the pipeline kept its own copy at submission (as a
  single job does), so the later step still runs.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from csml.store.tables import Identity, Job, JobFile
from csml.store.tables_abuse import RateWindow
from csml.store.tables_artifacts import ModelArtifact
from tests.cluster import running_cluster, wait_for
from tests.pg_server import PostgresServer
from tests.security import stores

BASE = {"CSML_POW_DIFFICULTY": "0"}
BOUNDARY = "csmlsecurityrow12"


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with stores.postgres_server() as server:
        yield server


@pytest.fixture(params=stores.BACKENDS)
def store(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    yield from stores.store_env(request.param, request)


def staged_bytes(data_dir: Path) -> int:
    staging = data_dir / "blobs" / "staging"
    return sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# (route, spec part, file part): a job's input, and a model being imported.
UPLOADS = {
    "job": ("/v1/jobs", {"app": "echo", "operation": "echo", "params": {}}, "data"),
    "model": ("/v1/models", {"app": "dlib", "format": "csml-dlib-svm"}, "model"),
}


@pytest.mark.parametrize("kind", sorted(UPLOADS))
def test_erasure_during_an_upload_is_a_clean_refusal_and_leaves_nothing(
    tmp_path: Path, store: dict[str, str], kind: str
) -> None:
    route, spec_data, part = UPLOADS[kind]
    if kind == "model" and importlib.util.find_spec("dlib") is None:
        pytest.skip("needs the dlib extra (an app that imports models)")
    with running_cluster(tmp_path, {**BASE, **store}) as c:  # no worker: the job would queue
        user = c.new_user()
        token = user.token
        identity = httpx.get(
            f"{c.url}/v1/identities/me", headers={"Authorization": f"Bearer {token}"}
        ).json()["id"]
        erased = threading.Event()
        spec = json.dumps(spec_data).encode()

        def body() -> Iterator[bytes]:
            yield (
                (
                    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="spec"\r\n'
                    "Content-Type: application/json\r\n\r\n"
                ).encode()
                + spec
                + b"\r\n"
            )
            yield (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{part}"; filename="d"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            yield b"x" * (1 << 20)
            erased.wait(120)  # the rest of the file only after the identity is gone
            yield b"y" * (1 << 16)
            yield f"\r\n--{BOUNDARY}--\r\n".encode()

        answer: list[httpx.Response] = []

        def upload() -> None:
            answer.append(
                httpx.post(
                    f"{c.url}{route}",
                    content=body(),
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                    },
                    timeout=120,
                )
            )

        sender = threading.Thread(target=upload)
        sender.start()
        try:
            wait_for(lambda: staged_bytes(c.data_dir) > 0)  # the upload is in flight
            erase = httpx.delete(
                f"{c.url}/v1/identities/me", headers={"Authorization": f"Bearer {token}"}
            )
            assert erase.status_code == 204, erase.text
        finally:
            erased.set()
            sender.join(120)
        assert answer, "the upload got no answer"
        response = answer[0]
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        assert response.json()["error"]["message"]

        engine = create_engine(stores.store_url(store, c.data_dir))
        try:
            with engine.connect() as db:
                for table in (Identity, Job, JobFile, ModelArtifact, RateWindow):
                    rows = db.execute(select(table.__table__)).all()
                    assert not [r for r in rows if identity in repr(r)], (
                        table,
                        rows,
                    )
                assert db.execute(select(func.count()).select_from(Job)).scalar() == 0
        finally:
            engine.dispose()
        assert files_under(c.data_dir / "blobs" / "jobs") == []
        assert files_under(c.data_dir / "blobs" / "models") == []
        assert files_under(c.data_dir / "blobs" / "staging") == []


def training_table(folder: Path) -> Path:
    rows = ["x,y,label"] + [f"{i},{i % 3},{'a' if i < 10 else 'b'}" for i in range(20)]
    path = folder / "train.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.skipif(importlib.util.find_spec("dlib") is None, reason="needs the dlib extra")
def test_a_later_step_runs_with_a_model_deleted_after_submission(tmp_path: Path) -> None:
    table = training_table(tmp_path)
    with running_cluster(tmp_path, BASE, {"dlib": 1}) as c:
        user = c.new_user()
        trained = user.submit(
            "dlib", "train_svm", files={"data": table}, params={"kernel": "linear"}
        ).wait(timeout=180)
        assert trained.state.value == "succeeded", trained.data.error
        model_id = trained.models["model"]

        worker = c.workers[0]  # no dlib worker while the model goes away
        worker.terminate()
        worker.wait(30)
        steps = [
            {
                "name": name,
                "app": "dlib",
                "operation": "predict_svm",
                "params": {"model": model_id},
                "inputs": {"data": "upload:data"},
            }
            for name in ("first", "later")
        ]
        pipeline = user.submit_pipeline(steps, files={"data": table})
        user.delete_model(model_id)
        assert model_id not in [m.id for m in user.models()]

        c.start_worker("dlib")
        done = pipeline.wait(timeout=180)
        assert done.state.value == "succeeded", done.data.error
        assert done.data.steps is not None
        assert [s.state for s in done.data.steps] == ["succeeded", "succeeded"]
        assert any(name.startswith("later.") for name in done.data.outputs)
