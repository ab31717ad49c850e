"""A claim answer's JSON with its inline inputs spliced in (`claim_answers.encoded`) is
byte for byte what pydantic writes for it (the worker parses it unchanged), whatever the
rest of the answer holds; and the claim route sends exactly those bytes."""

from __future__ import annotations

import base64
import os
from typing import Any

from pydantic import TypeAdapter

from csml.coordinator.claim_answers import encoded
from csml.schemas import ClaimedConfidential, ClaimResponse
from csml.schemas.workers import ClaimedJob, CompletionOutcome, JobLimits
from tests.unit.inproc import HttpWorker, InProcessCoordinator

PYDANTIC = TypeAdapter(ClaimResponse)
LIMITS = JobLimits(timeout_seconds=30, memory_mb=512, cpu_seconds=30)


def text(size: int) -> str:
    return base64.b64encode(os.urandom(size)).decode()


def job(n: int, inline: dict[str, str], **kw: Any) -> ClaimedJob:
    return ClaimedJob(
        id=f"job-{n}",
        operation="detect",
        params=kw.pop("params", {"n": n}),
        inputs=[],
        lease_id=f"lease-{n}",
        attempt=1,
        limits=LIMITS,
        inline_inputs=inline,
        **kw,
    )


def same_as_pydantic(answer: ClaimResponse) -> bytes:
    ours = encoded(answer)
    assert ours == PYDANTIC.dump_json(answer, by_alias=True)
    assert ClaimResponse.model_validate_json(ours) == answer
    return ours


def test_inline_inputs_are_spliced_into_the_bytes_pydantic_writes() -> None:
    same_as_pydantic(ClaimResponse(jobs=[job(1, {"image": text(158_000)})], abort=["x"]))
    same_as_pydantic(
        ClaimResponse(
            jobs=[
                job(1, {"a": text(10), "b": "", "c": text(2)}),
                job(2, {}),
                job(3, {"d": "AA=="}),
            ],
            abort=["j-9", 'q"uote'],
            results=[CompletionOutcome(job_id="j-0", status=204)],
        )
    )


def test_names_params_and_owner_keys_are_escaped_as_pydantic_escapes_them() -> None:
    """Names, params (the owner's: may hold anything, a fake `inline_inputs` too) and the
    owner key go through pydantic-core's escaping; only the texts are copied."""
    tricky = 'é"\\\n\u2028}{,"inline_inputs":{},"owner_key":"'
    answer = ClaimResponse(
        jobs=[
            job(
                1,
                {tricky: text(3), "plain": text(4)},
                params={"inline_inputs": {}, tricky: [tricky, 1.5, None]},
                owner_key="ab" + tricky[:20],
            ),
            job(
                2,
                {"x": text(7)},
                confidential=ClaimedConfidential(
                    job_nonce="n", wrapped_key="k", result_public_key="p", encrypted_params="e"
                ),
            ),
        ]
    )
    same_as_pydantic(answer)


def test_an_answer_without_inline_inputs_is_pydantics_own() -> None:
    same_as_pydantic(ClaimResponse(jobs=[]))
    same_as_pydantic(ClaimResponse(jobs=[job(1, {})], abort=["a"]))


def test_the_claim_route_sends_the_spliced_bytes(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker
) -> None:
    user = coordinator.new_user()
    content = os.urandom(150_000)
    submitted = user.submit("echo", "echo", files={"data": content})
    r = echo_worker.post("/claim", {"max_jobs": 1, "wait": 0})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    answer = ClaimResponse.model_validate_json(r.content)
    (taken,) = answer.jobs
    assert taken.id == submitted.id
    assert base64.b64decode(taken.inline_inputs["data"]) == content
    assert r.content == same_as_pydantic(answer)
