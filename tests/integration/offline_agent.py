"""A real worker agent that never reaches a coordinator, for tests of its own parts
(job folders, inline inputs): its sandbox's zygote runs, its coordinator address is a
closed port, and everything it opened is closed and its work folder removed at the end.
`echo_claim` builds the claimed echo job such tests hand it, one input named `data`."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

from csml.schemas import ClaimedJob, FileInfo, JobLimits
from csml.worker.agent import WorkerAgent, WorkerConfig


@contextlib.contextmanager
def offline_agent(
    workdir: Path, app: str = "echo", slots: int = 1, prefetch: int = 0
) -> Iterator[WorkerAgent]:
    config = WorkerConfig(
        coordinator="http://127.0.0.1:9",  # never called
        join_token="unused",
        app=app,
        slots=slots,
        workdir=workdir,
        insecure_http=True,
        prefetch=prefetch,
    )
    agent = WorkerAgent(config)
    try:
        yield agent
    finally:
        agent.sandbox.close()
        agent.http.close()
        agent.claims.close()
        agent._sender.close()
        agent._scratch.close()


def echo_claim(
    data: bytes,
    *,
    job_id: str = "j" * 32,
    inline: str | None = None,
    owner_key: str = "",
) -> ClaimedJob:
    """An echo job as a claim hands it over: input `data` described by its size and
    sha256, carried inline as `inline` (default: its canonical base64)."""
    info = FileInfo(
        name="data",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        media_type="application/octet-stream",
    )
    return ClaimedJob(
        id=job_id,
        operation="echo",
        params={},
        inputs=[info],
        lease_id="lease",
        attempt=1,
        limits=JobLimits(timeout_seconds=30, memory_mb=512, cpu_seconds=30),
        inline_inputs={"data": base64.b64encode(data).decode() if inline is None else inline},
        owner_key=owner_key,
    )
