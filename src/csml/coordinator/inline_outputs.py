"""Small outputs of an ended job sent with its view, so the client needs no download.

A client that asks for it (`GET /v1/jobs/events?inline_outputs=N`, as `csml batch`
does) gets, with the `job` event of a job that succeeded, the bytes of each output of
at most N bytes in base64 (`"inline_outputs": {name: base64}`, beside the view's
fields); the others it downloads as before (`GET /v1/jobs/{id}/outputs/{name}`).

Invariants:
- Only what the caller may download anyway: the jobs come from the owner's own reads
  (`Queue.changed_jobs`), only outputs of succeeded jobs, never a confidential job's
  (its outputs are ciphertext the client streams through its decryptor).
- Bounded: N is at most `INLINE_MAX_BYTES` (the bound of an inline output in a
  completion); an output is read only if its stored size is at most N, and read with
  a cap of that size (a file that is not the size its row says is left out, and the
  client downloads it); one wake-up inlines at most `EVENT_BUDGET` bytes in all.
- A file that cannot be read (erased, retention) is left out, never an error: the
  client's download says what happened. The client checks size and sha256 against
  the view before writing.
- Nothing is kept: the bytes go into the one event and are not remembered with the
  stream's views.
- The base64 text is spliced into the event's JSON as it is (`with_view`): its alphabet
  needs no escaping, and passing 100 KiB through the JSON encoder cost ~0.5 ms a photo.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial

from csml.schemas import JobState
from csml.schemas.workers import INLINE_MAX_BYTES
from csml.store.blobs import BlobStore
from csml.store.jobs import JobRow

EVENT_BUDGET = 8 << 20
"""Most bytes inlined per wake-up of a stream, over all its jobs."""


class Budget:
    """What a wake-up may still inline."""

    def __init__(self, limit: int = EVENT_BUDGET) -> None:
        self.left = limit


def outputs_of(
    blobs: BlobStore,
    job: JobRow,
    most: int,
    budget: Budget,
    load: Callable[[int, str, str], bytes | None] | None = None,
) -> dict[str, str]:
    """The job's outputs of at most `most` bytes, base64 by name (see the module
    docstring); empty when the job did not succeed or is confidential. `load(seq, kind,
    name)`: the bytes of a file kept in the database (`Queue.file_content`), read when
    the memo no longer has its text."""
    if job.state != JobState.succeeded.value or job.confidential is not None:
        return {}
    most = min(most, INLINE_MAX_BYTES)
    out: dict[str, str] = {}
    for f in job.files:
        if f.kind != "output" or f.size > most or f.size > budget.left:
            continue
        text = blobs.base64_of(  # as the completion carried it
            f.blob, f.sha256, f.size, partial(load, job.seq, f.kind, f.name) if load else None
        )
        if text is not None:
            budget.left -= f.size
            out[f.name] = text
    return out


def with_view(head: str, inline: dict[str, str]) -> str:
    """A view's JSON object `head` (compact, as the stream encodes it) with
    `"inline_outputs": inline` added as its last member. The values must be
    `outputs_of`'s: standard base64, which is JSON string content as it is."""
    assert head.startswith("{") and head.endswith("}")
    names = ",".join(f'{json.dumps(name)}:"{data}"' for name, data in inline.items())
    body = f'"inline_outputs":{{{names}}}}}'
    return f"{head[:-1]},{body}" if len(head) > 2 else f"{{{body}"
