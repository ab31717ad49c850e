"""Crashes, limits, cancellation, lost workers and restarts: nothing is lost, nothing doubled."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import signal
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from csml.client import Conflict
from tests.cluster import Cluster, running_cluster, wait_for

# Clusters that crash, restart and lose workers; waits of up to 60 s each.
pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize(
    ("operation", "params", "limits", "reason"),
    [
        ("allocate", {"megabytes": 400}, {"memory_mb": 100}, "memory limit of 100 MB"),
        ("spin", {"seconds": 30}, {"cpu_seconds": 1}, "CPU-time limit of 1 s"),
        ("echo", {"sleep": 30}, {"timeout_seconds": 1}, "time limit of 1 s"),
        ("crash", {}, None, "SIGSEGV"),
    ],
)
def test_a_misbehaving_job_fails_with_the_reason_and_the_worker_goes_on(
    cluster: Cluster,
    operation: str,
    params: dict[str, Any],
    limits: dict[str, Any] | None,
    reason: str,
) -> None:
    client = cluster.new_user()
    worker_pids = [w.pid for w in cluster.workers if w.poll() is None]
    job = client.submit("echo", operation, params=params, limits=limits).wait(60)
    assert job.state.value == "failed"
    assert reason in (job.error or ""), job.error
    assert job.data.attempts == 1  # a job's own failure is not retried
    after = client.submit("echo", "echo", params={"still": "alive"}).wait(30)
    assert after.state.value == "succeeded"
    assert [w.pid for w in cluster.workers if w.poll() is None] == worker_pids


def test_limits_above_the_coordinator_maximum_are_refused(cluster: Cluster) -> None:
    with pytest.raises(Exception, match="above this coordinator's maximum") as err:
        cluster.new_user().submit("echo", "echo", limits={"memory_mb": 10**7})
    assert getattr(err.value, "field", None) == "spec.limits.memory_mb"


def test_cancel_a_running_job_stops_it_on_its_worker(cluster: Cluster) -> None:
    client = cluster.new_user()
    job = client.submit("echo", "echo", params={"sleep": 60})
    wait_for(lambda: job.refresh().state.value == "running")
    job.cancel()
    assert job.state.value == "cancelled"
    # The slot comes back: both slots serve new jobs promptly.
    quick = [client.submit("echo", "echo", params={"i": i}) for i in range(4)]
    for q in quick:
        assert q.wait(20).state.value == "succeeded"
    assert job.refresh().state.value == "cancelled"
    with pytest.raises(Conflict, match="already cancelled"):
        job.cancel()


def test_progress_is_reported_while_running(cluster: Cluster) -> None:
    job = cluster.new_user().submit("echo", "echo", params={"sleep": 3})
    seen = wait_for(lambda: job.refresh().progress[0] > 0 and job.progress, timeout=10)
    assert "left" in seen[1]
    assert job.wait(20).progress[0] == 1.0


def test_cancel_a_queued_job(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as cluster:  # no workers: jobs stay queued
        client = cluster.new_user()
        job = client.submit("echo", "echo")
        assert job.state.value == "queued"
        job.cancel()
        assert client.job(job.id).state.value == "cancelled"
        cluster.start_worker("echo")
        cluster.wait_workers("echo", 1)
        done = client.submit("echo", "echo").wait(30)
        assert done.state.value == "succeeded"
        assert client.job(job.id).state.value == "cancelled"  # never ran


def test_queue_full_is_429_with_retry_after(tmp_path: Path) -> None:
    settings = {"CSML_QUEUE_CAPACITIES": '{"echo": 3}', "CSML_RETRY_AFTER_SECONDS": "7"}
    with running_cluster(tmp_path, settings) as cluster:
        client = cluster.new_user()
        for _ in range(3):
            client.submit("echo", "echo")
        r = httpx.post(
            f"{cluster.url}/v1/jobs",
            json={"app": "echo", "operation": "echo"},
            headers={"Authorization": f"Bearer {client.token}"},
        )
        assert r.status_code == 429
        assert r.headers["retry-after"] == "7"
        assert r.json()["error"]["message"].startswith("the echo queue is full (3 of 3)")
        from csml.client import QueueFull

        with pytest.raises(QueueFull) as err:
            client.submit("echo", "echo", files={"data": b"x"})
        assert err.value.retry_after == 7
        apps = {a.name: a for a in client.apps()}
        assert (apps["echo"].queue.depth, apps["echo"].queue.capacity) == (3, 3)


def test_fairness_across_identities(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as cluster:
        heavy, light = cluster.new_user(), cluster.new_user()
        heavy_jobs = [heavy.submit("echo", "echo", params={"i": i}) for i in range(30)]
        light_jobs = [light.submit("echo", "echo", params={"i": i}) for i in range(2)]
        cluster.start_worker("echo", slots=1)
        for job in heavy_jobs + light_jobs:
            job.wait(60)
        order = sorted(
            [(j.data.started_at, "heavy") for j in heavy_jobs]
            + [(j.data.started_at, "light") for j in light_jobs]
        )
        light_positions = [i for i, (_, who) in enumerate(order) if who == "light"]
        # Round-robin: the light user's jobs run among the first few, not after 30 others.
        assert light_positions == [1, 3], order[:6]


def _job_rows(data_dir: Path, job_id: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(data_dir / "csml.db") as db:
        return db.execute(
            "SELECT state, attempts, result FROM jobs WHERE id = ?", (job_id,)
        ).fetchall()


def test_kill_9_of_a_worker_mid_job_reruns_it_elsewhere_once(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as cluster:
        client = cluster.new_user()
        first = cluster.start_worker("echo")
        cluster.wait_workers("echo", 1)
        job = client.submit("echo", "echo", params={"sleep": 8, "tag": "once"})
        wait_for(lambda: job.refresh().state.value == "running")
        cluster.start_worker("echo")
        cluster.wait_workers("echo", 2)
        os.kill(first.pid, signal.SIGKILL)
        job.wait(60)
        assert job.state.value == "succeeded"
        assert job.data.attempts == 2
        assert job.result == {"params": {"sleep": 8.0, "tag": "once"}}
        rows = _job_rows(cluster.data_dir, job.id)
        assert len(rows) == 1 and rows[0][0] == "succeeded"


def test_a_job_whose_worker_is_lost_too_often_fails_with_the_reason(tmp_path: Path) -> None:
    settings = {"CSML_MAX_ATTEMPTS": "2"}
    with running_cluster(tmp_path, settings) as cluster:
        client = cluster.new_user()
        job = client.submit("echo", "echo", params={"sleep": 30})
        for _ in range(2):
            worker = cluster.start_worker("echo")
            wait_for(lambda: job.refresh().state.value == "running", timeout=30)
            os.kill(worker.pid, signal.SIGKILL)
            wait_for(lambda: job.refresh().state.value != "running", timeout=30)
        job.wait(30)
        assert job.state.value == "failed"
        assert "lost 2 times" in (job.error or "")


def test_coordinator_restart_loses_nothing(tmp_path: Path) -> None:
    with running_cluster(tmp_path, workers={"echo": 1}) as cluster:
        client = cluster.new_user()
        running = client.submit("echo", "echo", params={"sleep": 3, "kind": "running"})
        wait_for(lambda: running.refresh().state.value == "running")
        queued = [client.submit("echo", "echo", params={"i": i}) for i in range(5)]
        cluster.stop_coordinator(signal.SIGKILL)
        cluster.start_coordinator()
        ids = {j.id for j in [running, *queued]}
        assert {j.id for j in client.jobs()} == ids
        for job in [running, *queued]:
            assert job.wait(60).state.value == "succeeded", job.error
        assert running.result == {"params": {"sleep": 3.0, "kind": "running"}}
        assert running.data.attempts == 1  # the worker rode out the restart


def test_sigkill_after_a_batch_answer_keeps_its_small_inputs_and_outputs(tmp_path: Path) -> None:
    """Small inline inputs and outputs are kept in the database (`csml.store.blobs`):
    durable by the commit their 200 waited for, with no file. A SIGKILL right after the
    batch's answer, and after the outputs came back, loses none of their bytes."""
    photos = [secrets.token_bytes(3000 + i) for i in range(6)]
    with running_cluster(tmp_path, workers={"echo": 1}) as cluster:
        client = cluster.new_user()
        items = [
            {
                "spec": {"app": "echo", "operation": "echo", "params": {"i": i}},
                "inputs": {"data": base64.b64encode(photo).decode()},
            }
            for i, photo in enumerate(photos)
        ]
        r = client.request("POST", "/v1/jobs/batch", json={"items": items})
        assert r.status_code == 200 and r.json()["accepted"] == len(photos), r.text
        ids = [item["job"]["id"] for item in r.json()["items"]]
        cluster.stop_coordinator(signal.SIGKILL)  # right after the answer
        with sqlite3.connect(cluster.data_dir / "csml.db") as db:
            kept = dict(
                db.execute(
                    "SELECT j.id, f.content FROM job_files f JOIN jobs j ON j.seq = f.job_seq "
                    "WHERE f.kind = 'input' AND f.blob LIKE 'db:%'"
                ).fetchall()
            )
        assert kept == dict(zip(ids, photos, strict=True))
        assert not (cluster.data_dir / "jobs").exists() or not any(
            (cluster.data_dir / "jobs").rglob("data")
        )  # no input file anywhere
        cluster.start_coordinator()
        for job_id, photo in zip(ids, photos, strict=True):
            job = client.job(job_id).wait(60)
            assert job.state.value == "succeeded", job.error
            out = client.request("GET", f"/v1/jobs/{job_id}/outputs/data")
            assert out.status_code == 200 and out.content == photo
        cluster.stop_coordinator(signal.SIGKILL)
        cluster.start_coordinator()
        for job_id, photo in zip(ids, photos, strict=True):
            out = client.request("GET", f"/v1/jobs/{job_id}/outputs/data")
            assert out.status_code == 200 and out.content == photo
            assert out.headers["x-content-sha256"] == hashlib.sha256(photo).hexdigest()


def test_revoked_join_token_stops_its_workers(tmp_path: Path) -> None:
    with running_cluster(tmp_path, workers={"echo": 1}) as cluster:
        listing = cluster.csml("join-token", "list").stdout
        token_id = listing.split()[0]
        cluster.csml("join-token", "revoke", token_id)
        wait_for(lambda: cluster.workers[0].poll() is not None, timeout=20)
        r = httpx.post(
            f"{cluster.url}/v1/workers",
            headers={"Authorization": f"Bearer {cluster.join_token}"},
            json={},
        )
        assert r.status_code in (401, 422)
