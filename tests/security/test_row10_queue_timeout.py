"""Issue 12, row 10: no job waits forever.

Against a real coordinator: a job for an app with no live worker fails after the
queue timeout (CSML_QUEUE_TIMEOUT_SECONDS) with a message saying why; a
confidential job fails at once ("resubmit") when the last worker it was sealed to
leaves, or when that worker stops answering and expires. Before the fix all three
stayed `queued`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csml.client import Client
from tests.cluster import Cluster, running_cluster, wait_for
from tests.security.workers import HttpWorker

SETTINGS = {"CSML_QUEUE_TIMEOUT_SECONDS": "3", "CSML_WORKER_LIVE_SECONDS": "3"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("row10"), SETTINGS) as cluster:
        yield cluster


def final(client: Client, job_id: str) -> tuple[str, str]:
    job = client.job(job_id).wait(60)
    return job.state.value, job.data.error or ""


def test_a_job_for_an_app_without_live_workers_fails_after_the_queue_timeout(
    cluster: Cluster,
) -> None:
    client = cluster.new_user()
    job = client.submit("opencv", "detect_faces", files={"image": b"not used"})
    assert client.job(job.id).state.value == "queued"
    state, error = final(client, job.id)
    assert state == "failed"
    assert "no opencv worker was live" in error and "queue timeout" in error, error


def test_a_confidential_job_fails_at_once_when_its_last_recipient_leaves(
    cluster: Cluster,
) -> None:
    client = cluster.new_user()
    recipient = HttpWorker.join(cluster.url, cluster.join_token, "echo", with_key=True)
    try:
        job = client.submit(
            "echo", "echo", params={"n": 1}, confidential=True, allow_unattested=True
        )
        assert [r.worker.worker_id for r in job.recipients] == [recipient.id]
        assert client.job(job.id).state.value == "queued"
    finally:
        assert recipient.leave().status_code == 204
    # At once: the leave itself fails the job (well before any queue timeout).
    got = client.job(job.id)
    assert got.state.value == "failed", got.state
    assert "resubmit" in (got.data.error or "") and "left" in (got.data.error or "")


def test_a_confidential_job_fails_when_its_last_recipient_expires(cluster: Cluster) -> None:
    client = cluster.new_user()
    recipient = HttpWorker.join(cluster.url, cluster.join_token, "echo", with_key=True)
    job = client.submit("echo", "echo", params={"n": 1}, confidential=True, allow_unattested=True)
    assert client.job(job.id).state.value == "queued"
    # The worker stops heartbeating (as if killed); the reaper sees it expire.
    wait_for(lambda: client.job(job.id).state.value != "queued", timeout=60)
    state, error = final(client, job.id)
    assert state == "failed" and "resubmit" in error, error
    assert recipient.heartbeat().status_code == 200  # it was never told to leave


def test_a_job_with_a_live_worker_is_not_timed_out(tmp_path: Path) -> None:
    with running_cluster(tmp_path, SETTINGS, workers={"echo": 1}) as cluster:
        client = cluster.new_user()
        busy = client.submit("echo", "echo", params={"sleep": 6})
        wait_for(lambda: client.job(busy.id).state.value == "running")
        waiting = client.submit("echo", "echo", params={"n": 2})
        assert final(client, busy.id)[0] == "succeeded"
        assert final(client, waiting.id)[0] == "succeeded"
