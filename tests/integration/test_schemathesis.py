"""Property-based requests generated from our own OpenAPI schema: never a 5xx."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from csml.apps.registry import load_app
from tests.cluster import running_cluster

# Fuzzes every route of a running cluster (waits of up to 900 s).
pytestmark = pytest.mark.timeout(1200)

ST = Path(sys.executable).parent / "st"
ROOT = Path(__file__).resolve().parents[2]
# Oversized and deeply nested bodies besides the generated ones (see the module).
HOOKS = {
    "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


def run_schemathesis(url: str, token: str, report: Path, *extra: str) -> collections.Counter[int]:
    """Run `st run` and count the HTTP status of every request it made."""
    subprocess.run(
        [
            str(ST),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "-n",
            "60",
            "--seed",
            "20261126",
            "--no-shrink",
            "--workers",
            "2",
            "--no-color",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(report),
            "-H",
            f"Authorization: Bearer {token}",
            "--request-timeout",
            "30",
            *extra,
        ],
        env={**os.environ, **HOOKS},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,  # the verdict is ours: counted from the report below
    )
    statuses: collections.Counter[int] = collections.Counter()
    for line in report.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        for interaction in finished["recorder"].get("interactions", {}).values():
            response = interaction.get("response") or {}
            statuses[response.get("status_code", 0)] += 1
    return statuses


def test_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    assert shutil.which(str(ST)), "schemathesis is not installed"
    with running_cluster(tmp_path / "c", workers={"echo": 1}) as cluster:
        user = cluster.new_user()
        as_user = run_schemathesis(
            cluster.url,
            user.token or "",
            tmp_path / "user.ndjson",
            "--exclude-path-regex",
            # The job event stream stays open ~20 s per call; tests/e2e/web covers it.
            "^/v1/workers|^/v1/jobs/events$",
        )
        worker = httpx.post(
            f"{cluster.url}/v1/workers",
            headers={"Authorization": f"Bearer {cluster.join_token}"},
            json={"app": load_app("echo").manifest().model_dump(mode="json"), "slots": 1},
        ).json()
        as_worker = run_schemathesis(
            cluster.url,
            worker["worker_token"],
            tmp_path / "worker.ndjson",
            "--include-path-regex",
            "^/v1/workers/",
        )
        total = as_user + as_worker
        print(f"schemathesis requests by status: {dict(sorted(total.items()))}")
        assert sum(total.values()) >= 1000
        assert total[413] > 0, "no oversized body was sent (or none was refused as such)"
        assert not {s: n for s, n in total.items() if s >= 500 or s == 0}
        assert httpx.get(f"{cluster.url}/healthz").status_code == 200
