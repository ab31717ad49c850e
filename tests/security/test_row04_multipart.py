"""Row 4 of the hardening review: multipart parts are checked as they arrive.

Against a real coordinator process: a part whose name is not an input of the
operation is refused at its headers (nothing of it reaches the staging folder,
the rest is never read); 3,000 one-byte parts make no pile of files; a file
before the spec is refused; and staging folders left behind are swept when the
coordinator starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, running_cluster
from tests.security.raw_http import FORM, FolderWatch, MiB, form, send, zeros

SPEC = json.dumps({"app": "echo", "operation": "echo", "params": {}}).encode()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("row04")) as c:
        yield c


def staging(cluster: Cluster) -> Path:
    return cluster.data_dir / "blobs" / "staging"


def test_unknown_part_refused_before_it_is_stored(cluster: Cluster) -> None:
    user = cluster.new_user()
    headers = {**FORM, "Authorization": f"Bearer {user.token}"}
    body = form([("spec", [SPEC]), *[(f"extra{i}", zeros(200 * MiB)) for i in range(3)]])
    with FolderWatch(staging(cluster)) as seen:
        answer = send(cluster.url, "POST", "/v1/jobs", body, length=None, headers=headers)
    assert answer.status == 422, answer.body
    error = answer.json()["error"]
    assert error["code"] == "unknown_input"
    assert error["field"] == "extra0" and "it takes: data" in error["message"]
    assert answer.headers.get("connection") == "close"
    assert answer.sent < 100 * MiB, f"the coordinator read {answer.sent / MiB:.0f} MiB"
    assert seen.peak_bytes == 0, f"{seen.peak_bytes} bytes of a refused part were stored"
    assert seen.peak_files == 0
    assert user.jobs() == []


def test_3000_parts_make_no_files(cluster: Cluster) -> None:
    user = cluster.new_user()
    headers = {**FORM, "Authorization": f"Bearer {user.token}"}
    parts = [("spec", [SPEC]), *[(f"p{i}", [b"x"]) for i in range(3000)]]
    with FolderWatch(staging(cluster)) as seen:
        answer = send(cluster.url, "POST", "/v1/jobs", form(parts), length=None, headers=headers)
    assert answer.status in (413, 422), answer.body
    assert seen.peak_files == 0, f"{seen.peak_files} part files were made"
    # The same parts under the one name the operation takes: refused at the second.
    parts = [("spec", [SPEC]), *[("data", [b"x"]) for _ in range(3000)]]
    with FolderWatch(staging(cluster)) as seen:
        answer = send(cluster.url, "POST", "/v1/jobs", form(parts), length=None, headers=headers)
    assert answer.status in (413, 422), answer.body
    assert answer.json()["error"]["code"] in ("duplicate_input", "too_many_parts")
    assert seen.peak_files <= 1
    assert user.jobs() == []


def test_file_before_spec_refused(cluster: Cluster) -> None:
    user = cluster.new_user()
    headers = {**FORM, "Authorization": f"Bearer {user.token}"}
    body = form([("data", zeros(50 * MiB)), ("spec", [SPEC])])
    with FolderWatch(staging(cluster)) as seen:
        answer = send(cluster.url, "POST", "/v1/jobs", body, length=None, headers=headers)
    assert answer.status == 422, answer.body
    assert answer.json()["error"]["code"] == "spec_not_first"
    assert seen.peak_bytes == 0


def test_known_part_still_accepted(cluster: Cluster) -> None:
    user = cluster.new_user()
    headers = {**FORM, "Authorization": f"Bearer {user.token}"}
    body = form([("spec", [SPEC]), ("data", zeros(3 * MiB))])
    answer = send(cluster.url, "POST", "/v1/jobs", body, length=None, headers=headers)
    assert answer.status == 202, answer.body
    assert list(answer.json()["inputs"]) == ["data"]
    assert answer.json()["inputs"]["data"]["size"] == 3 * MiB


def test_staging_swept_at_start(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "c") as cluster:
        cluster.stop_coordinator()
        left = staging(cluster) / "0123456789abcdef0123456789abcdef"
        left.mkdir()
        (left / "image").write_bytes(bytes(MiB))
        (staging(cluster) / "stray-file").write_bytes(b"x")
        cluster.start_coordinator()
        assert list(staging(cluster).iterdir()) == []
