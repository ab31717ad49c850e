"""The worker agent's inline inputs (`WorkerAgent._input`): the bytes a claim carries in
base64 are decoded by `csml.schemas.base64_text` (canonical standard base64 only) and
written when their size and sha256 are the input's; anything else (not canonical base64,
another digest) is downloaded instead, never a failed job.

The agent is real (its sandbox's zygote runs); its download is replaced by a recorder,
since nothing here runs a coordinator to download from."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from csml.schemas import ClaimedJob
from csml.worker.agent import WorkerAgent
from tests.integration.offline_agent import echo_claim, offline_agent

DATA = b"the input's bytes\x00\xff"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[WorkerAgent]:
    with offline_agent(tmp_path) as made:
        yield made


@pytest.mark.parametrize(
    ("inline", "downloaded"),
    [
        (base64.b64encode(DATA).decode(), False),  # what every coordinator sends
        (base64.b64encode(DATA).decode().rstrip("="), True),  # unpadded: not canonical
        (base64.urlsafe_b64encode(DATA).decode(), True),  # the URL-safe alphabet
        ("not base64 at all!", True),
        (base64.b64encode(DATA + b"x").decode(), True),  # another digest
    ],
)
def test_an_inline_input_is_used_only_when_canonical_and_its_digest_matches(
    agent: WorkerAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    inline: str,
    downloaded: bool,
) -> None:
    fetched: list[str] = []

    def download(job: ClaimedJob, name: str, target: Path) -> Path:
        fetched.append(name)
        target.write_bytes(DATA)
        return target

    monkeypatch.setattr(agent, "_download", download)
    job = echo_claim(DATA, inline=inline)
    (info,) = job.inputs
    target = tmp_path / "in"
    assert agent._input(job, info, target) == target
    assert target.read_bytes() == DATA
    assert fetched == (["data"] if downloaded else [])
