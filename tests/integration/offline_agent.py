"""A real worker agent that never reaches a coordinator, for tests of its own parts
(job folders, inline inputs): its sandbox's zygote runs, its coordinator address is a
closed port, and everything it opened is closed and its work folder removed at the end."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from csml.worker.agent import WorkerAgent, WorkerConfig


@contextlib.contextmanager
def offline_agent(workdir: Path, app: str = "echo") -> Iterator[WorkerAgent]:
    config = WorkerConfig(
        coordinator="http://127.0.0.1:9",  # never called
        join_token="unused",
        app=app,
        workdir=workdir,
        insecure_http=True,
    )
    agent = WorkerAgent(config)
    try:
        yield agent
    finally:
        agent.sandbox.close()
        agent.http.close()
        agent.claims.close()
        agent._sender.close()
        shutil.rmtree(agent._workdir, ignore_errors=True)
