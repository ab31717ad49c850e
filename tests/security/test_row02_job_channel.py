"""Row 2 of the hardening review: a job cannot run code in its worker through its channel.

Against a real coordinator and a real (root) echo worker: a job (echo's
`write_channel` diagnostic) writes into the channel to its worker a crafted
pickle whose unpickling would create a file, or an oversized message. The job
fails as a protocol violation, no file appears, and the same worker process
serves the next job.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from csml.client import Client, WaitTimeout
from tests.cluster import Cluster, running_cluster


@pytest.fixture(scope="module")
def echo_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("row02")
    with running_cluster(root, {"CSML_ECHO_DIAGNOSTICS": "1"}, {"echo": 1}) as c:
        yield c


@pytest.fixture(scope="module")
def user(echo_cluster: Cluster) -> Client:
    return echo_cluster.new_user()


class _CreatesFile:
    """Unpickling this opens (creates) `path` in whichever process unpickles it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def crafted_pickle(path: Path) -> bytes:
    """As `multiprocessing.connection` frames it: a 4-byte length, then the pickle."""
    body = pickle.dumps(("progress", _CreatesFile(path), "x"))
    return struct.pack("!i", len(body)) + body


def oversized_header() -> bytes:
    """A header announcing a 100 MiB message, and a little of it."""
    return struct.pack(">IB", 100 << 20, 1) + b"{" * 1000


def oversized_progress() -> bytes:
    """A well-formed progress frame, far over the size of a progress message."""
    body = json.dumps({"fraction": 0.5, "message": "x" * 40_000}).encode()  # < params cap
    return struct.pack(">IB", len(body), 1) + body


def worker_pid(cluster: Cluster) -> int:
    (proc,) = [w for w in cluster.workers if w.poll() is None]
    return proc.pid


def run_echo(user: Client) -> None:
    job = user.submit("echo", "echo", params={"hello": "after"}).wait(60)
    assert job.state.value == "succeeded", job.error
    assert job.result == {"params": {"sleep": 0.0, "hello": "after"}}


@pytest.mark.parametrize("attack", ["pickle", "oversized_header", "oversized_progress"])
def test_job_writing_outside_the_protocol_fails_and_the_worker_goes_on(
    echo_cluster: Cluster, user: Client, tmp_path: Path, attack: str
) -> None:
    marker = tmp_path / "created-by-unpickling"
    data = {
        "pickle": lambda: crafted_pickle(marker),
        "oversized_header": oversized_header,
        "oversized_progress": oversized_progress,
    }[attack]()
    pid = worker_pid(echo_cluster)
    job = user.submit(
        "echo",
        "write_channel",
        params={"data": base64.b64encode(data).decode()},
        limits={"timeout_seconds": 20},
    )
    try:
        final = job.wait(45)
    except WaitTimeout:
        final = job
    assert not marker.exists(), "the worker unpickled what the job sent"
    assert final.state.value == "failed", (final.state, final.error)
    assert final.error is not None and "protocol violation" in final.error, final.error
    assert os.path.basename(str(marker)) not in final.error
    assert psutil.pid_exists(pid) and worker_pid(echo_cluster) == pid
    run_echo(user)  # the same worker serves the next job


def test_the_worker_no_longer_holds_its_join_token_in_its_environment(
    echo_cluster: Cluster, user: Client
) -> None:
    """What a process with the worker's uid could read of it: /proc/PID/environ."""
    run_echo(user)  # registered and serving
    environ = Path(f"/proc/{worker_pid(echo_cluster)}/environ").read_bytes()
    assert b"CSML_COORDINATOR" in environ or b"CSML_DATA_DIR" in environ  # it is readable
    assert echo_cluster.join_token.encode() not in environ
