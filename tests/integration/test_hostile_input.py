"""Path traversal and shell metacharacters in every string field and file name do nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.cluster import Cluster

# Starts a coordinator and worker processes (30-200 s under load).
pytestmark = pytest.mark.timeout(300)

HOSTILE = [
    "../../../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "/etc/shadow",
    "a; rm -rf / #",
    "$(touch /tmp/csml-pwned)",
    "`touch /tmp/csml-pwned`",
    "| cat /etc/passwd",
    "name\x00.png",
    "C:\\Windows\\system32",
    "' OR 1=1 --",
]


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_strings_in_params_names_and_paths(cluster: Cluster, tmp_path: Path) -> None:
    client = cluster.new_user()
    headers = {"Authorization": f"Bearer {client.token}"}
    outside_before = _snapshot(tmp_path) | {p for p in os.listdir("/tmp") if "pwned" in p}

    # In params: echoed back verbatim, never interpreted.
    job = client.submit("echo", "echo", params={"s": HOSTILE}).wait(30)
    assert job.result == {"params": {"sleep": 0.0, "s": HOSTILE}}

    for evil in HOSTILE:
        # As an uploaded file's name (the client-side filename is never used as a path).
        files: dict[str, Any] = {
            "spec": (None, json.dumps({"app": "echo", "operation": "echo"}), "application/json"),
            "data": (evil, b"payload", "application/octet-stream"),
        }
        r = httpx.post(f"{cluster.url}/v1/jobs", files=files, headers=headers)
        assert r.status_code == 202, r.text
        # As a form-part (input) name.
        files = {
            "spec": (None, json.dumps({"app": "echo", "operation": "echo"}), "application/json"),
            evil: ("x", b"payload", "application/octet-stream"),
        }
        r = httpx.post(f"{cluster.url}/v1/jobs", files=files, headers=headers)
        assert r.status_code == 422, (evil, r.text)
        # As app, operation and media type.
        for spec in ({"app": evil, "operation": "echo"}, {"app": "echo", "operation": evil}):
            r = httpx.post(f"{cluster.url}/v1/jobs", json=spec, headers=headers)
            assert r.status_code in (404, 422), (spec, r.text)
        # As ids and output names in paths.
        for path in (
            f"/v1/jobs/{quote(evil, safe='')}",
            f"/v1/jobs/{quote(evil, safe='/')}",
            f"/v1/jobs/{job.id}/outputs/{quote(evil, safe='')}",
            f"/v1/jobs/{job.id}/outputs/{quote(evil, safe='/')}",
        ):
            r = httpx.get(f"{cluster.url}{path}", headers=headers)
            assert r.status_code in (404, 405, 422), (path, r.status_code)
            assert b"root:" not in r.content

    r = httpx.post(
        f"{cluster.url}/v1/jobs",
        files={
            "spec": (None, json.dumps({"app": "echo", "operation": "echo"}), "application/json"),
            "data": ("x", b"payload", "text/plain; $(reboot)"),
        },
        headers=headers,
    )
    assert r.status_code == 202 and r.json()["inputs"]["data"]["media_type"] == "text/plain"

    assert not [p for p in os.listdir("/tmp") if "pwned" in p]
    assert _snapshot(tmp_path) | {p for p in os.listdir("/tmp") if "pwned" in p} == outside_before
    # Every stored file is inside the data directory, under a job folder or staging.
    for stored in (cluster.data_dir / "blobs").rglob("*"):
        assert stored.resolve().is_relative_to(cluster.data_dir.resolve())
