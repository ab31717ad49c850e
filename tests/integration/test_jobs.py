"""Submit → run → result → download through the SDK, against a real cluster."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import cv2
import httpx
import pytest

from csml.client import InvalidRequest, NotFound, TooLarge, Unauthorized
from tests.cluster import Cluster

# Starts a coordinator and worker processes (30-200 s under load); real OpenCV jobs.
pytestmark = pytest.mark.timeout(300)


def test_face_detection_end_to_end(cluster: Cluster, photo: Path, tmp_path: Path) -> None:
    client = cluster.new_user()
    job = client.submit("opencv", "detect_faces", files={"image": photo})
    assert job.state.value in ("queued", "running", "succeeded")
    job.wait(timeout=60)
    assert job.state.value == "succeeded", job.error
    assert job.result is not None
    assert job.result["count"] == 1
    face = job.result["faces"][0]
    assert {"x", "y", "w", "h"} <= set(face)
    out = job.download("annotated", tmp_path / "annotated.png")
    annotated = cv2.imread(str(out))
    original = cv2.imread(str(photo))
    assert annotated is not None and original is not None
    assert annotated.shape == original.shape
    assert (annotated != original).any()  # the box was drawn
    info = job.outputs["annotated"]
    assert info["size"] == out.stat().st_size and info["media_type"] == "image/png"
    assert job.data.inputs["image"].size == photo.stat().st_size


def test_a_face_free_photo_has_zero_faces(cluster: Cluster, faceless_photo: Path) -> None:
    job = cluster.new_user().submit("opencv", "detect-faces", files={"image": faceless_photo})
    assert job.wait(timeout=60).result == {"count": 0, "faces": [], "width": 600, "height": 400}


@pytest.mark.parametrize(
    ("operation", "params", "output"),
    [
        ("edges", {"threshold1": 50, "threshold2": 150}, "edges"),
        ("resize", {"width": 128}, "resized"),
        ("grayscale", {}, "gray"),
        ("blur", {"kernel_size": 7}, "blurred"),
    ],
)
def test_other_opencv_operations(
    cluster: Cluster,
    photo: Path,
    tmp_path: Path,
    operation: str,
    params: dict[str, Any],
    output: str,
) -> None:
    job = cluster.new_user().submit("opencv", operation, files={"image": photo}, params=params)
    job.wait(timeout=60)
    assert job.state.value == "succeeded", job.error
    image = cv2.imread(str(job.download(output, tmp_path)), cv2.IMREAD_UNCHANGED)
    assert image is not None and job.result is not None
    assert image.shape[1] == job.result["width"]
    if operation == "resize":
        assert image.shape[:2] == (128, 128)
    if operation in ("edges", "grayscale"):
        assert image.ndim == 2


def test_a_file_that_is_not_an_image_fails_the_job_clearly(
    cluster: Cluster, tmp_path: Path
) -> None:
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("this is not a picture")
    job = cluster.new_user().submit("opencv", "detect_faces", files={"image": bogus}).wait(60)
    assert job.state.value == "failed"
    assert "not a decodable image" in (job.error or "")


def test_echo_returns_its_params_and_copies_its_file(cluster: Cluster, tmp_path: Path) -> None:
    client = cluster.new_user()
    job = client.submit(
        "echo", "echo", params={"greeting": "hi", "n": 3}, files={"data": b"\x00\x01payload"}
    ).wait(30)
    assert job.result == {"params": {"sleep": 0.0, "greeting": "hi", "n": 3}}
    assert job.download("data", tmp_path / "d").read_bytes() == b"\x00\x01payload"


def test_jobs_list_and_id_prefixes(cluster: Cluster) -> None:
    client = cluster.new_user()
    jobs = [client.submit("echo", "echo", params={"i": i}) for i in range(3)]
    listed = [j.id for j in client.jobs()]
    assert listed == [j.id for j in reversed(jobs)]
    assert client.job(jobs[0].id[:12]).id == jobs[0].id


def test_unknown_app_and_operation_are_404(cluster: Cluster) -> None:
    client = cluster.new_user()
    with pytest.raises(NotFound, match="no application 'nope'"):
        client.submit("nope", "x")
    with pytest.raises(NotFound, match="has no operation 'nope'") as err:
        client.submit("opencv", "nope", files={"image": b"x"})
    assert err.value.field == "spec.operation"


def test_bad_params_are_422_naming_the_field(cluster: Cluster, photo: Path) -> None:
    client = cluster.new_user()
    with pytest.raises(InvalidRequest) as err:
        client.submit(
            "opencv", "detect_faces", files={"image": photo}, params={"scale_factor": 0.5}
        )
    assert err.value.status == 422 and err.value.field == "params.scale_factor"
    with pytest.raises(InvalidRequest) as err:
        client.submit("opencv", "detect_faces", files={"image": photo}, params={"colour": "red"})
    assert err.value.field == "params.colour"
    with pytest.raises(InvalidRequest) as err:
        client.submit("opencv", "blur", files={"image": photo}, params={"kernel_size": 4})
    assert err.value.field == "params.kernel_size"
    with pytest.raises(InvalidRequest, match="takes no input file 'picture'") as err:
        client.submit("opencv", "detect_faces", files={"picture": photo})
    assert err.value.field == "picture"
    with pytest.raises(InvalidRequest, match="needs the input file 'image'"):
        client.submit("opencv", "detect_faces")
    assert client.jobs() == []  # nothing was queued


def test_malformed_requests_get_json_errors(cluster: Cluster) -> None:
    client = cluster.new_user()
    headers = {"Authorization": f"Bearer {client.token}"}
    r = httpx.post(
        f"{cluster.url}/v1/jobs",
        content=b"{not json",
        headers={**headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec"
    r = httpx.post(f"{cluster.url}/v1/jobs", json={"app": "echo"}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.operation"
    r = httpx.post(
        f"{cluster.url}/v1/jobs", content=b"x", headers={**headers, "Content-Type": "text/plain"}
    )
    assert r.status_code == 415
    r = httpx.get(f"{cluster.url}/v1/jobs", params={"limit": 0}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["field"] == "limit"


def test_upload_over_the_limit_is_413_and_leaves_nothing(cluster: Cluster) -> None:
    client = cluster.new_user()
    with pytest.raises(TooLarge, match="larger than the limit"):
        client.submit("echo", "echo", files={"data": b"x" * (5 * 1024 * 1024)})
    assert client.jobs() == []
    staging = cluster.data_dir / "blobs" / "staging"
    assert list(staging.iterdir()) == []


def test_missing_or_wrong_token_is_401(cluster: Cluster) -> None:
    for headers in ({}, {"Authorization": "Bearer csml_wrong"}, {"Authorization": "Basic x"}):
        for method, path in [
            ("GET", "/v1/jobs"),
            ("POST", "/v1/jobs"),
            ("GET", "/v1/jobs/x"),
            ("DELETE", "/v1/jobs/x"),
            ("GET", "/v1/identities/me"),
        ]:
            r = httpx.request(method, f"{cluster.url}{path}", headers=headers)
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "unauthorized"
    with pytest.raises(Unauthorized):
        cluster.client("csml_wrong").jobs()


def test_another_identity_gets_404_on_every_job_route(cluster: Cluster, photo: Path) -> None:
    owner, other = cluster.new_user(), cluster.new_user()
    job = owner.submit("opencv", "detect_faces", files={"image": photo}).wait(60)
    assert job.state.value == "succeeded"
    headers = {"Authorization": f"Bearer {other.token}"}
    for ident in (job.id, job.id[:12]):
        for method, path in [
            ("GET", f"/v1/jobs/{ident}"),
            ("DELETE", f"/v1/jobs/{ident}"),
            ("GET", f"/v1/jobs/{ident}/outputs/annotated"),
            ("GET", f"/v1/jobs/{ident}?wait=1"),
        ]:
            r = httpx.request(method, f"{cluster.url}{path}", headers=headers)
            assert r.status_code == 404, (method, path)
    assert other.jobs() == []
    assert owner.job(job.id).state.value == "succeeded"  # untouched


def test_identity_ids_follow_the_container_id_rule(cluster: Cluster) -> None:
    created = cluster.client().create_identity()
    assert re.fullmatch(r"[0-9a-f]{64}", created.id) and not created.id[:12].isdigit()
    me = httpx.get(
        f"{cluster.url}/v1/identities/me", headers={"Authorization": f"Bearer {created.token}"}
    ).json()
    assert me["id"] == created.id and set(me) == {"id", "created_at"}


def test_operations_endpoints(cluster: Cluster) -> None:
    cluster.new_user().submit("echo", "echo").wait(30)  # so that job gauges have samples
    assert httpx.get(f"{cluster.url}/healthz").json()["status"] == "ok"
    spec = httpx.get(f"{cluster.url}/openapi.json").json()
    assert "/v1/jobs" in spec["paths"] and "/v1/identities" in spec["paths"]
    metrics = httpx.get(f"{cluster.url}/metrics").text
    for name in (
        "csml_jobs{",
        "csml_queue_depth{",
        "csml_workers{",
        "csml_http_request_duration_seconds_bucket",
    ):
        assert name in metrics
    apps = {a["name"]: a for a in httpx.get(f"{cluster.url}/v1/apps").json()}
    assert apps["opencv"]["workers"] == 1 and apps["opencv"]["slots"] == 2
    (sandbox,) = apps["opencv"]["sandboxes"]
    assert "process per owner" in sandbox
    if os.geteuid() == 0:
        assert "no network (netns)" in sandbox
    ops = {o["name"]: o for o in apps["opencv"]["operations"]}
    assert ops["detect_faces"]["params_schema"]["properties"]["scale_factor"]["default"] == 1.1
    assert ops["detect_faces"]["outputs"][0]["name"] == "annotated"


def test_logs_hold_no_tokens_or_client_addresses(cluster: Cluster) -> None:
    client = cluster.new_user()
    client.submit("echo", "echo").wait(30)
    logs = cluster.logs()
    assert client.token and client.token not in logs
    assert cluster.join_token not in logs
    assert "127.0.0.1:" not in logs.replace(cluster.url, "")
