"""Streaming multipart parsing for job submissions (and model imports).

Invariants:
- Each file part goes straight to disk through a hashing writer, so memory use
  does not grow with the upload; nothing is kept in memory but the `spec` part
  (at most `max_spec_bytes`) and file parts of at most `keep_bytes` (to be kept in
  the database): a part is held in memory while it stays within that bound and goes
  to a staged file (its folder made then) as soon as it passes it (`MemoryFirst`).
- The `spec` part comes first, and is checked as soon as it has arrived, before
  any file part: a refused job costs no upload. The check names the file parts
  the spec takes; a part with any other name (or a second `spec`, or a file
  before the spec) is refused at its headers, before a byte of it is stored.
- Limits answer as soon as they are passed, without reading the rest: the
  per-file limit and the per-request total (`TooLarge`, 413), the number of parts
  (`TooLarge`), and the identity's stored-bytes quota (`QuotaExceeded`, 429), charged
  with the bytes actually received, chunked or not (`Content-Length` is never trusted:
  a small submission's budget takes at most `SMALL_SUBMISSION_BYTES` unchecked, its
  job's write checks them; past them it looks at the store as any upload's does).
- Parsing runs off the event loop until the spec is checked (the check reads the
  store) and whenever a charge may have to look at the store (`Budget.covers`); the
  chunks between (file bytes already within the budget: hashing and page-cache writes)
  are parsed on the loop, at most `LOOP_BYTES` of files per request, so a usual upload
  costs no thread-pool hop per chunk. A small submission (`SMALL_SUBMISSION_BYTES`,
  `parse_submission(spec_on_loop=True)`) is parsed on the loop from its first byte:
  its spec check and its charge then read no store (the job's write checks it). The
  fsync of the files stays off the loop.
- No web framework here: a request is anything with headers and a streamed body
  (`StreamedBody`).
- Refusals are `csml.refusals` kinds; a refusal raised by the spec check or the
  charge is kept and raised once the parser returns (the part being written is
  discarded first), any other error propagates as it is.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from csml import refusals
from csml.coordinator import abuse
from csml.coordinator.staged_inputs import StagedFile
from csml.refusals import Invalid, Malformed, Refusal, UnsupportedMedia
from csml.store.blobs import BlobStore, HashingWriter, TooLarge, check_name, fsync_paths

if TYPE_CHECKING:
    from csml.coordinator.config import Settings
    from csml.coordinator.state import Core

BINARY = {"type": "string", "format": "binary"}


def multipart_body(
    spec_description: str, files: dict[str, Any] | None = None, json_ref: str | None = None
) -> dict[str, Any]:
    """OpenAPI `requestBody` of a streamed form: a JSON `spec` part first, then files
    (`files` names them; otherwise any part name is a file)."""
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["spec", *(files or {})],
        "properties": {
            "spec": {"type": "string", "description": spec_description},
            **(files or {}),
        },
    }
    if files is None:
        schema["additionalProperties"] = BINARY
    content: dict[str, Any] = {"multipart/form-data": {"schema": schema}}
    if json_ref is not None:
        content["application/json"] = {"schema": {"$ref": json_ref}}
    return {"requestBody": {"required": True, "content": content}}


_MEDIA_TYPE = re.compile(r"^[\w.+-]+/[\w.+-]+$")


def safe_media_type(value: str) -> str:
    value = value.split(";")[0].strip().lower()
    return value if _MEDIA_TYPE.match(value) and len(value) <= 100 else "application/octet-stream"


@dataclass(frozen=True)
class FormLimits:
    file_bytes: int
    request_bytes: int
    parts: int
    spec_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> FormLimits:
        return cls(
            file_bytes=settings.max_upload_bytes,
            request_bytes=settings.max_request_bytes,
            parts=settings.max_form_parts,
            spec_bytes=settings.max_spec_bytes,
        )


@dataclass(frozen=True)
class Accepts:
    """The file parts a checked spec takes, and the refusal of any other part name."""

    names: Collection[str]
    refusal: Callable[[str], Exception]


# Checks the spec (raising a Refusal) and answers the file parts it takes.
SpecCheck = Callable[[bytes], Accepts]
# Charged with the bytes of files received so far; raises a Refusal past a quota.
Charge = Callable[[int], None]

LOOP_BYTES = 8 * 1024 * 1024
"""Bytes of files per request at most parsed (hashed and written) on the event loop;
the rest of a larger upload goes through the thread pool, chunk by chunk, as before."""

SMALL_SUBMISSION_BYTES = 1 << 20
"""A multipart submission announcing (`Content-Length`) at most this many bytes is
checked as a JSON one is: no early read of the store before its body (the job's own
write checks the identity, its window and quotas, race-free), its bytes charged without
a look at the store up to this bound (`StorageBudget.unchecked`; past it, a look, as for
any upload, whatever the header said), its whole body parsed on the event loop. A
refused one has cost at most this much reading, as a JSON spec costs `max_spec_bytes`."""


class Budget(Protocol):
    """A `Charge` that can say, without looking at the store, that it would accept
    `received` bytes (so charging them may run on the event loop)."""

    def __call__(self, received: int) -> None: ...

    def covers(self, received: int) -> bool: ...


class StorageBudget:
    """An identity's stored-bytes quota, charged as an upload streams.

    Looks at the store only when the bytes received pass what was left at the
    last look (so once per upload that fits); `extra` is what the submission keeps
    besides its files (its params). `used`: the identity's stored bytes as the
    submission's early check just read them (`abuse.precheck_submission`), taken for
    the first look when the upload fits in what they leave (counted once, used twice:
    a refusal still looks, to say when the quota resets). `unchecked`: bytes accepted
    without any look when `used` is not known (a small submission, whose job's write
    checks the quota race-free: `SMALL_SUBMISSION_BYTES`); past them, the look."""

    def __init__(
        self,
        core: Core,
        owner_id: str,
        extra: int = 0,
        used: int | None = None,
        unchecked: int = 0,
    ) -> None:
        self.core = core
        self.owner_id = owner_id
        self.extra = extra
        self.used = used
        self.unchecked = unchecked
        self.left: int | None = None

    def covers(self, received: int) -> bool:
        """Whether charging `received` bytes is settled without a look at the store."""
        limit = self.core.settings.max_stored_bytes
        if not limit:
            return True
        if self.left is None:
            if self.used is None:
                return self.unchecked > 0 and received <= self.unchecked
            return self.used < limit and self.used + self.extra + received <= limit
        return received <= self.left

    def __call__(self, received: int) -> None:
        limit = self.core.settings.max_stored_bytes
        if not limit or (self.left is not None and received <= self.left):
            return
        if self.left is None and self.covers(received):
            if self.used is not None:
                self.left = limit - self.used - self.extra
            return
        with self.core.sessions() as session:
            used = abuse.stored_bytes(session, self.owner_id)  # counted once, used twice
            abuse.check_storage(self.core, session, self.owner_id, received + self.extra, used)
            self.left = limit - used - self.extra


class MemoryFirst:
    """A file part's writer: its bytes are held in memory while they are at most `keep`
    (hashed once complete); past that, they go to a `HashingWriter` at `path` (its
    staging folder made if missing) with the rest. Either way at most `limit` bytes
    (`TooLarge`). With `keep` 0 the file is made at once, as a `HashingWriter`'s."""

    def __init__(self, path: Path, limit: int, keep: int) -> None:
        self.path = path
        self.limit = limit
        self.keep = keep
        self.size = 0
        self._buffer = bytearray()
        self._file: HashingWriter | None = None
        if keep <= 0:
            self._spill()

    @property
    def content(self) -> bytes | None:
        """The bytes, if held in memory (None: they are in the file at `path`)."""
        return None if self._file is not None else bytes(self._buffer)

    def _spill(self) -> None:
        BlobStore.make_staging(self.path.parent)
        self._file = HashingWriter(self.path, self.limit)
        if self._buffer:
            self._file.write(bytes(self._buffer))
            self._buffer = bytearray()

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            upto = self.size + len(chunk)
            if upto > self.limit:
                raise TooLarge(self.limit)
            if upto <= self.keep:
                self.size = upto
                self._buffer += chunk
                return
            self._spill()
        assert self._file is not None
        self._file.write(chunk)
        self.size = self._file.size

    def finish(self) -> str:
        """The sha256; a file is closed (not fsync'd: `_settle` does that)."""
        if self._file is not None:
            return self._file.finish(sync=False)
        return hashlib.sha256(self._buffer).hexdigest()

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
        self._buffer = bytearray()


class _Part:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.name: str | None = None
        self.is_file = False
        self.media_type = "application/octet-stream"
        self.buffer = bytearray()
        self.writer: MemoryFirst | None = None


class SubmissionParser:
    """Feeds request chunks to python-multipart, keeping the `spec` and streaming files."""

    def __init__(
        self,
        boundary: bytes,
        staging: Path,
        limits: FormLimits,
        on_spec: SpecCheck,
        charge: Charge | Budget | None = None,
        keep_bytes: int = 0,
        spec_on_loop: bool = False,
    ) -> None:
        self.staging = staging
        self.spec_on_loop = spec_on_loop  # `on_spec` reads no store: it may run on the loop
        self.keep_bytes = keep_bytes  # file parts held in memory up to this size
        self.limits = limits
        self.on_spec = on_spec
        self.charge = charge
        self.spec: bytes | None = None
        self.accepted: Accepts | None = None  # file parts the spec takes
        self.files: dict[str, StagedFile] = {}
        self.parts = 0
        self.received = 0  # bytes of files, all parts together
        self._part: _Part | None = None
        self._field = b""
        self._value = b""
        self.error: Exception | None = None
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._begin,
                "on_header_field": self._hfield,
                "on_header_value": self._hvalue,
                "on_header_end": self._hend,
                "on_headers_finished": self._headers_done,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise malformed(exc) from None
        if self.error is not None:
            raise self.error

    def finalize(self) -> None:
        try:
            self._parser.finalize()
        except FormParserError as exc:
            raise malformed(exc) from None
        if self.error is not None:
            raise self.error

    def on_loop(self, chunk: int) -> bool:
        """Whether the next `chunk` bytes may be parsed on the event loop: the spec is
        checked (or its check may run on the loop: `spec_on_loop`), nothing was refused,
        the files so far and the chunk stay within `LOOP_BYTES`, and the charge (if any)
        is a `Budget` that covers them."""
        if (self.accepted is None and not self.spec_on_loop) or self.error is not None:
            return False
        upto = self.received + chunk
        if upto > LOOP_BYTES:
            return False
        if self.charge is None:
            return True
        covers = getattr(self.charge, "covers", None)
        return covers is not None and bool(covers(upto))

    def abort(self) -> None:
        if self._part is not None and self._part.writer is not None:
            self._part.writer.abort()
            self._part.writer = None

    # python-multipart callbacks -------------------------------------------

    def _begin(self) -> None:
        self._part = _Part()
        self.parts += 1
        if self.parts > self.limits.parts:
            self._fail(
                refusals.TooLarge,
                "too_many_parts",
                f"the form has more than {self.limits.parts} parts (CSML_MAX_FORM_PARTS): "
                "send a `spec` part and one part per input file",
                "body",
            )

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        if len(self._field) + end - start > 1024:
            self._fail(Malformed, "invalid_multipart", "a form part's header is too long", "body")
            return
        self._field += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        if len(self._value) + end - start > 4096:
            self._fail(Malformed, "invalid_multipart", "a form part's header is too long", "body")
            return
        self._value += data[start:end]

    def _hend(self) -> None:
        part = self._part
        assert part is not None
        if len(part.headers) < 16:
            part.headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field = self._value = b""

    def _headers_done(self) -> None:
        part = self._part
        if part is None or self.error is not None:
            return
        _, options = parse_options_header(part.headers.get("content-disposition", ""))
        raw_name = options.get(b"name")
        part.name = raw_name.decode("utf-8", "replace") if raw_name else None
        part.is_file = part.name != "spec"
        part.media_type = safe_media_type(part.headers.get("content-type", ""))
        if part.name is None:
            self._fail(Invalid, "invalid_multipart", "a form part has no name", "body")
        elif not part.is_file:
            if self.spec is not None:
                self._fail(Invalid, "duplicate_spec", "the form has two `spec` parts", "spec")
        elif self.accepted is None:
            self._fail(
                Invalid,
                "spec_not_first",
                f"form part {part.name[:64]!r} came before the `spec` part; send the spec first",
                "spec",
            )
        elif part.name not in self.accepted.names:
            self._fail_with(self.accepted.refusal(part.name[:64]))
        elif part.name in self.files:
            self._fail(Invalid, "duplicate_input", f"input {part.name!r} sent twice", part.name)
        else:
            try:
                check_name(part.name)
            except ValueError:
                self._fail(
                    Invalid,
                    "unknown_input",
                    f"{part.name[:64]!r} is not a file name",
                    part.name[:64],
                )
                return
            part.writer = MemoryFirst(
                self.staging / part.name, self.limits.file_bytes, self.keep_bytes
            )

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None or self.error is not None:
            return
        chunk = data[start:end]
        if part.writer is not None:
            self.received += len(chunk)
            if self.received > self.limits.request_bytes:
                self._fail(
                    refusals.TooLarge,
                    "request_too_large",
                    f"the files of this request are over {self.limits.request_bytes} bytes "
                    "together (CSML_MAX_REQUEST_BYTES)",
                    part.name,
                )
                return
            try:
                if self.charge is not None:
                    self.charge(self.received)
                part.writer.write(chunk)
            except TooLarge as exc:
                self._fail(
                    refusals.TooLarge,
                    "file_too_large",
                    f"input {part.name!r} is larger than the limit of {exc.limit} bytes",
                    part.name,
                )
            except Refusal as exc:
                self._fail_with(exc)
        elif not part.is_file:
            part.buffer += chunk
            if len(part.buffer) > self.limits.spec_bytes:
                self._fail(
                    refusals.TooLarge,
                    "spec_too_large",
                    f"the spec part is over {self.limits.spec_bytes} bytes (CSML_MAX_SPEC_BYTES)",
                    "spec",
                )

    def _end(self) -> None:
        part = self._part
        self._part = None
        if part is None or self.error is not None:
            if part is not None and part.writer is not None:
                part.writer.abort()
            return
        if part.writer is not None and part.name is not None:
            digest = part.writer.finish()
            content = part.writer.content
            self.files[part.name] = StagedFile(
                name=part.name,
                path=part.writer.path if content is None else None,
                size=part.writer.size,
                sha256=digest,
                media_type=part.media_type,
                content=content,
            )
        elif not part.is_file:
            self.spec = bytes(part.buffer)
            try:
                self.accepted = self.on_spec(self.spec)
            except Refusal as exc:
                self._fail_with(exc)

    def _fail(self, kind: type[Refusal], code: str, message: str, field: str | None) -> None:
        self._fail_with(kind(code, message, field=field))

    def _fail_with(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if self._part is not None and self._part.writer is not None:
            self._part.writer.abort()
            self._part.writer = None


def malformed(exc: Exception) -> Malformed:
    return Malformed(
        "invalid_multipart",
        f"the multipart body is malformed ({exc}); send a `spec` part and one part per file",
        field="body",
    )


class StreamedBody(Protocol):
    """What parsing reads of a request: its headers and its body as it streams (an
    ASGI framework's request, e.g. Starlette's, is one)."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    def stream(self) -> AsyncIterator[bytes]: ...


def boundary_of(request: StreamedBody) -> bytes:
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UnsupportedMedia(
            "unsupported_media_type",
            "send the job as multipart/form-data: a `spec` JSON part, then one part per input file",
            field="content-type",
        )
    return boundary


async def parse_submission(
    request: StreamedBody,
    staging: Path,
    limits: FormLimits,
    on_spec: SpecCheck,
    charge: Charge | Budget | None = None,
    before: Callable[[], None] | None = None,
    keep_bytes: int = 0,
    spec_on_loop: bool = False,
) -> SubmissionParser:
    """Stream the request into `staging` (a folder made, if not there yet, by the first
    file that goes to disk). `on_spec` (run off the event loop, as soon as
    the spec part is in) checks the spec and names the file parts it takes; `charge`
    may refuse as the files' bytes arrive. Chunks after the spec's check are parsed on
    the event loop while `SubmissionParser.on_loop` allows it (a chunk's bytes count
    whole: a file part's data never exceeds the chunk it came in). `before` (an early
    check that may refuse) runs off the loop before a byte of the body is parsed, in
    the same hop as the first chunk. A file of at most `keep_bytes` stays in memory
    (`StagedFile.content`, no staged file: to be kept in the database,
    `csml.store.blobs`); the others are fsync'd, off the loop. With `spec_on_loop`
    (`on_spec` reads no store, and `charge` looks at it only past what it `covers`: a
    small submission, `SMALL_SUBMISSION_BYTES`), chunks are parsed on the loop from the
    first, the spec's check with them: no thread-pool hop for a body within the budget."""
    parser = SubmissionParser(
        boundary_of(request),
        staging,
        limits,
        on_spec,
        charge,
        keep_bytes=keep_bytes,
        spec_on_loop=spec_on_loop,
    )
    pending = before

    def first(chunk: bytes) -> None:
        assert pending is not None
        pending()
        parser.write(chunk)

    try:
        async for chunk in request.stream():
            if pending is not None:
                await anyio.to_thread.run_sync(first, chunk)
                pending = None
            elif parser.on_loop(len(chunk)):
                parser.write(chunk)
            else:
                await anyio.to_thread.run_sync(parser.write, chunk)
        if pending is not None:  # no body at all: the check still comes first
            await anyio.to_thread.run_sync(pending)
        if parser.accepted is not None or spec_on_loop:  # no store read left: flushes, closes
            parser.finalize()
        else:
            await anyio.to_thread.run_sync(parser.finalize)
    except BaseException:
        parser.abort()
        raise
    if parser.spec is None:
        raise Invalid("missing_spec", "the form has no `spec` part", field="spec")
    on_disk = [f.path for f in parser.files.values() if f.path is not None]
    if on_disk:
        await anyio.to_thread.run_sync(fsync_paths, on_disk)
    return parser
