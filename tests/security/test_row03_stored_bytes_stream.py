"""Row 3 (first half) of the hardening review: the stored-bytes quota counts the
bytes as they arrive, whatever `Content-Length` says or does not say.

Against a real coordinator process with a 300 kB quota: a chunked upload (no
length) of 20 MB is refused with 429 `storage_quota` while it streams, nothing
of it is kept, and the same identity can still submit what fits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.cluster import Cluster, running_cluster
from tests.security.raw_http import FORM, FolderWatch, MiB, form, send, zeros

QUOTA = 300_000
SPEC = json.dumps({"app": "echo", "operation": "echo", "params": {}}).encode()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("row03")
    with running_cluster(root, {"CSML_MAX_STORED_BYTES": str(QUOTA)}) as c:
        yield c


def test_chunked_upload_past_quota_refused_mid_stream(cluster: Cluster) -> None:
    user = cluster.new_user()
    headers = {**FORM, "Authorization": f"Bearer {user.token}"}
    staging = cluster.data_dir / "blobs" / "staging"
    body = form([("spec", [SPEC]), ("data", zeros(20 * MiB, 64 << 10))])
    with FolderWatch(staging) as seen:
        answer = send(cluster.url, "POST", "/v1/jobs", body, length=None, headers=headers)
    assert answer.status == 429, answer.body
    error = answer.json()["error"]
    assert error["code"] == "storage_quota"
    assert answer.sent < 16 * MiB, f"the coordinator read {answer.sent / MiB:.0f} MiB"
    assert seen.peak_bytes <= QUOTA + MiB, "far more than the quota was staged"
    assert user.jobs() == []
    assert list(staging.iterdir()) == []
    blobs = cluster.data_dir / "blobs" / "jobs"
    assert sum(p.stat().st_size for p in blobs.rglob("*") if p.is_file()) == 0


def test_upload_within_quota_accepted_and_counted(cluster: Cluster) -> None:
    user = cluster.new_user()
    headers = {**FORM, "Authorization": f"Bearer {user.token}"}
    body = form([("spec", [SPEC]), ("data", zeros(200_000, 64 << 10))])
    answer = send(cluster.url, "POST", "/v1/jobs", body, length=None, headers=headers)
    assert answer.status == 202, answer.body
    # 200 kB kept: another 200 kB does not fit, even though it is announced nowhere.
    body = form([("spec", [SPEC]), ("data", zeros(200_000, 64 << 10))])
    answer = send(cluster.url, "POST", "/v1/jobs", body, length=None, headers=headers)
    assert answer.status == 429, answer.body
    assert answer.json()["error"]["code"] == "storage_quota"
    assert len(user.jobs()) == 1
