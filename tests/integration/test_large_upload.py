"""A 500 MB upload streams through the coordinator without growing its memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.cluster import running_cluster

# Writes and streams 500 MB through a cluster.
pytestmark = pytest.mark.timeout(600)

MB = 1024 * 1024


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_500_mb_upload_keeps_coordinator_under_200_mb(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    digest = hashlib.sha256()
    block = bytes(range(256)) * (4 * MB // 256)
    with open(big, "wb") as f:
        for i in range(125):
            chunk = block[:-1] + bytes([i])
            f.write(chunk)
            digest.update(chunk)
    assert big.stat().st_size == 500 * MB
    with running_cluster(tmp_path / "c", {"CSML_MAX_UPLOAD_BYTES": str(600 * MB)}) as cluster:
        assert cluster.coordinator is not None
        before = peak_rss_mb(cluster.coordinator.pid)
        client = cluster.new_user()
        job = client.submit("echo", "echo", files={"data": big})
        peak = peak_rss_mb(cluster.coordinator.pid)
        print(f"coordinator peak RSS: {before:.0f} MB before, {peak:.0f} MB after a 500 MB upload")
        assert peak < 200
        stored = job.data.inputs["data"]
        assert stored.size == 500 * MB and stored.sha256 == digest.hexdigest()
