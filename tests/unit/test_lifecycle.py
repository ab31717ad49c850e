"""A job's life through the HTTP API: submit, claim, heartbeat with progress, complete,
fetch the result and outputs; cancel (queued and running); failure."""

from __future__ import annotations

from pathlib import Path

from tests.unit.inproc import HttpWorker, InProcessCoordinator, error_of


def submit(coordinator: InProcessCoordinator, token: str, **params: object) -> str:
    r = coordinator.http.post(
        "/v1/jobs",
        json={"app": "echo", "operation": "echo", "params": params},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def get(coordinator: InProcessCoordinator, token: str, job_id: str) -> dict[str, object]:
    r = coordinator.http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    job: dict[str, object] = r.json()
    return job


def test_submit_claim_heartbeat_complete_result(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    assert user.token
    job_id = submit(coordinator, user.token, word="hello")
    queued = get(coordinator, user.token, job_id)
    assert queued["state"] == "queued" and queued["app"] == "echo"

    [claimed] = echo_worker.claim(4)
    assert claimed.id == job_id and claimed.attempt == 1
    assert claimed.params == {"word": "hello"}
    assert echo_worker.claim(4) == []  # nothing else queued
    assert get(coordinator, user.token, job_id)["state"] == "running"

    assert echo_worker.heartbeat(claimed, fraction=0.5).abort == []
    running = get(coordinator, user.token, job_id)
    assert running["progress"] == {"fraction": 0.5, "message": "50% done"}

    r = echo_worker.complete(claimed, result={"echoed": "hello"})
    assert r.status_code == 204, r.text
    done = get(coordinator, user.token, job_id)
    assert done["state"] == "succeeded"
    assert done["result"] == {"echoed": "hello"}
    assert done["progress"] == {"fraction": 1.0, "message": "50% done"}
    # A finished job's heartbeat tells its worker to stop; a second completion is refused.
    assert echo_worker.heartbeat(claimed).abort == [job_id]
    again = echo_worker.complete(claimed, result={"echoed": "twice"})
    assert again.status_code == 409 and error_of(again)["code"] == "lease_lost"
    assert get(coordinator, user.token, job_id)["result"] == {"echoed": "hello"}


def test_files_travel_from_the_user_to_the_app_and_back(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    """The SDK uploads a file; the worker downloads it, runs the real echo operation
    (csml.apps.testing) and uploads its output; the SDK downloads the output."""
    user = coordinator.new_user()
    job = user.submit("echo", "echo", files={"data": b"some bytes"}, params={"tag": 7})
    [claimed] = echo_worker.claim()
    assert [f.name for f in claimed.inputs] == ["data"]
    assert echo_worker.run(claimed, tmp_path).status_code == 204
    job.wait(timeout=10)
    assert job.state.value == "succeeded"
    assert job.result == {"params": {"sleep": 0.0, "tag": 7}}
    assert job.download("data", tmp_path / "back").read_bytes() == b"some bytes"


def test_a_stranger_cannot_see_a_job(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    owner, stranger = coordinator.new_user(), coordinator.new_user()
    assert owner.token and stranger.token
    job_id = submit(coordinator, owner.token)
    r = coordinator.http.get(
        f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {stranger.token}"}
    )
    assert r.status_code == 404
    assert stranger.jobs() == []


def test_cancel_a_queued_job(coordinator: InProcessCoordinator, echo_worker: HttpWorker) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo")
    assert job.cancel().state.value == "cancelled"
    assert echo_worker.claim() == []  # a cancelled job is never handed out
    again = coordinator.http.delete(
        f"/v1/jobs/{job.id}", headers={"Authorization": f"Bearer {user.token}"}
    )
    assert again.status_code == 409 and error_of(again)["code"] == "already_finished"


def test_cancel_a_running_job_aborts_it_on_its_worker(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo")
    [claimed] = echo_worker.claim()
    assert job.cancel().state.value == "cancelled"
    assert echo_worker.heartbeat(claimed).abort == [job.id]
    late = echo_worker.complete(claimed, result={"too": "late"})
    assert late.status_code == 409 and error_of(late)["code"] == "lease_lost"
    job.refresh()
    assert job.state.value == "cancelled" and job.result is None


def test_a_failing_job_keeps_its_error(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    job = user.submit("echo", "echo")
    [claimed] = echo_worker.claim()
    r = echo_worker.complete(claimed, "failed", error="ValueError: the input is not an image")
    assert r.status_code == 204
    job.wait(timeout=10)
    assert job.state.value == "failed"
    assert job.error == "ValueError: the input is not an image"
    assert job.result is None
    # The worker is fine: it takes the next job.
    user.submit("echo", "echo")
    assert len(echo_worker.claim()) == 1


def test_an_operation_that_raises_fails_its_job_only(
    coordinator: InProcessCoordinator, tmp_path: Path
) -> None:
    """The real OpenCV operation refuses a file that is no image: the worker reports the
    app's error as the job's, and takes the next job."""
    from csml.apps.opencv import app as opencv_app

    worker = coordinator.worker(opencv_app)
    user = coordinator.new_user()
    job = user.submit("opencv", "detect_faces", files={"image": b"plain text, not a photo"})
    [claimed] = worker.claim()
    assert worker.run(claimed, tmp_path).status_code == 204
    job.wait(timeout=10)
    assert job.state.value == "failed" and job.result is None
    assert (job.error or "").startswith("JobError: input 'image' is not a decodable image")
    user.submit("opencv", "detect_faces", files={"image": b"next"})
    assert len(worker.claim()) == 1


def test_a_worker_gets_only_jobs_of_its_app(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    from csml.apps.opencv import app as opencv_app

    user = coordinator.new_user()
    photo_job = user.submit("opencv", "detect_faces", files={"image": b"not read here"})
    assert echo_worker.claim(8) == []
    echo_job = user.submit("echo", "echo")
    assert echo_worker.claim_ids(8) == [echo_job.id]
    assert coordinator.worker(opencv_app).claim_ids(8) == [photo_job.id]
