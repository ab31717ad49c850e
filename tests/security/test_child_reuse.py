"""A sandboxed job process reused per owner: never for another owner, ended when it must.

Against a real coordinator and a real (root) echo worker with two slots: one
owner's consecutive jobs run in the same process (same pid, same uid); another
owner's job never runs in it, cannot see it, nor read the first owner's files;
a crash, a timeout, a CPU overrun or a process left behind ends the process,
and the owner's next job gets a fresh one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from csml.client import Client
from tests.cluster import Cluster, running_cluster, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="per-owner uids need a root worker")


@pytest.fixture(scope="module")
def reuse_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("reuse")
    with running_cluster(root, {"CSML_ECHO_DIAGNOSTICS": "1"}, {"echo": 2}) as c:
        yield c


@pytest.fixture(scope="module")
def alice(reuse_cluster: Cluster) -> Client:
    return reuse_cluster.new_user()


@pytest.fixture(scope="module")
def bob(reuse_cluster: Cluster) -> Client:
    return reuse_cluster.new_user()


def info(user: Client, **params: Any) -> dict[str, Any]:
    job = user.submit("echo", "sandbox_info", params=params).wait(60)
    assert job.state.value == "succeeded", job.error
    return dict(job.result or {})


def fails(user: Client, operation: str, params: dict[str, Any], **kw: Any) -> str:
    job = user.submit("echo", operation, params=params, **kw).wait(60)
    assert job.state.value == "failed", (job.state, job.result)
    return job.error or ""


def test_one_owners_consecutive_jobs_share_a_process_another_owner_never_does(
    alice: Client, bob: Client
) -> None:
    a1 = info(alice)
    b1 = info(bob)
    a2 = info(alice)
    b2 = info(bob)
    a3 = info(alice)
    assert a1["pid"] == a2["pid"] == a3["pid"]
    assert b1["pid"] == b2["pid"]
    assert a1["uid"] == a3["uid"] and b1["uid"] == b2["uid"]
    assert a1["pid"] != b1["pid"] and a1["uid"] != b1["uid"]
    assert a1["tmp"] != b1["tmp"]
    for mine, other in ((a3, b2), (b2, a3)):  # neither sees the other's process
        assert mine["visible_pids"] == [mine["pid"]]
        assert other["pid"] not in mine["visible_pids"]


def test_another_owner_cannot_read_the_files_of_a_running_job(alice: Client, bob: Client) -> None:
    secret = b"alice's input"
    running = alice.submit(
        "echo", "sandbox_info", params={"sleep": 30, "leave_file": True}, files={"data": secret}
    )
    try:
        message = wait_for(lambda: running.refresh().progress[1], timeout=30)
        where = json.loads(message)
        left = os.path.join(where["tmp"], "left-by-the-job")
        for path in (where["inputs"]["data"], left):
            job = bob.submit("echo", "read_file", params={"path": path}).wait(60)
            assert job.state.value == "succeeded", job.error
            result = dict(job.result or {})
            assert result["read"] is False and "Permission denied" in result["error"], result
        assert info(bob)["uid"] != os.stat(where["tmp"]).st_uid  # bob's process is not alice's
    finally:
        running.cancel()


@pytest.mark.parametrize(
    ("operation", "params", "limits", "reason"),
    [
        ("crash", {}, {}, "SIGSEGV"),
        ("spin", {"seconds": 30}, {"timeout_seconds": 2}, "time limit"),
        ("spin", {"seconds": 30}, {"cpu_seconds": 2, "timeout_seconds": 60}, "CPU-time limit"),
    ],
)
def test_a_process_that_failed_its_job_is_not_reused(
    alice: Client, operation: str, params: dict[str, Any], limits: dict[str, Any], reason: str
) -> None:
    same_limits: dict[str, Any] = {"limits": limits} if limits else {}

    def pid() -> int:  # a process is reused only for jobs of the same limits
        job = alice.submit("echo", "sandbox_info", params={}, **same_limits).wait(60)
        assert job.state.value == "succeeded", job.error
        return int(dict(job.result or {})["pid"])

    before = pid()
    assert pid() == before
    assert reason in fails(alice, operation, params, **same_limits)
    wait_for(lambda: not os.path.exists(f"/proc/{before}"), timeout=10)
    after = pid()
    assert after != before
    assert pid() == after


def test_a_process_that_left_one_behind_is_not_reused(alice: Client) -> None:
    first = info(alice, leave_process=True)
    wait_for(lambda: not os.path.exists(f"/proc/{first['left_pid']}"), timeout=10)
    second = info(alice)
    assert second["pid"] != first["pid"]
    third = info(alice)
    assert third["pid"] == second["pid"]  # and the fresh one is reused again


def test_a_process_working_while_idle_is_ended(alice: Client) -> None:
    """A job that answered but left a thread burning CPU: its process is retired."""
    first = info(alice, leave_thread=True)
    wait_for(lambda: not os.path.exists(f"/proc/{first['pid']}"), timeout=20)
    assert info(alice)["pid"] != first["pid"]


def test_files_of_a_previous_job_are_gone_for_the_next(alice: Client) -> None:
    first = info(alice, leave_file=True)
    second = info(alice)
    assert second["pid"] == first["pid"] and second["tmp"] == first["tmp"]
    assert not os.path.exists(os.path.join(first["tmp"], "left-by-the-job"))
