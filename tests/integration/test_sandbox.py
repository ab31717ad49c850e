"""The sandbox's isolation, with real workers: what a job can and cannot do.

A job has no network, runs as a uid of its own (the workers here run as root),
with a clean environment and a private tmp dir that is removed afterwards; it
can read neither another job's files nor the worker's; what it leaves running
is killed; and an image bomb is refused before decoding.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from csml.client import Client
from csml.worker.isolation import UID_RANGE
from tests.cluster import Cluster, wait_for
from tests.integration.test_isolation import png_bomb

# Starts a coordinator and worker processes (30-200 s under load) with the sandbox.
pytestmark = pytest.mark.timeout(300)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="per-job uids need a root worker")


@pytest.fixture(scope="module")
def users(cluster: Cluster) -> tuple[Client, Client]:
    """Two identities (new ones are rate-limited across the service)."""
    return cluster.new_user(), cluster.new_user()


def run(user: Client, operation: str, params: dict[str, Any], **kw: Any) -> dict[str, Any]:
    job = user.submit("echo", operation, params=params, **kw).wait(60)
    assert job.state.value == "succeeded", job.error
    return dict(job.result or {})


def worker(cluster: Cluster, app: str) -> psutil.Process:
    for w in cluster.workers:
        cmd = psutil.Process(w.pid).cmdline() if w.poll() is None else []
        if "--app" in cmd and cmd[cmd.index("--app") + 1] == app:
            return psutil.Process(w.pid)
    raise AssertionError(f"no {app} worker")


def zygote(cluster: Cluster, app: str) -> psutil.Process:
    found = [p for p in worker(cluster, app).children() if "csml.worker.zygote" in p.cmdline()]
    assert len(found) == 1
    return found[0]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_worker_says_which_isolation_is_active(cluster: Cluster) -> None:
    logs = cluster.logs()
    assert "no network (" in logs
    if os.geteuid() == 0:
        assert "own random uid per owner" in logs


def test_a_job_cannot_open_a_network_connection(cluster: Cluster, users: Any) -> None:
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=5):
        pass  # the coordinator is reachable from here
    for host in ("127.0.0.1", "localhost"):
        result = run(users[0], "connect", {"host": host, "port": cluster.port})
        assert result["connected"] is False
        assert "Network is unreachable" in result["error"], result


@root_only
def test_a_job_runs_as_an_unprivileged_uid_of_its_owner(users: Any) -> None:
    first, second = (run(users[0], "sandbox_info", {}) for _ in range(2))
    other = run(users[1], "sandbox_info", {})
    for info in (first, second, other):
        assert info["uid"] in UID_RANGE
        assert info["euid"] == info["gid"] == info["uid"]
        assert info["groups"] == []
        assert info["no_new_privs"] == "1"
        assert int(info["cap_eff"], 16) == 0
        assert info["visible_pids"] == [info["pid"]]  # no other process, worker's included
    assert first["uid"] == second["uid"]  # one owner's process, reused
    assert other["uid"] != first["uid"]


def test_a_job_environment_holds_no_secret(cluster: Cluster, users: Any) -> None:
    info = run(users[0], "sandbox_info", {})
    env = info["env"]
    assert "CSML_JOIN_TOKEN" not in env
    assert cluster.join_token not in json.dumps(env)
    assert set(env) <= {
        *("PATH", "LANG", "HOME", "TMPDIR", "OPENCV_IO_MAX_IMAGE_PIXELS", "TZ"),
        *("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"),
    }
    assert env["PATH"] == "/usr/bin:/bin"
    assert env["HOME"] == env["TMPDIR"] == info["tmp"] == info["scratch"]
    # Nor does the zygote's (a forked job's /proc/self/environ is the zygote's first one),
    # nor the worker's own since it started (wiped, see agent.scrub_environment).
    worker_env = Path(f"/proc/{worker(cluster, 'echo').pid}/environ").read_bytes()
    assert b"CSML_DATA_DIR" in worker_env and cluster.join_token.encode() not in worker_env
    zygote_env = Path(f"/proc/{zygote(cluster, 'echo').pid}/environ").read_bytes()
    assert b"CSML_JOIN_TOKEN" not in zygote_env
    assert cluster.join_token.encode() not in zygote_env


def test_a_job_tmp_dir_is_private_emptied_after_each_job_and_removed_with_its_process(
    users: Any,
) -> None:
    info = run(users[0], "sandbox_info", {"leave_file": True})
    assert info["tmp_mode"] == "0o700"
    assert info["tmp_owner"] == info["uid"]
    assert not os.path.exists(os.path.join(info["tmp"], "left-by-the-job"))
    crashed = users[0].submit("echo", "crash").wait(60)  # ends the owner's process
    assert crashed.state.value == "failed"
    wait_for(lambda: not os.path.exists(info["tmp"]), timeout=10)


def _entries(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def test_a_job_folder_keeps_nothing_of_a_job_once_it_is_over(users: Any, tmp_path: Path) -> None:
    """Job folders are reused (emptied, not removed): once a job is over, its outputs
    are not left in the folder the next job gets, and its inputs only as root's 0400
    files, kept for its owner's next job (written over then; unlinked before another
    owner's job gets the folder: tests/integration/test_agent_kept_inputs.py)."""
    copied = users[0].submit("echo", "echo", files={"data": b"output of the first job"}).wait(60)
    assert copied.state.value == "succeeded", copied.error
    info = run(users[0], "sandbox_info", {}, files={"data": b"input of the second job"})
    inputs, outputs = os.path.dirname(info["inputs"]["data"]), info["cwd"]
    assert os.path.basename(outputs) == "outputs"
    assert os.path.dirname(inputs) == os.path.dirname(outputs)  # one job folder
    wait_for(lambda: not _entries(outputs), timeout=10)
    for name in _entries(inputs):
        st = os.stat(os.path.join(inputs, name))
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o400)
    assert copied.download("data", tmp_path).read_bytes() == b"output of the first job"


def test_what_a_job_leaves_running_is_killed(users: Any) -> None:
    info = run(users[0], "sandbox_info", {"leave_process": True})
    wait_for(lambda: not alive(info["left_pid"]), timeout=10)


@pytest.fixture
def worker_state_dir() -> Iterator[Path]:
    """Like a worker's state dir: reachable, holding a root-only key and a public file."""
    state = Path(tempfile.mkdtemp(prefix="csml-state-"))
    state.chmod(0o755)
    (state / "worker.key").write_bytes(b"private key")
    (state / "worker.key").chmod(0o600)
    (state / "public.txt").write_bytes(b"public")
    (state / "public.txt").chmod(0o644)
    yield state
    shutil.rmtree(state)


@root_only
def test_a_job_cannot_read_another_jobs_input_nor_the_workers_files(
    cluster: Cluster, users: Any, worker_state_dir: Path
) -> None:
    secret = b"the other user's confidential input"
    other = users[1].submit("echo", "sandbox_info", params={"sleep": 60}, files={"data": secret})
    try:
        message = wait_for(lambda: other.refresh().progress[1], timeout=30)
        path = json.loads(message)["inputs"]["data"]
        assert Path(path).read_bytes() == secret  # the right path, while that job runs
        denied = run(users[0], "read_file", {"path": path})
        assert denied["read"] is False and "Permission denied" in denied["error"], denied
    finally:
        other.cancel()
    key = run(users[0], "read_file", {"path": str(worker_state_dir / "worker.key")})
    assert key["read"] is False and "Permission denied" in key["error"], key
    public = run(users[0], "read_file", {"path": str(worker_state_dir / "public.txt")})
    assert public["read"] is True  # the folder itself was reachable
    for pid in (worker(cluster, "echo").pid, zygote(cluster, "echo").pid):
        environ = run(users[0], "read_file", {"path": f"/proc/{pid}/environ"})
        assert environ["read"] is False, environ


def test_a_decompression_bomb_is_refused_before_decoding(cluster: Cluster, users: Any) -> None:
    bomb = png_bomb(100_000, 100_000)
    assert len(bomb) < 1000
    processes = [worker(cluster, "opencv"), zygote(cluster, "opencv")]
    before = [p.memory_info().rss for p in processes]
    jobs = [users[0].submit("opencv", "grayscale", files={"image": bomb}) for _ in range(3)]
    for job in jobs:
        job.wait(60)
        assert job.state.value == "failed"
        assert job.error == (
            "input 'image' declares 100000 \N{MULTIPLICATION SIGN} 100000 pixels "
            "(10 gigapixels), over the limit of 256 megapixels"
        )
    after = [p.memory_info().rss for p in processes]
    assert all(a - b < 30 * 1024 * 1024 for a, b in zip(after, before, strict=True)), (
        before,
        after,
    )


def test_opencv_limits_images_it_decodes_whatever_their_format(users: Any) -> None:
    """The second guard (OPENCV_IO_MAX_IMAGE_PIXELS, set before OpenCV loads): a PAM
    file, a format the header reader does not know, declaring 600 megapixels."""
    pam = b"P7\nWIDTH 30000\nHEIGHT 20000\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n"
    job = users[0].submit("opencv", "grayscale", files={"image": pam + b"\0" * 64})
    job.wait(60)
    assert job.state.value == "failed"
    assert "CV_IO_MAX_IMAGE_PIXELS" in (job.error or ""), job.error
