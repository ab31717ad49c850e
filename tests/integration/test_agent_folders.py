"""The worker agent's job folders (`WorkerAgent._take_folder`, `_give_back`): reused from
job to job only with a uid per job (root). Under the worker's own uid a job can write
anywhere in its folder, and what it left there could reach the next job, maybe another
identity's: each job's folder is then removed when the job ends, and the next job gets
a new one.

The agent is real (its sandbox's zygote runs; nothing is sent to a coordinator). Its
`Sandbox.own_uid` is what `os.geteuid() == 0` made it; as root (CI), the worker without
a uid per job is had by setting it False, which is all of it the folders depend on. What
a job leaves is written here as the worker's uid, as such a job may."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from csml.worker.agent import WorkerAgent, _Running
from tests.integration.offline_agent import echo_claim, offline_agent

ROOT = os.geteuid() == 0


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[WorkerAgent]:
    with offline_agent(tmp_path) as made:
        yield made


def run_a_job_that_leaves_files(agent: WorkerAgent) -> Path:
    """Take a folder as a job's thread does, put in it what a job has (an input written
    by the agent, an output taken back) and what a job under the worker's uid may leave
    (a file next to its folders, one among its inputs); give it back. Its path."""
    folder = agent._take_folder()
    os.mkdir(folder.inputs, 0o700)
    folder.has_inputs = True
    (folder.inputs / "data").write_bytes(b"the input")
    (folder.outputs / "data").write_bytes(b"the output")
    folder.files += [str(folder.inputs / "data"), str(folder.outputs / "data")]
    Path(folder.path, "left-by-the-job").write_bytes(b"for whoever comes next")
    (folder.inputs / "planted").write_bytes(b"looks like an input")
    agent._give_back(folder)
    return Path(folder.path)


def test_without_a_uid_per_job_each_job_folder_is_removed(
    agent: WorkerAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    if ROOT:
        monkeypatch.setattr(agent.sandbox, "own_uid", False)
    assert not agent.sandbox.own_uid
    first = run_a_job_that_leaves_files(agent)
    assert not first.exists()
    following = agent._take_folder()
    assert Path(following.path) != first
    assert sorted(os.listdir(following.path)) == ["outputs"]
    assert os.listdir(following.outputs) == []


@pytest.mark.skipif(not ROOT, reason="a uid per job needs root")
def test_with_a_uid_per_job_a_folder_is_emptied_of_what_is_known_and_reused(
    agent: WorkerAgent,
) -> None:
    """The other branch, for contrast: what the job left is the sandbox's to refuse (the
    folder is root's again once taken back: see tests/integration/test_isolation.py);
    the agent removes what it knows by name and reuses the folder."""
    assert agent.sandbox.own_uid
    first = run_a_job_that_leaves_files(agent)
    following = agent._take_folder()
    assert Path(following.path) == first
    assert not (following.inputs / "data").exists() and not (following.outputs / "data").exists()


def test_a_job_with_no_folder_ends_here_and_its_thread_goes_on(agent: WorkerAgent) -> None:
    """A job whose folder cannot be made (the worker's own folder removed under it, a
    full disk) ends here unrun: its slot is free again and it leaves the heartbeat (its
    lease then expires and it is queued again), and the slot thread returns normally.
    (It died with FileNotFoundError, and the heartbeat kept its job's lease for ever.)"""
    free = agent._free
    job = echo_claim(b"some input")
    agent._free -= 1
    agent._running[job.id] = _Running(job)
    agent._active += 1
    shutil.rmtree(agent._workdir)  # as a sweep by a worker starting beside it once did
    agent._execute(job)  # returns
    assert job.id not in agent._running
    assert (agent._free, agent._active) == (free, 0)
    assert not agent._pending  # nothing to send: its lease expires
