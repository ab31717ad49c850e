"""The worker agent keeps an owner's input files for that owner's next job (`WorkerAgent
._take_folder`, `_give_back`, `agent._write_input`): with a uid per job, a job folder
given back keeps its inputs (root's again, 0400, in root's 0700 `inputs/`), and the
same owner's next job has its input written over the same file: no new inode (ext4's
inode search made a new file cost ~0.3-0.5 CPU-ms on the bench machine). Another owner's
job never gets them: they are unlinked first, so a file the first owner's process may
still hold open never receives the second owner's bytes.

The agent and its sandbox are real (echo jobs run in sandboxed children, as root); no
coordinator: each completion stays pending in the agent, outputs inline, and is read
there."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from csml.worker.agent import WorkerAgent, _Running
from tests.integration.offline_agent import echo_claim, offline_agent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a uid per job needs root")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[WorkerAgent]:
    with offline_agent(tmp_path) as made:
        yield made


def run_echo(agent: WorkerAgent, owner: str, data: bytes, n: int) -> bytes:
    """Run an echo job of `owner` with `data` inline, as a slot thread does; its output."""
    job = echo_claim(data, job_id=f"{n:032d}", owner_key=owner)
    agent._running[job.id] = _Running(job)
    agent._active += 1
    agent._execute(job)
    done = agent._pending.pop()
    assert done.completion.job_id == job.id and done.completion.state == "succeeded"
    (output,) = done.completion.inline_outputs
    return base64.b64decode(output.content)


def kept_input(agent: WorkerAgent) -> Path:
    (folder,) = agent._folders
    return folder.inputs / "data"


def test_an_owners_next_job_has_its_input_written_over_the_kept_file(agent: WorkerAgent) -> None:
    first = os.urandom(5000)
    assert run_echo(agent, "owner-a", first, 1) == first
    kept = kept_input(agent)
    st = os.stat(kept)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o400)  # root's again
    assert kept.read_bytes() == first
    shorter = os.urandom(1200)
    assert run_echo(agent, "owner-a", shorter, 2) == shorter  # truncated to its size
    assert os.stat(kept).st_ino == st.st_ino
    assert kept.read_bytes() == shorter


def test_another_owner_never_gets_the_kept_file(agent: WorkerAgent) -> None:
    mine = b"owner a's photo" * 100
    assert run_echo(agent, "owner-a", mine, 1) == mine
    held = os.open(kept_input(agent), os.O_RDONLY)  # as a process of owner a may hold it
    try:
        theirs = b"owner b's photo" * 100
        assert run_echo(agent, "owner-b", theirs, 2) == theirs
        assert os.pread(held, 1 << 16, 0) == mine  # b's bytes went to a new file
        assert os.fstat(held).st_nlink == 0
        assert kept_input(agent).read_bytes() == theirs
    finally:
        os.close(held)


def test_a_job_without_owner_keeps_nothing(agent: WorkerAgent) -> None:
    data = b"no owner"
    assert run_echo(agent, "owner-a", data, 1) == data
    held = os.open(kept_input(agent), os.O_RDONLY)
    try:
        assert run_echo(agent, "", b"fresh process", 2) == b"fresh process"
        assert os.fstat(held).st_nlink == 0  # owner a's file was unlinked first
        (folder,) = agent._folders
        assert not folder.kept and os.listdir(folder.inputs) == []
    finally:
        os.close(held)
