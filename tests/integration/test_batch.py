"""Batches end to end: `Client.map` and `csml batch` on a real cluster with real photos."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import cv2
import httpx
import pytest

from csml.client import Client
from csml.client.batch import BatchItem
from csml.schemas.workers import INLINE_MAX_BYTES
from tests.cluster import Cluster, post_counts

# The shared cluster (coordinator, echo and opencv workers) starts in the first test.
pytestmark = pytest.mark.timeout(600)


def photos(folder: Path, photo: Path, faceless: Path, n: int) -> list[Path]:
    """`n` real photos (alternating one face / none) and one file that is not an image."""
    folder.mkdir(parents=True)
    out = []
    for i in range(n):
        target = folder / f"p{i:02d}.png"
        shutil.copy(photo if i % 2 == 0 else faceless, target)
        out.append(target)
    broken = folder / "broken.png"
    broken.write_bytes(b"not an image at all")
    out.append(broken)
    return out


def test_map_runs_every_item_and_reports_the_failing_one(
    cluster: Cluster, photo: Path, faceless_photo: Path, tmp_path: Path
) -> None:
    files = photos(tmp_path / "in", photo, faceless_photo, 6)
    seen: list[BatchItem] = []
    with cluster.new_user() as c:
        batch = c.map("opencv", "detect_faces", files, concurrency=3, on_done=seen.append)
        assert [i.source for i in batch.items] == [str(f) for f in files]
        assert sorted(i.index for i in seen) == list(range(len(files)))
        counts = [i.job.result["count"] for i in batch.items[:6] if i.job and i.job.result]
        assert counts == [1, 0, 1, 0, 1, 0]
        assert len(batch.succeeded) == 6 and len(batch.failed) == 1
        bad = batch.failed[0]
        assert bad.source.endswith("broken.png") and bad.state in ("failed", "refused")
        assert bad.error and "image" in bad.error.lower()
        manifest = batch.write_manifest(tmp_path / "manifest.jsonl")
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(7))
    assert lines[0]["state"] == "succeeded" and lines[0]["result"]["count"] == 1
    assert lines[6]["state"] != "succeeded" and lines[6]["error"]


def test_cli_batch_from_a_zip_and_a_folder(
    cluster: Cluster, photo: Path, faceless_photo: Path, tmp_path: Path
) -> None:
    env = {**cluster.env, "CSML_CONFIG": str(tmp_path / "cfg" / "config.toml")}
    cluster.csml("id", "new", "--url", cluster.url, env=env)
    files = photos(tmp_path / "in", photo, faceless_photo, 4)
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(files[0], "nested/one.png")
        zf.write(files[1], "../../escape.png")  # a hostile member name stays inside out/
    out = tmp_path / "out"

    r = cluster.csml(
        "batch", "opencv", "detect-faces", str(archive), "-o", str(out), env=env, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 of 2 items succeeded" in r.stdout
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [line["state"] for line in lines] == ["succeeded", "succeeded"]
    for line in lines:
        for saved in line["outputs"].values():
            assert Path(saved).resolve().is_relative_to(out.resolve())
            assert cv2.imread(saved) is not None
    assert not (tmp_path / "escape.png").exists()

    r = cluster.csml(
        "batch", "opencv", "detect-faces", str(tmp_path / "in"), "-o", str(out / "f"),
        env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 1  # one item failed: reported, the others kept
    assert "4 of 5 items succeeded" in r.stdout and "1 failed" in r.stdout
    assert "broken.png" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    kept = sorted(p.name for p in (out / "f").iterdir() if p.is_dir())
    assert kept == ["p00", "p01", "p02", "p03"]


def test_cli_batch_sends_40_small_files_in_one_request(cluster: Cluster, tmp_path: Path) -> None:
    """`csml batch` keeps 64 items in flight by default, so 40 small files go in one batch
    request (at 32 they took two: fewer requests and write commits per photo)."""
    env = {**cluster.env, "CSML_CONFIG": str(tmp_path / "cfg" / "config.toml")}
    cluster.csml("id", "new", "--url", cluster.url, env=env)
    folder = tmp_path / "small"
    folder.mkdir()
    for i in range(40):
        (folder / f"f{i:02d}.txt").write_bytes(f"small input {i}\n".encode())
    before = post_counts(cluster.url)
    r = cluster.csml(
        "batch", "echo", "echo", str(folder), "-o", str(tmp_path / "out"), env=env, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "40 of 40 items succeeded" in r.stdout
    after = post_counts(cluster.url)
    sent = {route: after.get(route, 0.0) - before.get(route, 0.0) for route in after}
    assert sent["/v1/jobs/batch"] == 1, sent
    assert sent.get("/v1/jobs", 0.0) == 0, sent


class _Counting(httpx.HTTPTransport):
    """Counts the items of each batch request and the single submissions a client sends."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.singles = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/jobs/batch":
            self.batches.append(len(json.loads(request.content)["items"]))
        elif request.method == "POST" and request.url.path == "/v1/jobs":
            self.singles += 1
        return super().handle_request(request)


def test_map_over_many_small_files_goes_through_the_batch_route(
    cluster: Cluster, tmp_path: Path
) -> None:
    """50 small files go in one batch request (no single submission), and every result
    comes back. Counted on the client and, the same, in the coordinator's metrics. (50:
    under this cluster's submission rate limit, 60 a minute per identity, which counts
    every item of a batch as a submission.)"""
    folder = tmp_path / "small"
    folder.mkdir()
    files = []
    for i in range(50):
        path = folder / f"f{i:03d}.txt"
        path.write_bytes(f"small input {i}\n".encode())
        files.append(path)
    counting = _Counting()
    token = cluster.new_user().token
    before = post_counts(cluster.url)
    with Client(cluster.url, token, transport=counting) as c:
        batch = c.map("echo", "echo", files, concurrency=100, timeout=300, params={"tag": "b"})
        assert [i.state for i in batch.items] == ["succeeded"] * 50, batch.failed[:3]
        first = batch.items[0].job
        assert first is not None and first.result == {"params": {"sleep": 0.0, "tag": "b"}}
        assert b"".join(first.iter_output("data")) == b"small input 0\n"
        assert [i.job.data.inputs["data"].size for i in batch.items if i.job] == [
            f.stat().st_size for f in files
        ]
    after = post_counts(cluster.url)
    sent = {route: after.get(route, 0.0) - before.get(route, 0.0) for route in after}
    assert counting.singles == 0 and sent.get("/v1/jobs", 0.0) == 0, sent
    assert sent["/v1/jobs/batch"] == len(counting.batches)
    assert counting.batches == [50]


def test_map_with_inline_outputs_downloads_them_without_a_request(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Asked for (as `csml batch` does), each item's small outputs come with its result
    on the result stream: saving them costs no `GET …/outputs/…`, and the bytes are the
    outputs' (checked against the views' sha256 before they are written)."""
    folder = tmp_path / "small"
    folder.mkdir()
    files = []
    for i in range(20):
        path = folder / f"f{i:03d}.txt"
        path.write_bytes(f"inline input {i}\n".encode())
        files.append(path)
    downloads: list[str] = []

    class Downloads(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if "/outputs/" in request.url.path:
                downloads.append(request.url.path)
            return super().handle_request(request)

    saved: dict[int, bytes] = {}

    def save(item: BatchItem) -> None:
        if item.ok and item.job is not None:
            target = item.job.download("data", tmp_path / f"out{item.index}")
            saved[item.index] = target.read_bytes()

    with Client(cluster.url, cluster.new_user().token, transport=Downloads()) as c:
        batch = c.map(
            "echo", "echo", files, concurrency=8, timeout=300, on_done=save,
            inline_outputs=INLINE_MAX_BYTES,
        )  # fmt: skip
    assert [i.state for i in batch.items] == ["succeeded"] * 20, batch.failed[:3]
    assert saved == {i: f.read_bytes() for i, f in enumerate(files)}
    # Every item's result came on the stream, its output with it; one that ended while
    # the stream reconnected (about every 20 s) would be downloaded: a few at most.
    assert len(downloads) <= 2, downloads
