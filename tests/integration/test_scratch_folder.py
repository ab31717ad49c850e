"""A worker's scratch folders (`worker/scratch_folder.py`): the folders of a worker killed
with SIGKILL are removed by the next one; a live worker's, and anything not made by a
`ScratchFolder`, are left alone. The workers here are real processes, killed for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from csml.worker.scratch_folder import LOCK_NAME, ScratchFolder, sweep

PREFIX = "csml-test-scratch-"

HOLDER = """
import sys, time
from pathlib import Path
from csml.worker.scratch_folder import ScratchFolder
folder = ScratchFolder(sys.argv[1], Path(sys.argv[2]))
(folder.path / "job-1").mkdir()
(folder.path / "job-1" / "input").write_bytes(b"a job's file")
print(folder.path, flush=True)
time.sleep(600)
"""


def start_holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process that makes a scratch folder in `parent` and lives on; its folder."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, PREFIX, str(parent)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_the_folder_of_a_killed_worker_is_swept_by_the_next(tmp_path: Path) -> None:
    proc, folder = start_holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (folder / "job-1" / "input").exists()  # nobody could remove it
    mine = ScratchFolder(PREFIX, tmp_path)
    assert not folder.exists()
    assert mine.path.is_dir()
    mine.close()
    assert not mine.path.exists()


def test_a_live_workers_folder_is_left_alone(tmp_path: Path) -> None:
    proc, folder = start_holder(tmp_path)
    try:
        mine = ScratchFolder(PREFIX, tmp_path)
        assert sweep(tmp_path, PREFIX) == []
        assert (folder / "job-1" / "input").read_bytes() == b"a job's file"
        assert mine.path.is_dir()  # nor is our own swept
        mine.close()
    finally:
        proc.kill()
        proc.wait()


# A worker making its folder, paused where it takes the lock (its `flock` waits for a
# line on stdin): what a worker starting at that moment would find there.
PAUSED = """
import fcntl, sys, time
from pathlib import Path
from csml.worker import scratch_folder

real_flock = fcntl.flock

def flock(fd, operation):
    if operation == fcntl.LOCK_EX:  # the maker's own lock (a sweep's is non-blocking)
        print("locking", flush=True)
        sys.stdin.readline()
    return real_flock(fd, operation)

fcntl.flock = flock
folder = scratch_folder.ScratchFolder(sys.argv[1], Path(sys.argv[2]))
print(folder.path, flush=True)
time.sleep(600)
"""


def test_a_folder_being_made_is_not_swept(tmp_path: Path) -> None:
    """Workers started together (bench/coordinators.py starts 4 at once) sweep while the
    others make their folders: a sweep that comes while a folder's lock file exists but is
    not locked yet must leave it alone (it removed the folder of a live worker, whose job
    folders then failed: its slot thread died holding a claimed job, which never ended)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED, PREFIX, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "locking"
        (being_made,) = tmp_path.iterdir()
        assert sweep(tmp_path, PREFIX) == []  # a worker starting now
        proc.stdin.write("go\n")
        proc.stdin.flush()
        folder = Path(proc.stdout.readline().strip())
        assert folder == being_made and folder.is_dir()
        assert sweep(tmp_path, PREFIX) == []  # locked under its name now
        assert (folder / LOCK_NAME).is_file()
    finally:
        proc.kill()
        proc.wait()
    assert sweep(tmp_path, PREFIX) == [folder]  # its worker gone: swept as before


def test_only_locked_folders_of_the_prefix_are_swept(tmp_path: Path) -> None:
    """An older version's folder (no lock file), another prefix, a symlink to a folder
    and a folder whose lock is a symlink are all kept; a dead one of the prefix is not."""
    unlocked = tmp_path / f"{PREFIX}old"
    unlocked.mkdir()
    other = tmp_path / "csml-other-x"
    other.mkdir()
    (other / LOCK_NAME).touch()
    target = tmp_path / "target"
    target.mkdir()
    (target / LOCK_NAME).touch()
    (tmp_path / f"{PREFIX}link").symlink_to(target)
    lock_link = tmp_path / f"{PREFIX}locklink"
    lock_link.mkdir()
    (lock_link / LOCK_NAME).symlink_to(target / LOCK_NAME)
    dead = tmp_path / f"{PREFIX}dead"
    dead.mkdir()
    (dead / LOCK_NAME).touch()

    assert sweep(tmp_path, PREFIX) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["csml-other-x", "target", f"{PREFIX}old", f"{PREFIX}link", f"{PREFIX}locklink"]
    )
    assert (target / LOCK_NAME).exists()


def test_the_lock_is_not_inherited_across_exec(tmp_path: Path) -> None:
    """A zygote is a fresh interpreter started by the worker: it must not keep the lock,
    or a killed worker's folder would stay while its zygote lingers."""
    mine = ScratchFolder(PREFIX, tmp_path)
    fd = mine._lock_fd
    assert fd is not None and not os.get_inheritable(fd)
    mine.close()


SANDBOX = """
import sys, time
from csml.worker.sandbox import Sandbox
sandbox = Sandbox("echo")
sandbox.description  # its zygote is up
print(sandbox._tmp_root, flush=True)
if sys.argv[1] == "close":
    sandbox.close()
else:
    time.sleep(600)
"""


def test_a_killed_workers_sandbox_folder_is_swept_by_the_next_sandbox(tmp_path: Path) -> None:
    """The wiring: `Sandbox` keeps its children's folders in a scratch folder of the temp
    dir (TMPDIR here), which the next sandbox sweeps once the first was SIGKILLed."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed = subprocess.Popen(
        [sys.executable, "-c", SANDBOX, "sleep"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert killed.stdout is not None
    folder = Path(killed.stdout.readline().strip())
    assert folder.parent == tmp_path and folder.name.startswith("csml-sandbox-")
    killed.kill()
    killed.wait()
    assert folder.is_dir()
    out = subprocess.run(
        [sys.executable, "-c", SANDBOX, "close"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert not folder.exists()
    assert not Path(out.stdout.strip()).exists()  # and it removed its own when it closed
