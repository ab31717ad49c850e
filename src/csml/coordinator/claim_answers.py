"""The JSON of a claim answer, its inline inputs' base64 spliced in as it is.

A claim answer (`ClaimResponse`) carries the inputs of plain jobs inline, base64, up
to 1 MiB per answer (`Queue._inline`): a (c) photo is ~210 KB of text. Encoded by
pydantic (as the lean handler encodes any answer) that text is scanned for characters
to escape and copied into the JSON: ~85 CPU-µs a photo here. `encoded(answer)` writes
the same bytes with each text copied in as it is, as `inline_outputs.with_view` does
for the result stream's outputs.

Invariants:
- Byte for byte what pydantic writes for the answer (`TypeAdapter(ClaimResponse)
  .dump_json(answer, by_alias=True)`, which FastAPI's `serialize_response` calls for
  the route's `response_model`): the worker parses it unchanged, and a test compares
  the two. Everything but the inline texts is still written by pydantic; the names and
  the owner key by pydantic-core's `to_json` too (the same escaping).
- The inline texts must be `BlobStore.base64_of`'s: canonical standard base64
  (`csml.schemas.base64_text`; the memo keeps only texts that decoded canonically),
  whose alphabet is JSON string content as it is. Nothing from outside the coordinator's
  own encoder or memo is spliced.
- The layout it relies on (`jobs` first in `ClaimResponse`; `inline_inputs` then
  `owner_key` last in `ClaimedJob`) is checked at import, so a schema change that moves
  them fails loudly instead of writing other bytes.
"""

from __future__ import annotations

from pydantic import TypeAdapter
from pydantic_core import to_json

from csml.schemas import ClaimResponse
from csml.schemas.workers import ClaimedJob

_ANSWER = TypeAdapter(ClaimResponse)
_JOBS_OPEN = b'{"jobs":['
_SPLICED = {"inline_inputs", "owner_key"}

_FIRST = next(iter(ClaimResponse.model_fields))
if _FIRST != "jobs" or list(ClaimedJob.model_fields)[-2:] != ["inline_inputs", "owner_key"]:
    # pragma: no cover: guards the layout `encoded` writes
    raise ImportError("claim_answers: ClaimResponse/ClaimedJob field order changed")


def _job(job: ClaimedJob, parts: list[bytes]) -> None:
    """Append one claimed job's JSON to `parts`, its inline texts as they are (each text
    is copied twice in all: into bytes, then into the answer's one join)."""
    head = job.model_dump_json(by_alias=True, exclude=_SPLICED)  # `{...,"confidential":…}`
    parts.append(head.encode()[:-1])
    opening = b',"inline_inputs":{'
    for name, text in job.inline_inputs.items():
        parts += (opening, to_json(name), b':"', text.encode("ascii"), b'"')
        opening = b","
    if opening != b",":  # none
        parts.append(opening)
    parts += (b'},"owner_key":', to_json(job.owner_key), b"}")


def encoded(answer: ClaimResponse) -> bytes:
    """`answer` as JSON: what pydantic writes for it (see the module docstring)."""
    if not any(job.inline_inputs for job in answer.jobs):
        return _ANSWER.dump_json(answer, by_alias=True)
    rest = _ANSWER.dump_json(answer.model_copy(update={"jobs": []}), by_alias=True)
    assert rest.startswith(_JOBS_OPEN + b"]")
    parts = [_JOBS_OPEN]
    for n, job in enumerate(answer.jobs):
        if n:
            parts.append(b",")
        _job(job, parts)
    parts.append(rest[len(_JOBS_OPEN) :])
    return b"".join(parts)
