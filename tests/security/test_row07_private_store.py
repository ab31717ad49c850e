"""Row 7 of issue 12: the store is private.

On a real coordinator (`csml server`) with a real echo worker running as root, a
job under its own sandbox uid tries to read the database, its write-ahead log and
another identity's uploaded file: each is refused. The data folder is 0700, the
database (with -wal and -shm) and every blob 0600, every folder below 0700, even
when the data folder was first made by an older version with wider modes.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csml.client import Client
from tests.cluster import Cluster, running_cluster, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="per-job uids need a root worker")


@pytest.fixture(scope="module")
def host() -> Iterator[Path]:
    """A folder any uid may traverse, as a home folder often is (pytest's own is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="csml-row07-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(host: Path) -> Iterator[Cluster]:
    data = host / "data"
    # An older csml made the data folder and its database with the umask's modes.
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "csml.db").touch()
    (data / "csml.db").chmod(0o644)
    (data / "blobs").mkdir()
    (data / "blobs").chmod(0o755)
    settings = {"CSML_ECHO_DIAGNOSTICS": "1"}
    with running_cluster(host, settings, {"echo": 1}) as c:
        yield c


def run(user: Client, operation: str, params: dict[str, Any], **kw: Any) -> dict[str, Any]:
    job = user.submit("echo", operation, params=params, **kw).wait(60)
    assert job.state.value == "succeeded", job.error
    return dict(job.result or {})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_job_reads_none_of_the_store(cluster: Cluster, host: Path) -> None:
    owner, attacker = cluster.new_user(), cluster.new_user()
    # Over the database's bound for small files (CSML_DB_BLOB_MAX_BYTES, 256 KiB): its
    # input and echo's output are files (a small one is in the database, checked below).
    secret = b"row07: another identity's confidential upload\n" * 6000
    theirs = owner.submit("echo", "echo", params={"note": "row07"}, files={"data": secret})
    theirs.wait(60)
    assert theirs.state.value == "succeeded", theirs.error
    found = [p for p in cluster.data_dir.rglob("*") if p.is_file() and theirs.id in str(p)]
    blobs = [p for p in found if p.read_bytes() == secret]  # its input, and echo's output
    assert len(blobs) == 2, found

    public = host / "public.txt"
    public.write_bytes(b"readable by anyone")
    public.chmod(0o644)
    reached = run(attacker, "read_file", {"path": str(public)})
    assert reached["read"] is True, reached  # the job reaches the host folder itself

    db = cluster.data_dir / "csml.db"
    wal = cluster.data_dir / "csml.db-wal"
    assert wal.exists()  # the coordinator holds the database open in WAL mode
    for target in (db, wal, cluster.data_dir / "csml.db-shm", *blobs):
        denied = run(attacker, "read_file", {"path": str(target)})
        assert denied["read"] is False, (target, denied)
        assert denied["error"].startswith("PermissionError"), (target, denied)


def test_the_store_is_owner_only(cluster: Cluster) -> None:
    user = cluster.new_user()
    # Over the database's bound for small files (256 KiB): a job folder and its files.
    data_in = b"x" * (300 << 10)
    job = user.submit("echo", "echo", params={}, files={"data": data_in}).wait(60)
    assert job.state.value == "succeeded", job.error
    data = cluster.data_dir
    assert mode(data) == 0o700
    wait_for(lambda: (data / "csml.db-wal").exists())
    for name in ("csml.db", "csml.db-wal", "csml.db-shm"):
        assert mode(data / name) == 0o600, name
    folders = files = 0
    for path in data.rglob("*"):
        if path.is_dir():
            folders += 1
            assert mode(path) == 0o700, path
        else:
            files += 1
            assert mode(path) & 0o077 == 0, (path, oct(mode(path)))
    assert folders >= 4 and files >= 5  # blobs, staging, jobs, a job's folder; db and blobs
