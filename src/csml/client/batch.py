"""Batches: one operation over many input files, each item an ordinary job.

`Client.map(app, operation, files)` runs them; `csml batch` is the CLI over it.
Items whose inputs are small (each at most `INLINE_MAX_BYTES`) are submitted many at a
time, inline, through `POST /v1/jobs/batch` (`Client.submit_many`), up to
`BATCH_ITEMS` items and about `BATCH_BYTES` bytes per request; larger files are
submitted one per request (multipart, streamed from disk), as is every item when the
coordinator does not have the batch route (404/405) or refuses the batch form itself.

Invariants:
- Every item is a job of its own, so it counts against the identity's quotas and takes
  its turn in the fair queue like any other job; at most `concurrency` items are in
  flight (submitted and not finished) at a time: a batch request carries at most as
  many items as there are free places.
- An item that fails (refused at submission with a 4xx, failed or cancelled on a worker,
  or not finished within `timeout`) is recorded with its reason; it never fails the batch
  or the items after it. Only errors that concern every item (no such app, unreachable
  coordinator, bad credentials) stop the batch, and they raise.
- A refusal that says "come back later" (429: queue full, too many active jobs), of one
  item or of a whole batch request, is retried after the server's Retry-After, for at
  most `patience` seconds per item.
- Items keep the order of the inputs; `Batch.items[i]` is input `i`.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from csml.client.errors import (
    Conflict,
    CsmlError,
    InvalidRequest,
    NotFound,
    QueueFull,
    RateLimited,
    ServerError,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    WaitTimeout,
)
from csml.schemas import base64_text
from csml.schemas.batches import BatchSubmitted
from csml.schemas.workers import INLINE_MAX_BYTES

if TYPE_CHECKING:
    from csml.client.sdk import Client, FileArg, Job

# Errors about one item's input or params: the item fails, the batch goes on.
ITEM_ERRORS = (InvalidRequest, WaitTimeout)
BATCH_ITEMS = 200
"""Most items per batch request."""
BATCH_BYTES = 8 << 20
"""About the most bytes of inline inputs (base64) per batch request."""
LINGER_SECONDS = 1.0
"""How long a batch request waits at most for a quarter of the places to be free (while
three quarters of the items are still in flight, so the workers stay busy)."""
MAX_WAITERS = 64
"""Threads that wait for items' jobs (and submit the large ones) at most."""
# A whole batch request refused with one of these: the coordinator does not take
# batches (no route: 404/405) or not this form of it; submit each item alone.
NO_BATCH_STATUSES = (400, 404, 405, 413, 415, 422)
_BY_STATUS: dict[int, type[CsmlError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    415: InvalidRequest,
    422: InvalidRequest,
}


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


# -- one batch request ---------------------------------------------------------------


def inline_bytes(file: FileArg) -> bytes | None:
    """The file's bytes if it may travel inline (at most `INLINE_MAX_BYTES`); None if it
    is larger, or a stream that cannot be rewound (it is then submitted alone)."""
    if isinstance(file, bytes):
        return file if len(file) <= INLINE_MAX_BYTES else None
    if isinstance(file, str | os.PathLike):
        # A raw descriptor: open, fstat, read to the end, close; not a buffered file's
        # own fstat, ioctl and lseek besides (three system calls fewer per item).
        try:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # submitted alone, which names the problem
        try:
            size = os.fstat(fd).st_size
            if size > INLINE_MAX_BYTES:
                return None
            chunks: list[bytes] = []
            got = 0
            while got <= INLINE_MAX_BYTES:  # to its end (as `read(n)`), at most one byte over
                more = os.read(fd, INLINE_MAX_BYTES + 1 - got)
                if not more:
                    break
                chunks.append(more)
                got += len(more)
        except OSError:
            return None
        finally:
            os.close(fd)
        data = b"".join(chunks)  # the one chunk itself, when there is one
        return data if len(data) <= INLINE_MAX_BYTES else None
    if not (hasattr(file, "seek") and hasattr(file, "read")):
        return None
    try:
        file.seek(0)
        data = file.read(INLINE_MAX_BYTES + 1)
        file.seek(0)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, bytes) and len(data) <= INLINE_MAX_BYTES else None


@dataclass(frozen=True)
class Entry:
    """One item of a batch request, ready to send: its spec's JSON and its inputs'
    base64 (ASCII bytes). The request body is spliced from these (`batch_body`), so the
    base64 text of the files is copied once into the body and never scanned by a JSON
    encoder (its alphabet needs no escaping in a JSON string)."""

    spec: bytes
    inputs: tuple[tuple[str, bytes], ...]

    @property
    def size(self) -> int:
        """What the entry adds to the request body."""
        return 32 + len(self.spec) + sum(len(name) + 8 + len(b) for name, b in self.inputs)

    def as_json(self) -> dict[str, Any]:
        """The entry as the JSON value the body holds for it."""
        return {
            "spec": json.loads(self.spec),
            "inputs": {name: data.decode("ascii") for name, data in self.inputs},
        }


def spec_json(spec: Mapping[str, Any]) -> bytes:
    """A spec as the body carries it: compact JSON, UTF-8 kept, NaN refused (as httpx
    encodes `json=`: ValueError)."""
    return json.dumps(spec, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def spec_of(
    app: str,
    operation: str,
    params: Mapping[str, Any] | None,
    limits: Mapping[str, float] | None = None,
    requires: Mapping[str, Any] | None = None,
) -> bytes:
    """A batch item's spec as the body carries it (`spec_json`)."""
    fields: dict[str, Any] = {"app": app, "operation": operation, "params": dict(params or {})}
    if limits:
        fields["limits"] = dict(limits)
    if requires:
        fields["requires"] = dict(requires)
    return spec_json(fields)


def batch_entry(
    app: str,
    operation: str,
    params: Mapping[str, Any] | None,
    inputs: Mapping[str, bytes],
    limits: Mapping[str, float] | None = None,
    requires: Mapping[str, Any] | None = None,
    *,
    spec: bytes | None = None,
) -> Entry:
    """One item of a batch request: its spec and its inputs in base64. `spec`: the
    spec's JSON (`spec_of`) when the caller made it already (`map`: one spec for every
    item); else it is made from the other arguments."""
    if spec is None:
        spec = spec_of(app, operation, params, limits, requires)
    # pybase64 (`base64_text.encode`): ~4.5 us for a 48.7 KB photo, stdlib's ~100 us.
    encoded = tuple(
        (name, base64_text.encode(data).encode("ascii")) for name, data in inputs.items()
    )
    return Entry(spec, encoded)


def batch_body(entries: Sequence[Entry]) -> bytes:
    """The JSON body of `POST /v1/jobs/batch` for `entries` (`{"items": [...]}`, compact),
    spliced: equal to `json.dumps` of the same value with compact separators and UTF-8
    kept (a test checks it)."""
    parts: list[bytes] = [b'{"items":[']
    for n, entry in enumerate(entries):
        if n:
            parts.append(b",")
        parts += (b'{"spec":', entry.spec, b',"inputs":{')
        for i, (name, data) in enumerate(entry.inputs):
            key = json.dumps(name, ensure_ascii=False).encode()
            parts += (b',"' if i else b'"', key[1:-1], b'":"', data, b'"')
        parts.append(b"}}")
    parts.append(b"]}")
    return b"".join(parts)


def post_batch(client: Client, entries: Sequence[Entry]) -> list[Job | CsmlError]:
    """Send one batch request; per entry, in order, its job or the error that refused it.

    A refusal of the whole request raises (`CsmlError`, with the status)."""
    from csml.client.sdk import Job

    stream = client._results
    mark = stream.mark() if stream is not None else None  # before the POST
    response = client._post_body("/v1/jobs/batch", batch_body(entries))  # a pooled link
    answer = BatchSubmitted.model_validate_json(response.content)
    if len(answer.items) != len(entries):
        raise ServerError(
            f"the coordinator answered {len(answer.items)} results for {len(entries)} items"
        )
    out: list[Job | CsmlError] = []
    for result in sorted(answer.items, key=lambda r: r.index):
        if result.job is not None:
            out.append(Job(client, result.job, mark))
        else:
            out.append(item_error(result.status, result.error, result.retry_after))
    return out


def item_error(status: int, error: Any, retry_after: float | None) -> CsmlError:
    """The error a single submission would have raised for this refusal."""
    code = getattr(error, "code", None)
    message = getattr(error, "message", None) or f"HTTP {status}"
    kw: dict[str, Any] = {"status": status, "code": code, "field": getattr(error, "field", None)}
    if status == 429:
        kind = QueueFull if code == "queue_full" else RateLimited
        return kind(message, retry_after=float(retry_after or 1), **kw)
    return _BY_STATUS.get(status, ServerError)(message, **kw)


# -- Client.map ----------------------------------------------------------------------


@dataclass
class _Pending:
    item: BatchItem
    file: Any
    refused_since: float | None = None  # first "come back later", for `patience`
    not_before: float = 0.0


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
    batch_items: int = BATCH_ITEMS,
    inline_outputs: int = 0,
) -> Batch:
    """Run `operation` once per `(label, file)` in `sources`, the file as `input_name`.

    `on_done` is called (from a pool thread, one call at a time) as each item ends;
    it may download the item's outputs into `item.saved`. Small files go in batch
    requests of at most `batch_items` items (see the module docstring); with
    `batch_items=0` every item is submitted alone. With `inline_outputs`, outputs up to
    that many bytes come with each item's result on the result stream (its
    `Job.download` then needs no request)."""
    if concurrency < 1:
        raise CsmlError("concurrency must be at least 1")
    run = _Run(client, app, operation, input_name, params, concurrency, timeout, patience, on_done)
    run.batching = batch_items > 0
    items = [BatchItem(i, label) for i, (label, _) in enumerate(sources)]
    start = time.perf_counter()
    if client._results is not None:
        if inline_outputs:
            client._results.want_inline(min(inline_outputs, INLINE_MAX_BYTES))
        # Connected before the first submission, so the stream covers every item's job
        # from its start: no item re-reads its job (a GET) when its wait begins. If it
        # cannot be opened, the waits long-poll as they would anyway.
        client._results.open()
    run.drive(
        [_Pending(item, file) for item, (_, file) in zip(items, sources, strict=True)],
        max(1, batch_items),
    )
    if run.fatal:
        raise run.fatal[0]
    return Batch(app, operation, items, time.perf_counter() - start)


class _Places:
    """The places of items in flight, at most `limit`: the submitting loop takes them,
    items give them back as they end. The loop is woken only once as many places as it
    waits for are free (one wake-up per batch request, not one per ended item, as a
    semaphore's waiter got: a wake-up costs more than the Python around it)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._free = limit
        self._need = 0  # places the loop waits for; 0: it does not wait
        self._cond = threading.Condition(threading.Lock())

    def take(self, least: int, most: int, timeout: float | None) -> int:
        """Wait until at least `least` places are free (at most `timeout` seconds; None:
        no bound), then take as many as are free, up to `most`; how many were taken
        (fewer than `least`, maybe none, when the time ran out)."""
        with self._cond:
            if self._free < least:
                self._need = least
                try:
                    self._cond.wait_for(lambda: self._free >= least, timeout)
                finally:
                    self._need = 0
            taken = min(self._free, most)
            self._free -= taken
            return taken

    def give(self) -> None:
        """One item is no longer in flight; wakes the loop if it now has the places it
        waits for. Giving more than was taken raises ValueError (as a BoundedSemaphore)."""
        with self._cond:
            if self._free >= self._limit:
                raise ValueError("a place was given back twice")
            self._free += 1
            if self._need and self._free >= self._need:
                self._cond.notify()


class _Run:
    """One `run_batch`: the submitting loop (the caller's thread) and the pool that waits."""

    def __init__(
        self,
        client: Client,
        app: str,
        operation: str,
        input_name: str,
        params: dict[str, Any] | None,
        concurrency: int,
        timeout: float,
        patience: float,
        on_done: ItemCallback | None,
    ) -> None:
        self.client = client
        self.app = app
        self.operation = operation
        self.input_name = input_name
        self.params = params
        self.timeout = timeout
        self.patience = patience
        self.on_done = on_done
        self.concurrency = concurrency
        self.places = _Places(concurrency)  # items in flight
        self.pool = ThreadPoolExecutor(
            max_workers=min(concurrency, MAX_WAITERS), thread_name_prefix="csml-batch"
        )
        self.done_lock = threading.Lock()
        self.fatal: list[BaseException] = []
        self.batching = True
        self.spec: bytes | None = None  # the items' spec as JSON (`spec_of`), once
        self.pending: collections.deque[_Pending] = collections.deque()
        self.later: list[_Pending] = []  # refused for now: retried after Retry-After

    # -- the submitting loop --------------------------------------------------

    def drive(self, todo: list[_Pending], batch_items: int) -> None:
        self.pending.extend(todo)
        try:
            while not self.fatal:
                self._requeue_due()
                if not self.pending:
                    if not self.later:
                        break
                    time.sleep(max(0.0, min(p.not_before for p in self.later) - time.monotonic()))
                    continue
                self.places.take(1, 1, None)  # a place for the first item (waits for one)
                chunk = [self.pending.popleft()]
                # Places free up one at a time as jobs end: wait a moment for a few more,
                # so that a request carries several items, not one per ended job. The loop
                # is woken once, when as many as it waits for are free (`_Places`).
                most = batch_items if self.batching else 1  # alone: no reason to wait
                want = min(most, max(1, self.concurrency // 4), len(self.pending) + 1)
                linger = time.monotonic() + LINGER_SECONDS
                while self.pending and len(chunk) < most:
                    room = min(most - len(chunk), len(self.pending))
                    short = min(want - len(chunk), room)  # still wanted before sending
                    left = linger - time.monotonic()
                    if short <= 0 or left <= 0:  # enough, or waited long enough: what is free
                        taken = self.places.take(0, room, 0.0)
                        chunk += [self.pending.popleft() for _ in range(taken)]
                        break
                    taken = self.places.take(short, room, left)
                    chunk += [self.pending.popleft() for _ in range(taken)]
                self._send(chunk)
        finally:
            self.pool.shutdown(wait=True)
        if self.fatal:
            for p in [*self.pending, *self.later]:
                p.item.state, p.item.error = "failed", "not run: the batch stopped"

    def _requeue_due(self) -> None:
        now = time.monotonic()
        due = [p for p in self.later if p.not_before <= now]
        if due:
            self.later = [p for p in self.later if p.not_before > now]
            self.pending.extendleft(reversed(due))

    def _send(self, chunk: list[_Pending]) -> None:
        """Submit `chunk` (each item holds a place): small ones in batch requests, the
        others alone in the pool."""
        inline: list[tuple[_Pending, Entry]] = []
        for p in chunk:
            data = inline_bytes(p.file) if self.batching else None
            if data is None:
                self.pool.submit(self._alone, p)
            else:
                if self.spec is None:  # the same for every item: its JSON made once
                    self.spec = spec_of(self.app, self.operation, self.params)
                entry = batch_entry(
                    self.app, self.operation, None, {self.input_name: data}, spec=self.spec
                )
                inline.append((p, entry))
        group: list[tuple[_Pending, Entry]] = []
        size = 0
        for p, entry in inline:
            grows = entry.size
            if group and size + grows > BATCH_BYTES:
                self._post(group)
                group, size = [], 0
            group.append((p, entry))
            size += grows
        if group:
            self._post(group)

    def _post(self, group: list[tuple[_Pending, Entry]]) -> None:
        try:
            answers = post_batch(self.client, [entry for _, entry in group])
        except TooManyRequests as exc:
            for p, _ in group:
                self._retry_or_refuse(p, exc)
            return
        except CsmlError as exc:
            if exc.status in NO_BATCH_STATUSES:
                self.batching = False  # every item alone from now on (each gets its verdict)
                for p, _ in group:
                    self.pool.submit(self._alone, p)
                return
            for p, _ in group:
                self._failed(p.item, exc)
                self._finish(p.item)
            return
        now = time.monotonic()
        for (p, _), answer in zip(group, answers, strict=True):
            if isinstance(answer, TooManyRequests):
                self._retry_or_refuse(p, answer)
            elif isinstance(answer, CsmlError):
                self._failed(p.item, answer)
                self._finish(p.item)
            else:
                p.item.job = answer
                self.pool.submit(self._wait, p.item, answer, now + self.timeout)

    def _retry_or_refuse(self, p: _Pending, exc: TooManyRequests) -> None:
        """A "come back later": again after Retry-After, within `patience` of the first."""
        self.places.give()  # not in flight while it waits
        now = time.monotonic()
        if p.refused_since is None:
            p.refused_since = now
        wait = min(float(exc.retry_after or 1.0), 5.0)
        if now + wait > p.refused_since + self.patience:
            p.item.state = "refused"
            p.item.error = f"still refused after {self.patience:g} s: {exc}"
            self._report(p.item)
            return
        p.not_before = now + wait
        self.later.append(p)

    # -- pool threads -----------------------------------------------------------

    def _wait(self, item: BatchItem, job: Job, deadline: float) -> None:
        try:
            job.wait(timeout=max(0.0, deadline - time.monotonic()))
            item.state = job.state.value
            if not item.ok:
                item.error = job.error or f"job ended {item.state}"
        except CsmlError as exc:
            self._failed(item, exc)
        except Exception as exc:  # a bug here must stop the batch, not hang it
            item.state, item.error = "failed", f"{type(exc).__name__}: {exc}"
            self.fatal.append(exc)
        self._finish(item)

    def _alone(self, p: _Pending) -> None:
        """Submit one item by itself (multipart, streamed), then wait for it."""
        item = p.item
        if self.fatal:
            item.state, item.error = "failed", "not run: the batch stopped"
            self.places.give()
            return
        try:
            job = _submit_with_patience(
                self.client,
                self.app,
                self.operation,
                self.input_name,
                p.file,
                self.params,
                self.patience,
            )
            item.job = job
            job.wait(timeout=self.timeout)
            item.state = job.state.value
            if not item.ok:
                item.error = job.error or f"job ended {item.state}"
        except TooManyRequests as exc:
            item.state, item.error = "refused", f"still refused after {self.patience:g} s: {exc}"
        except CsmlError as exc:
            self._failed(item, exc)
        except Exception as exc:  # a bug here must stop the batch, not hang it
            item.state, item.error = "failed", f"{type(exc).__name__}: {exc}"
            self.fatal.append(exc)
        self._finish(item)

    # -- outcomes -------------------------------------------------------------------

    def _failed(self, item: BatchItem, exc: CsmlError) -> None:
        """Record why `item` did not succeed; an error that concerns every item stops
        the batch."""
        if isinstance(exc, WaitTimeout):
            item.state, item.error = "timed_out", str(exc)
        elif isinstance(exc, ITEM_ERRORS):
            item.state, item.error = "refused", str(exc)
        elif isinstance(exc, NotFound):  # the app or operation is gone: no item can run
            item.state, item.error = "failed", str(exc)
            self.fatal.append(exc)
        else:
            item.state, item.error = "failed", str(exc)
            if exc.status is None or exc.status in (401, 403):
                self.fatal.append(exc)

    def _finish(self, item: BatchItem) -> None:
        try:
            self._report(item)
        finally:
            self.places.give()

    def _report(self, item: BatchItem) -> None:
        """`on_done`, one call at a time; what it raises stops the batch and is raised."""
        with self.done_lock:
            if self.on_done is not None:
                try:
                    self.on_done(item)
                except Exception as exc:
                    self.fatal.append(exc)


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
