"""A contributed worker for real: identity A makes a contributed join token, a worker
process started with the command the coordinator gave (the token on its standard input)
runs identity B's job with B's file; A revokes it and B's next job waits for another
worker. A's worker refuses to serve an app its token is not bound to."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from csml.schemas import JobState
from tests.cluster import Cluster, running_cluster, wait_for

pytestmark = pytest.mark.timeout(300)


def start(cluster: Cluster, command: list[str], token: str, name: str) -> subprocess.Popen[bytes]:
    """`command` as printed, with this interpreter's csml; the token on stdin."""
    assert command[:2] == ["csml", "worker"]
    log = open(cluster.log_dir / f"{name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "csml", *command[1:]],
        env={k: v for k, v in cluster.env.items() if not k.startswith("CSML_JOIN_TOKEN")},
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    cluster.workers.append(proc)
    assert proc.stdin is not None
    proc.stdin.write(token.encode())
    proc.stdin.close()
    return proc


def test_a_contributed_worker_runs_another_identitys_job_until_revoked(
    tmp_path: Path,
) -> None:
    # Verification off for echo (policy none, no probation): this test is about who may
    # run what; tests/integration/test_verification.py checks results of contributed runs.
    settings = {"CSML_CONTRIBUTIONS": "true", "CSML_VERIFY_PROBATION": "0"}
    with running_cluster(tmp_path, settings) as cluster:
        cluster.csml("operator", "contributions", "policy", "echo", "none")
        alice, bob = cluster.new_user(), cluster.new_user()
        made = alice.contribute("echo", label="integration")
        assert made.worker_command[2:4] == ["--coordinator", cluster.url]
        worker = start(cluster, made.worker_command, made.token, "contributed-echo")
        cluster.wait_workers("echo", 1)

        job = bob.submit("echo", "echo", params={"n": 7}, files={"data": b"bob's bytes"})
        done = job.wait(60)
        assert done.state == JobState.succeeded, cluster.logs()
        assert done.result == {"params": {"sleep": 0.0, "n": 7}}
        assert done.download("data", tmp_path / "out").read_bytes() == b"bob's bytes"
        [mine] = alice.contributions()
        assert len(mine.workers) == 1 and mine.workers[0].stopped_at is None

        alice.revoke_contribution(mine.id)
        # A claim already long-polling when the token was revoked was authenticated before
        # it (api_workers.claim checks once per request): let it end (CSML_CLAIM_WAIT 1 s).
        time.sleep(2)
        later = bob.submit("echo", "echo", params={"n": 8})
        time.sleep(3)  # several claim rounds of the revoked worker
        assert later.refresh().state == JobState.queued
        # Refused from its next call, the worker gives up.
        wait_for(lambda: worker.poll() is not None, timeout=60)
        assert alice.contributions()[0].revoked_at is not None

        # A contributed token serves only its app: a worker of another app is refused.
        other = alice.contribute("echo")
        command = [*other.worker_command]
        command[command.index("--app") + 1] = "opencv"
        refused = start(cluster, command, other.token, "contributed-wrong-app")
        assert refused.wait(60) != 0
        log = (cluster.log_dir / "contributed-wrong-app.log").read_text(errors="replace")
        assert "may serve only echo" in log
