"""Placement with real worker processes (`csml worker --label ...`): a job requiring a
label runs only on a worker announcing it; a dnn_infer job goes to the worker that holds
its network loaded, and the load time that saves is printed (measured, not asserted)."""

from __future__ import annotations

import sqlite3
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from csml.client import Client, Job
from tests.cluster import Cluster, running_cluster, wait_for
from tests.integration.apps.dnn_builders import onnx_deep

pytestmark = pytest.mark.timeout(600)

WIDTH = 64


@pytest.fixture(scope="module")
def placed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A coordinator; echo workers with and without a GPU label; two opencv workers
    told apart by a `role` label (to set up what each holds warm)."""
    root = tmp_path_factory.mktemp("placement")
    with running_cluster(root, {"CSML_MAX_UPLOAD_BYTES": str(64 << 20)}) as c:
        c.start_worker("echo", 1, ("--label", "gpu=true", "--label", "gpu_memory_gb=24"))
        c.start_worker("echo", 1, ("--label", "gpu=false"))
        c.start_worker("opencv", 1, ("--label", "role=a"))
        c.start_worker("opencv", 1, ("--label", "role=b"))
        c.wait_workers("echo", 2, timeout=120)
        c.wait_workers("opencv", 2, timeout=120)
        yield c


def ran_on(cluster: Cluster, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Job id -> the labels of the worker that ran it (read from the coordinator's store)."""
    import json

    db = sqlite3.connect(f"file:{cluster.data_dir / 'csml.db'}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(job_ids))
        rows = db.execute(
            f"SELECT jobs.id, workers.labels FROM jobs JOIN workers ON workers.id = jobs.worker_id "
            f"WHERE jobs.id IN ({marks})",
            job_ids,
        ).fetchall()
    finally:
        db.close()
    return {job_id: json.loads(labels or "{}") for job_id, labels in rows}


def test_a_job_requiring_a_gpu_runs_only_on_a_worker_announcing_one(placed: Cluster) -> None:
    user = placed.new_user()
    gpu = [user.submit("echo", "echo", params={"n": i}, requires={"gpu": True}) for i in range(8)]
    big = [
        user.submit("echo", "echo", params={"n": i}, requires={"gpu_memory_gb": {"min": 16}})
        for i in range(4)
    ]
    plain = [user.submit("echo", "echo", params={"n": i}) for i in range(8)]
    for job in [*gpu, *big, *plain]:
        assert job.wait(timeout=120).state.value == "succeeded", job.data.error
    where = ran_on(placed, [j.id for j in [*gpu, *big, *plain]])
    assert all(where[j.id]["gpu"] is True for j in [*gpu, *big])
    # The plain jobs may run anywhere (both workers took some, most likely).
    assert {where[j.id]["gpu"] for j in plain} <= {True, False}
    # A requirement no worker meets waits with a message naming it.
    waiting = user.submit("echo", "echo", requires={"gpu_memory_gb": {"min": 80}})
    message = wait_for(lambda: waiting.refresh().data.progress.message, timeout=30)
    assert message.startswith("waiting: no live worker has gpu_memory_gb>=80"), message
    assert waiting.state.value == "queued"
    waiting.cancel()


def tensor(tmp: Path, name: str) -> Path:
    path = tmp / name
    np.save(path, np.ones((1, WIDTH), np.float32), allow_pickle=False)
    return path


def upload(user: Client, network: bytes, tmp: Path, role: str) -> str:
    """A model of `user` from a network uploaded on the worker of `role`; its id."""
    path = tmp / f"net-{role}.onnx"
    path.write_bytes(network)
    job = user.submit(
        "opencv",
        "dnn_infer",
        files={"network": path, "tensor": tensor(tmp, f"t-{role}.npy")},
        requires={"role": role},
    )
    assert job.wait(timeout=300).state.value == "succeeded", job.data.error
    return job.data.models["model"]


def test_a_dnn_job_prefers_the_worker_holding_its_network(placed: Cluster, tmp_path: Path) -> None:
    user = placed.new_user()
    x = tensor(tmp_path, "x.npy")
    models = {
        "a": upload(user, onnx_deep(400, WIDTH, seed=1), tmp_path, "a"),
        "b": upload(user, onnx_deep(400, WIDTH, seed=2), tmp_path, "b"),
    }
    # Each worker runs the user's stored model once: it is then warm there (per owner).
    for role, model in models.items():
        job = user.submit(
            "opencv",
            "dnn_infer",
            files={"tensor": x},
            params={"model": model},
            requires={"role": role},
        )
        assert job.wait(timeout=300).state.value == "succeeded", job.data.error
    # Jobs of both models, alternating, queued at once and free to go anywhere.
    order = ["a", "b"] * 6
    jobs = user.submit_many(
        "opencv",
        "dnn_infer",
        [{"params": {"model": models[m]}, "files": {"tensor": x}} for m in order],
    )
    done: list[Job] = []
    for answer in jobs:
        assert isinstance(answer, Job), answer
        assert answer.wait(timeout=300).state.value == "succeeded", answer.data.error
        done.append(answer)
    where = ran_on(placed, [j.id for j in done])
    # A worker takes the jobs of the network it holds while any is queued (all were
    # queued in one commit, well within the placement window): each worker starts with
    # the jobs of the network it held, and turns to the other network (which it then
    # holds) only once none of its own is left, never back.
    runs: dict[str, list[tuple[Any, str, float]]] = {"a": [], "b": []}
    for job, model in zip(done, order, strict=True):
        d = job.data
        assert d.started_at is not None and d.finished_at is not None
        wall = (d.finished_at - d.started_at).total_seconds()
        runs[where[job.id]["role"]].append((d.started_at, model, wall))
    warm_walls: list[float] = []
    cold_walls: list[float] = []
    for role, seq in runs.items():
        seq.sort()
        models_run = [m for _, m, _ in seq]
        assert models_run, f"worker {role} ran none of the jobs"
        assert models_run[0] == role, (role, models_run)
        first_other = next((i for i, m in enumerate(models_run) if m != role), len(models_run))
        assert all(m != role for m in models_run[first_other:]), (role, models_run)
        loaded = role
        for _, model, wall in seq:
            (warm_walls if model == loaded else cold_walls).append(wall)
            loaded = model
    hits = len(warm_walls)
    print(
        f"\nplacement: {hits} of {len(done)} dnn_infer jobs ran where their network was "
        f"loaded; job wall p50 warm {statistics.median(warm_walls) * 1000:.0f} ms"
        + (
            f", cold {statistics.median(cold_walls) * 1000:.0f} ms "
            f"(saved ~{(statistics.median(cold_walls) - statistics.median(warm_walls)) * 1000:.0f}"
            " ms per warm job)"
            if cold_walls
            else " (no cold load)"
        )
    )
    assert hits >= len(done) // 2
