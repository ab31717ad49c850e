"""Pipelines end to end: a real coordinator with real echo, OpenCV and dlib workers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Text, cast, func, select

from csml.client import Client, InvalidRequest, NotFound
from csml.client.errors import Conflict, TooManyRequests
from csml.coordinator.abuse import stored_bytes
from csml.store.db import make_engine, make_sessionmaker, sqlite_url
from csml.store.tables import Job
from tests.cluster import Cluster, running_cluster, wait_for
from tests.integration.apps.support import load_dataset

# Starts a coordinator and worker processes (30-200 s under load); multi-step pipelines of
# real jobs.
pytestmark = pytest.mark.timeout(300)

pytest.importorskip("dlib")
pytest.importorskip("cv2")

GRAY_THEN_DLIB = [
    {
        "name": "gray",
        "app": "opencv",
        "operation": "grayscale",
        "inputs": {"image": "upload:photo"},
    },
    {
        "name": "faces",
        "app": "dlib",
        "operation": "detect-faces",
        "params": {"upsample": 1},
        "inputs": {"image": "gray.gray"},
    },
]


@pytest.fixture(scope="module")
def pc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("pipelines")
    settings = {"CSML_POW_DIFFICULTY": "0", "CSML_MAX_ACTIVE_JOBS": "3"}
    with running_cluster(root, settings, {"echo": 1, "opencv": 1, "dlib": 1}) as c:
        yield c


def dlib_faces(image_path: Path) -> int:
    """What dlib's own detector finds on an image, decoded as the apps decode it."""
    import dlib

    from csml.apps.opencv import read_image

    rgb = read_image(image_path)[:, :, ::-1].copy()
    rects, _scores, _kinds = dlib.get_frontal_face_detector().run(rgb, 1, 0.0)
    return len(rects)


def test_two_apps_chained_end_to_end(pc: Cluster, photo: Path, tmp_path: Path) -> None:
    user = pc.new_user()
    seen: list[tuple[str, float, str]] = []
    job = user.submit_pipeline(GRAY_THEN_DLIB, files={"photo": photo})
    assert (job.data.app, job.data.operation) == ("pipeline", "run")
    assert [s.state for s in job.data.steps or []] in (
        ["queued", "pending"],
        ["running", "pending"],
    )
    job.wait(timeout=120, poll=0.2, on_progress=lambda j: seen.append((j.state.value, *j.progress)))
    assert job.state.value == "succeeded", job.error

    steps = job.data.steps or []
    assert [(s.name, s.app, s.operation, s.state) for s in steps] == [
        ("gray", "opencv", "grayscale", "succeeded"),
        ("faces", "dlib", "detect_faces", "succeeded"),
    ]
    # Each step ran on a worker of its own app, as an ordinary job the owner may read.
    gray_job, faces_job = (user.job(s.job_id or "") for s in steps)
    assert (gray_job.data.app, faces_job.data.app) == ("opencv", "dlib")
    assert faces_job.data.inputs["image"].sha256 == gray_job.data.outputs["gray"].sha256

    assert set(job.data.outputs) == {"gray.gray", "faces.annotated"}
    gray_png = job.download("gray.gray", tmp_path / "gray.png")
    expected = dlib_faces(gray_png)
    assert expected >= 1  # the astronaut's face
    assert job.result is not None
    assert job.result["steps"]["faces"]["count"] == expected
    assert job.result["steps"]["gray"]["width"] == job.result["steps"]["faces"]["width"]
    assert job.progress == (1.0, "done: 2 steps")
    messages = [m for _, _, m in seen]
    assert any(m.startswith("step 2/2 faces:") for m in messages), messages
    fractions = [f for _, f, _ in seen]
    assert fractions == sorted(fractions)

    # Steps read the uploads and earlier outputs in place: each file counts once in the quota
    # (besides the params kept in the job rows, which count as their JSON text).
    me = user.request("GET", "/v1/identities/me").json()["id"]
    params_text = func.length(cast(Job.params, Text))
    with make_sessionmaker(make_engine(sqlite_url(pc.data_dir)))() as session:
        stored = stored_bytes(session, me)
        params = session.scalar(
            select(func.coalesce(func.sum(params_text), 0)).where(
                Job.owner_id == me, params_text > 2
            )
        )
    files = {**job.data.inputs, **job.data.outputs}.values()
    assert params
    assert (
        stored - params
        == sum(f.size for f in files)
        == photo.stat().st_size + sum(f.size for f in job.data.outputs.values())
    )

    # Users list pipelines, not their steps; another identity sees nothing of them.
    assert [j.id for j in user.jobs()] == [job.id]
    other = pc.new_user()
    for ident in (job.id, gray_job.id):
        with pytest.raises(NotFound):
            other.job(ident)
    with pytest.raises(NotFound):
        other.job(job.id).download("gray.gray", tmp_path / "x")
    assert other.jobs() == []


def test_a_failing_step_fails_the_pipeline_naming_it(pc: Cluster) -> None:
    user = pc.new_user()
    steps = [
        {"name": "copy", "app": "echo", "operation": "echo", "inputs": {"data": "upload:doc"}},
        {
            "name": "gray",
            "app": "opencv",
            "operation": "grayscale",
            "inputs": {"image": "copy.data"},
        },
        {
            "name": "faces",
            "app": "dlib",
            "operation": "detect_faces",
            "inputs": {"image": "gray.gray"},
        },
    ]
    job = user.submit_pipeline(steps, files={"doc": b"not an image at all"}).wait(timeout=120)
    assert job.state.value == "failed"
    assert job.error is not None
    assert job.error.startswith("step 2 'gray' (opencv.grayscale) failed: input 'image' is not a")
    assert [s.state for s in job.data.steps or []] == ["succeeded", "failed", "pending"]
    assert set(job.data.outputs) == {"copy.data"}  # what the finished steps wrote is kept


def test_cancelling_a_pipeline_stops_its_running_step(pc: Cluster) -> None:
    user = pc.new_user()
    steps = [
        {"name": "wait", "app": "echo", "operation": "echo", "params": {"sleep": 60}},
        {
            "name": "gray",
            "app": "opencv",
            "operation": "grayscale",
            "inputs": {"image": "wait.data"},
        },
    ]
    job = user.submit_pipeline(steps)  # no uploads: sent as JSON
    wait_for(lambda: job.refresh().progress[1].startswith("step 1/2 wait: sleeping"), 30)
    assert job.state.value == "running" and 0 < job.progress[0] < 0.5
    step_id = (job.data.steps or [])[0].job_id or ""
    with pytest.raises(Conflict, match="cancel the pipeline instead"):
        user.job(step_id).cancel()
    job.cancel()
    assert job.state.value == "cancelled"
    assert [s.state for s in job.data.steps or []] == ["cancelled", "pending"]
    assert user.job(step_id).state.value == "cancelled"
    # The worker was told to stop: it is free again for the next job soon.
    quick = user.submit("echo", "echo", params={"n": 1}).wait(timeout=30)
    assert quick.state.value == "succeeded"


def test_a_pipeline_counts_once_against_the_active_job_limit(pc: Cluster) -> None:
    user = pc.new_user()
    slow = [{"name": "wait", "app": "echo", "operation": "echo", "params": {"sleep": 30}}]
    jobs = [user.submit_pipeline(slow) for _ in range(3)]  # limit 3: 3 parents, not 6 rows
    try:
        with pytest.raises(TooManyRequests, match="concurrent job limit"):
            user.submit_pipeline(slow)
    finally:
        for j in jobs:
            j.cancel()


def refused(user: Client, steps: list[dict[str, Any]], **files: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as err:
        user.submit_pipeline(steps, files=files or None)
    assert err.value.status == 422
    return err.value


def test_bad_pipelines_are_refused_with_422_before_anything_runs(pc: Cluster, photo: Path) -> None:
    user = pc.new_user()
    gray, faces = GRAY_THEN_DLIB

    err = refused(user, [{**gray, "app": "nope"}, faces], photo=photo)
    assert err.field == "spec.steps.0.app" and "no application 'nope'" in err.message
    err = refused(user, [gray, {**faces, "operation": "nope"}], photo=photo)
    assert err.field == "spec.steps.1.operation" and "has no operation 'nope'" in err.message
    err = refused(user, [gray, {**faces, "params": {"upsample": 9}}], photo=photo)
    assert err.field == "spec.steps.1.params.upsample"
    err = refused(user, [gray, {**faces, "inputs": {"image": "gray.edges"}}], photo=photo)
    assert err.field == "spec.steps.1.inputs.image" and "writes no output 'edges'" in err.message
    err = refused(user, [gray, {**faces, "inputs": {"image": "later.gray"}}], photo=photo)
    assert "there is no step 'later'" in err.message
    err = refused(user, [{**gray, "inputs": {"image": "faces.annotated"}}, faces], photo=photo)
    assert err.field == "spec.steps.0.inputs.image" and "does not run before" in err.message
    err = refused(user, [gray, {**faces, "inputs": {"image": "gray"}}], photo=photo)
    assert "neither 'upload:<file part>' nor" in err.message
    err = refused(user, [gray, {**faces, "inputs": {}}], photo=photo)
    assert err.field == "spec.steps.1.inputs.image" and "needs the input 'image'" in err.message
    err = refused(user, [gray, {**faces, "inputs": {"picture": "gray.gray"}}], photo=photo)
    assert err.field == "spec.steps.1.inputs.picture"
    err = refused(user, [gray, {**faces, "name": "gray"}], photo=photo)
    assert err.field == "spec.steps.1.name" and "two steps are named 'gray'" in err.message
    err = refused(user, [gray, {**faces, "name": "Bad Name"}], photo=photo)
    assert err.field == "spec.steps.1.name"
    err = refused(user, GRAY_THEN_DLIB)  # no file part for upload:photo
    assert err.field == "photo" and "no file part 'photo'" in err.message
    err = refused(user, GRAY_THEN_DLIB, photo=photo, extra=b"x")
    assert err.field == "extra" and "no step reads the file part 'extra'" in err.message
    err = refused(user, [gray, faces] * 5, photo=photo)
    assert err.field == "spec.steps"
    err = refused(user, [], photo=photo)
    assert err.field == "spec.steps"

    headers = {"Authorization": f"Bearer {user.token}"}
    r = httpx.post(
        f"{pc.url}/v1/jobs",
        json={"steps": GRAY_THEN_DLIB, "confidential": {"version": 1}},
        headers=headers,
    )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "confidential_pipeline"
    assert "cannot be confidential" in r.json()["error"]["message"]
    assert user.jobs() == []  # nothing was queued


def test_erasing_the_identity_removes_pipeline_and_step_rows_and_files(
    pc: Cluster, photo: Path
) -> None:
    user = pc.new_user()
    job = user.submit_pipeline(GRAY_THEN_DLIB, files={"photo": photo}).wait(timeout=120)
    assert job.state.value == "succeeded", job.error
    ids = [job.id, *((s.job_id or "") for s in job.data.steps or [])]
    folders = [pc.data_dir / "blobs" / "jobs" / i[:2] / i for i in ids]
    marks = ",".join("?" * len(ids))
    # Each job's files: a folder, or (small ones) bytes in their rows (`csml.store.blobs`).
    in_rows = (
        "SELECT DISTINCT j.id FROM job_files f JOIN jobs j ON j.seq = f.job_seq "
        f"WHERE j.id IN ({marks}) AND f.content IS NOT NULL"
    )
    with sqlite3.connect(pc.data_dir / "csml.db") as db:
        kept = {r[0] for r in db.execute(in_rows, ids)}
    assert all(f.is_dir() or i in kept for i, f in zip(ids, folders, strict=True))
    user.delete_identity()
    with sqlite3.connect(pc.data_dir / "csml.db") as db:
        left = db.execute(f"SELECT count(*) FROM jobs WHERE id IN ({marks})", ids).fetchone()
        assert db.execute(in_rows, ids).fetchall() == []  # no bytes of theirs left
    assert left == (0,)
    assert not any(f.exists() for f in folders)


def untimed(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.endswith("_seconds")}


def test_a_model_output_feeds_a_later_step_and_is_kept(pc: Cluster, tmp_path: Path) -> None:
    split = load_dataset("iris").split(tmp_path)
    user = pc.new_user()
    steps = [
        {
            "name": "train",
            "app": "dlib",
            "operation": "train_svm",
            "params": {"kernel": "linear"},
            "inputs": {"data": "upload:train"},
        },
        {
            "name": "predict",
            "app": "dlib",
            "operation": "predict_svm",
            "inputs": {"model": "train.model", "data": "upload:test"},
        },
    ]
    job = user.submit_pipeline(steps, files={"train": split.train, "test": split.test})
    job.wait(timeout=120)
    assert job.state.value == "succeeded", job.error
    model_id = job.models["train.model"]  # the step's model output is one of the user's models
    assert [m.id for m in user.models()] == [model_id]
    direct = user.submit(
        "dlib", "predict_svm", files={"data": split.test}, params={"model": model_id}
    ).wait(timeout=120)
    assert direct.state.value == "succeeded", direct.error
    assert job.result is not None and direct.result is not None
    assert untimed(job.result["steps"]["predict"]) == untimed(direct.result)
    chained = job.download("predict.predictions", tmp_path / "chained.csv").read_bytes()
    assert chained == direct.download("predictions", tmp_path / "direct.csv").read_bytes()

    wrong = [
        {
            **steps[0],
            "name": "gray",
            "app": "opencv",
            "operation": "grayscale",
            "params": {},
            "inputs": {"image": "upload:train"},
        },
        {**steps[1], "inputs": {"model": "gray.gray", "data": "upload:test"}},
    ]
    err = refused(user, wrong, train=split.train, test=split.test)
    assert err.field == "spec.steps.1.inputs.model" and "needs a csml-dlib-svm model" in err.message
    other = pc.new_user()
    by_id = [{**steps[1], "params": {"model": model_id}, "inputs": {"data": "upload:test"}}]
    with pytest.raises(NotFound) as missing:
        other.submit_pipeline(by_id, files={"test": split.test})
    assert missing.value.field == "spec.steps.0.params.model"
    reused = user.submit_pipeline(by_id, files={"test": split.test}).wait(timeout=120)
    assert reused.state.value == "succeeded", reused.error
    assert reused.result is not None
    assert untimed(reused.result["steps"]["predict"]) == untimed(direct.result)


@pytest.fixture(scope="module")
def retention(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    settings = {
        "CSML_POW_DIFFICULTY": "0",
        "CSML_RETENTION_HOURS": str(2 / 3600),
        "CSML_RETENTION_INTERVAL_SECONDS": "0.3",
    }
    root = tmp_path_factory.mktemp("pipeline-retention")
    with running_cluster(root, settings, {"echo": 1}) as c:
        yield c


def rows(cluster: Cluster, sql: str, *args: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(cluster.data_dir / "csml.db") as db:
        return db.execute(sql, args).fetchall()


def test_retention_keeps_finished_steps_while_their_pipeline_runs(retention: Cluster) -> None:
    user = retention.new_user()
    steps = [
        {"name": "copy", "app": "echo", "operation": "echo", "inputs": {"data": "upload:doc"}},
        {
            "name": "slow",
            "app": "echo",
            "operation": "echo",
            "params": {"sleep": 6},
            "inputs": {"data": "copy.data"},
        },
    ]
    job = user.submit_pipeline(steps, files={"doc": b"kept while it runs"})
    wait_for(lambda: job.refresh().progress[1].startswith("step 2/2 slow: sleeping"), 30)
    first = (job.data.steps or [])[0].job_id or ""
    first_folder = retention.data_dir / "blobs" / "jobs" / first[:2] / first
    retention_period = timedelta(hours=float(retention.env["CSML_RETENTION_HOURS"]))
    sweep = float(retention.env["CSML_RETENTION_INTERVAL_SECONDS"])

    def step_one_expired_and_swept() -> bool:
        [(finished,)] = rows(retention, "SELECT finished_at FROM jobs WHERE id = ?", first)
        ended = datetime.fromisoformat(finished).replace(tzinfo=UTC)
        return datetime.now(UTC) - ended > retention_period + timedelta(seconds=3 * sweep)

    # Step 1 ended more than the retention period ago, and sweeps ran since.
    wait_for(step_one_expired_and_swept, timeout=30)
    assert rows(retention, "SELECT state FROM jobs WHERE id = ?", first) == [("succeeded",)]
    # Its output is kept: a small one in its row (`csml.store.blobs`), else its folder.
    [(blob, has_bytes)] = rows(
        retention,
        "SELECT f.blob, f.content IS NOT NULL FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
        " WHERE j.id = ? AND f.kind = 'output'",
        first,
    )
    assert has_bytes if blob.startswith("db:") else first_folder.is_dir()
    assert job.wait(30).state.value == "succeeded", job.error
    assert job.result == {
        "steps": {"copy": {"params": {"sleep": 0.0}}, "slow": {"params": {"sleep": 6.0}}}
    }
    # Once the pipeline has ended and expired, it goes with all its steps, rows and files.
    ids = [job.id, *((s.job_id or "") for s in job.data.steps or [])]
    folders = [retention.data_dir / "blobs" / "jobs" / i[:2] / i for i in ids]
    marks = ",".join("?" * len(ids))
    gone = f"SELECT count(*) FROM jobs WHERE id IN ({marks})"  # rows, and bytes kept in them
    wait_for(lambda: rows(retention, gone, *ids) == [(0,)], timeout=20)
    wait_for(lambda: not any(f.exists() for f in folders), timeout=20)
    wait_for(lambda: rows(retention, "SELECT count(*) FROM pending_purges") == [(0,)], 15)


def test_a_step_whose_worker_is_lost_fails_the_pipeline(tmp_path: Path) -> None:
    settings = {"CSML_POW_DIFFICULTY": "0", "CSML_MAX_ATTEMPTS": "1"}
    with running_cluster(tmp_path, settings) as cluster:
        user = cluster.new_user()
        steps = [{"name": "wait", "app": "echo", "operation": "echo", "params": {"sleep": 30}}]
        worker = cluster.start_worker("echo")
        job = user.submit_pipeline(steps)
        wait_for(lambda: job.refresh().progress[1].startswith("step 1/1 wait: sleeping"), 30)
        os.kill(worker.pid, signal.SIGKILL)
        job.wait(30)
        assert job.state.value == "failed"
        assert job.error is not None and job.error.startswith(
            "step 1 'wait' (echo.echo) failed: the worker running it was lost 1 times"
        )
        assert [s.state for s in job.data.steps or []] == ["failed"]


def test_cli_runs_a_pipeline_and_shows_its_steps(pc: Cluster, photo: Path, tmp_path: Path) -> None:
    env = {**pc.env, "CSML_CONFIG": str(tmp_path / "cfg" / "config.toml")}

    def csml(*args: str, check: bool = True) -> tuple[int, str, str]:
        r = pc.csml(*args, env=env, check=check)
        return r.returncode, r.stdout, r.stderr

    csml("id", "new", "--url", pc.url)
    spec = tmp_path / "pipeline.json"
    spec.write_text(json.dumps({"steps": GRAY_THEN_DLIB}))
    out_dir = tmp_path / "out"
    _, out, _ = csml(
        "pipeline", "run", str(spec), "--file", f"photo={photo}", "--wait", "-o", str(out_dir)
    )
    job_id = out.split()[1]
    assert "pipeline.run" in out and '"faces": {"count": ' in out
    assert [
        line.split()[1:4] for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])
    ] == [
        ["gray", "opencv.grayscale", "succeeded"],
        ["faces", "dlib.detect_faces", "succeeded"],
    ]
    saved = sorted(p.name for p in out_dir.iterdir())
    assert saved == ["faces.annotated.png", "gray.gray.png"]
    _, out, _ = csml("pipeline", "status", job_id[:12])
    assert "faces" in out and "dlib.detect_faces" in out

    spec.write_text(json.dumps([GRAY_THEN_DLIB[0], {**GRAY_THEN_DLIB[1], "operation": "nope"}]))
    code, _, err = csml("pipeline", "run", str(spec), "--file", f"photo={photo}", check=False)
    assert code == 1
    assert err.startswith("error: spec.steps.1: application 'dlib' has no operation 'nope'")
    assert "Traceback" not in err
    code, _, err = csml("pipeline", "run", str(spec), "--file", "photo", check=False)
    assert code == 1 and "give NAME=PATH" in err


def test_no_worker_may_serve_an_app_named_pipeline(pc: Cluster) -> None:
    from csml.apps.registry import load_app

    manifest = load_app("echo").manifest().model_dump(mode="json")
    manifest["name"] = "pipeline"
    r = httpx.post(
        f"{pc.url}/v1/workers",
        headers={"Authorization": f"Bearer {pc.join_token}"},
        json={"app": manifest, "slots": 1},
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "app.name"
