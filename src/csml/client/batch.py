"""Batches: one operation over many input files, each item an ordinary job.

`Client.map(app, operation, files)` runs them; `csml batch` is the CLI over it.

Invariants:
- Every item is a job of its own, so it counts against the identity's quotas and takes
  its turn in the fair queue like any other job; at most `concurrency` items are in
  flight (submitted and not finished) at a time.
- An item that fails (refused at submission with a 4xx, failed or cancelled on a worker,
  or not finished within `timeout`) is recorded with its reason; it never fails the batch
  or the items after it. Only errors that concern every item (no such app, unreachable
  coordinator, bad credentials) stop the batch, and they raise.
- A refusal that says "come back later" (429: queue full, too many active jobs) is
  retried after the server's Retry-After, for at most `patience` seconds per item.
- Items keep the order of the inputs; `Batch.items[i]` is input `i`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from csml.client.errors import CsmlError, InvalidRequest, NotFound, TooManyRequests, WaitTimeout

if TYPE_CHECKING:
    from csml.client.sdk import Client, Job

# Errors about one item's input or params: the item fails, the batch goes on.
ITEM_ERRORS = (InvalidRequest, WaitTimeout)


@dataclass
class BatchItem:
    """One input of a batch and what became of it."""

    index: int
    source: str  # the input as the caller named it (a path, or a name inside a zip)
    job: Job | None = None
    state: str = "pending"  # pending | succeeded | failed | cancelled | refused | timed_out
    error: str | None = None
    saved: dict[str, str] = field(default_factory=dict)  # output name -> local path

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"

    def manifest_line(self) -> dict[str, Any]:
        """What `manifest.jsonl` holds for this item."""
        job = self.job
        return {
            "index": self.index,
            "input": self.source,
            "job": job.id if job else None,
            "state": self.state,
            "error": self.error,
            "result": job.result if job is not None and self.ok else None,
            "outputs": self.saved,
        }


@dataclass
class Batch:
    """The items of one `Client.map` call, in input order."""

    app: str
    operation: str
    items: list[BatchItem]
    wall_s: float = 0.0

    @property
    def succeeded(self) -> list[BatchItem]:
        return [i for i in self.items if i.ok]

    @property
    def failed(self) -> list[BatchItem]:
        return [i for i in self.items if not i.ok]

    def write_manifest(self, path: str | Path) -> Path:
        """One JSON object per line and per item, in input order."""
        target = Path(path)
        tmp = target.with_name(target.name + ".part")
        with open(tmp, "w", encoding="utf-8") as out:
            for item in self.items:
                out.write(json.dumps(item.manifest_line(), sort_keys=True) + "\n")
        tmp.replace(target)
        return target


ItemCallback = Callable[[BatchItem], None]


def run_batch(
    client: Client,
    app: str,
    operation: str,
    sources: Sequence[tuple[str, Any]],
    *,
    input_name: str,
    params: dict[str, Any] | None = None,
    concurrency: int = 4,
    timeout: float = 3600.0,
    patience: float = 600.0,
    on_done: ItemCallback | None = None,
) -> Batch:
    """Run `operation` once per `(label, file)` in `sources`, the file as `input_name`.

    `on_done` is called (from a pool thread, one call at a time) as each item ends;
    it may download the item's outputs into `item.saved`."""
    if concurrency < 1:
        raise CsmlError("concurrency must be at least 1")
    items = [BatchItem(i, label) for i, (label, _) in enumerate(sources)]
    done_lock = threading.Lock()
    fatal: list[BaseException] = []

    def one(item: BatchItem, file: Any) -> None:
        if fatal:
            item.state, item.error = "failed", "not run: the batch stopped"
            return
        try:
            job = _submit_with_patience(client, app, operation, input_name, file, params, patience)
            item.job = job
            job.wait(timeout=timeout)
            item.state = job.state.value
            if not item.ok:
                item.error = job.error or f"job ended {item.state}"
        except TooManyRequests as exc:
            item.state, item.error = "refused", f"still refused after {patience:g} s: {exc}"
        except WaitTimeout as exc:
            item.state, item.error = "timed_out", str(exc)
        except ITEM_ERRORS as exc:
            item.state, item.error = "refused", str(exc)
        except NotFound as exc:  # the app or operation is gone: no item can run
            item.state, item.error = "failed", str(exc)
            fatal.append(exc)
        except CsmlError as exc:
            item.state, item.error = "failed", str(exc)
            if exc.status is None or exc.status in (401, 403):
                fatal.append(exc)
        with done_lock:
            if on_done is not None:
                on_done(item)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="csml-batch") as pool:
        pairs = zip(items, sources, strict=True)
        futures = [pool.submit(one, item, file) for item, (_, file) in pairs]
        for f in futures:
            f.result()
    if fatal:
        raise fatal[0]
    return Batch(app, operation, items, time.perf_counter() - start)


def _submit_with_patience(
    client: Client,
    app: str,
    operation: str,
    input_name: str,
    file: Any,
    params: dict[str, Any] | None,
    patience: float,
) -> Job:
    deadline = time.monotonic() + patience
    while True:
        if hasattr(file, "seek"):
            file.seek(0)
        try:
            return client.submit(app, operation, files={input_name: file}, params=params)
        except TooManyRequests as exc:
            wait = float(getattr(exc, "retry_after", None) or 1.0)
            if time.monotonic() + wait > deadline:
                raise
            time.sleep(min(wait, 5.0))


def single_file_input(inputs: Iterable[tuple[str, bool]], wanted: str | None) -> str:
    """The input a batch feeds: `wanted`, or the operation's only required file input.

    `inputs` are (name, required) pairs of the operation's file inputs."""
    pairs = list(inputs)
    names = [name for name, _ in pairs]
    if wanted is not None:
        if wanted not in names:
            raise CsmlError(f"the operation has no input {wanted!r}; it has: {', '.join(names)}")
        return wanted
    required = [name for name, req in pairs if req]
    candidates = required or names
    if len(candidates) != 1:
        raise CsmlError(
            "a batch feeds one file input per item; name it with --input "
            f"(the operation has: {', '.join(names) or 'none'})"
        )
    return candidates[0]
