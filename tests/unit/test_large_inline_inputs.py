"""Inputs over 256 KiB inline in a claim's answer: a plain job's input of up to the
claim's budget (`csml.coordinator.queue.INLINE_CLAIM_BYTES`, in all) comes inline, read
from its file, so the worker sends no download for it; past the budget, and a
confidential job's, the worker downloads as before."""

from __future__ import annotations

import base64
import hashlib
import os

from csml.coordinator.queue import INLINE_CLAIM_BYTES
from csml.schemas.workers import INLINE_MAX_BYTES
from tests.unit.inproc import HttpWorker, InProcessCoordinator
from tests.unit.test_worker_protocol import claim

LARGE = 600_000  # a file (over the database's bound), within a claim's budget


def test_a_large_input_comes_inline_in_the_claim(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    assert INLINE_MAX_BYTES < LARGE <= INLINE_CLAIM_BYTES
    user = coordinator.new_user()
    content = os.urandom(LARGE)
    job = user.submit("echo", "echo", files={"data": content})
    (taken,) = claim(echo_worker, 1).jobs
    assert taken.id == job.id
    inline = base64.b64decode(taken.inline_inputs["data"])
    assert inline == content
    (info,) = taken.inputs
    assert (info.size, info.sha256) == (LARGE, hashlib.sha256(content).hexdigest())
    # The download route still serves it (a worker that does not take it inline).
    assert echo_worker.download(taken, "data").content == content


def test_inputs_past_the_claims_budget_are_downloaded(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    contents = [os.urandom(LARGE) for _ in range(2)]
    for content in contents:
        user.submit("echo", "echo", files={"data": content})
    first, second = claim(echo_worker, 2).jobs
    assert base64.b64decode(first.inline_inputs["data"]) == contents[0]
    assert second.inline_inputs == {}  # 2 x 600 KB: over the budget of one answer
    assert echo_worker.download(second, "data").content == contents[1]
