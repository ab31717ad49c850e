"""Streaming multipart parsing for job submissions.

Each file part goes straight to disk through a hashing writer, so memory use
does not grow with the upload, and the size limit answers 413 as soon as it is
crossed. The `spec` part is checked as soon as it has arrived (send it first),
so a refused job costs no upload.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from csml.coordinator.errors import ApiError
from csml.coordinator.queue import StagedFile
from csml.store.blobs import HashingWriter, TooLarge, check_name, fsync_paths

MAX_SPEC_BYTES = 256 * 1024
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


class _Part:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.name: str | None = None
        self.is_file = False
        self.media_type = "application/octet-stream"
        self.buffer = bytearray()
        self.writer: HashingWriter | None = None


class SubmissionParser:
    """Feeds request chunks to python-multipart, keeping the `spec` and streaming files."""

    def __init__(self, boundary: bytes, staging: Path, file_limit: int) -> None:
        self.staging = staging
        self.file_limit = file_limit
        self.spec: bytes | None = None
        self.files: dict[str, StagedFile] = {}
        self._part: _Part | None = None
        self._field = b""
        self._value = b""
        self.error: ApiError | None = None
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

    def abort(self) -> None:
        if self._part is not None and self._part.writer is not None:
            self._part.writer.abort()

    # python-multipart callbacks -------------------------------------------

    def _begin(self) -> None:
        self._part = _Part()

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _hend(self) -> None:
        assert self._part is not None
        self._part.headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field = self._value = b""

    def _headers_done(self) -> None:
        part = self._part
        assert part is not None
        _, options = parse_options_header(part.headers.get("content-disposition", ""))
        raw_name = options.get(b"name")
        part.name = raw_name.decode("utf-8", "replace") if raw_name else None
        part.is_file = part.name != "spec"
        part.media_type = safe_media_type(part.headers.get("content-type", ""))
        if part.name is None:
            self._fail(422, "invalid_multipart", "a form part has no name", "body")
        elif part.is_file:
            try:
                check_name(part.name)
            except ValueError:
                self._fail(
                    422,
                    "unknown_input",
                    f"form part {part.name[:64]!r} is neither `spec` nor an input file name",
                    part.name[:64],
                )
                return
            if part.name in self.files:
                self._fail(422, "duplicate_input", f"input {part.name!r} sent twice", part.name)
                return
            part.writer = HashingWriter(self.staging / part.name, self.file_limit)

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None or self.error is not None:
            return
        chunk = data[start:end]
        if part.writer is not None:
            try:
                part.writer.write(chunk)
            except TooLarge as exc:
                self._fail(
                    413,
                    "file_too_large",
                    f"input {part.name!r} is larger than the limit of {exc.limit} bytes",
                    part.name,
                )
        elif not part.is_file:
            part.buffer += chunk
            if len(part.buffer) > MAX_SPEC_BYTES:
                self._fail(413, "spec_too_large", "the spec part is over 256 KiB", "spec")

    def _end(self) -> None:
        part = self._part
        self._part = None
        if part is None or self.error is not None:
            if part is not None and part.writer is not None:
                part.writer.abort()
            return
        if part.writer is not None and part.name is not None:
            digest = part.writer.finish(sync=False)
            self.files[part.name] = StagedFile(
                name=part.name,
                path=part.writer.path,
                size=part.writer.size,
                sha256=digest,
                media_type=part.media_type,
            )
        elif not part.is_file:
            self.spec = bytes(part.buffer)

    def _fail(self, status: int, code: str, message: str, field: str | None) -> None:
        if self.error is None:
            self.error = ApiError(status, code, message, field=field)
        if self._part is not None and self._part.writer is not None:
            self._part.writer.abort()
            self._part.writer = None


def malformed(exc: Exception) -> ApiError:
    return ApiError(
        400,
        "invalid_multipart",
        f"the multipart body is malformed ({exc}); send a `spec` part and one part per file",
        field="body",
    )


def boundary_of(request: Request) -> bytes:
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the job as multipart/form-data: a `spec` JSON part, then one part per input file",
            field="content-type",
        )
    return boundary


async def parse_submission(
    request: Request,
    staging: Path,
    file_limit: int,
    on_spec: Callable[[bytes], Awaitable[None]],
) -> SubmissionParser:
    """Stream the request into `staging`; `on_spec` may refuse as soon as the spec is in."""
    parser = SubmissionParser(boundary_of(request), staging, file_limit)
    checked = False
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if not checked and parser.spec is not None:
                checked = True
                await on_spec(parser.spec)
        await run_in_threadpool(parser.finalize)
    except BaseException:
        parser.abort()
        raise
    if parser.spec is None:
        raise ApiError(422, "missing_spec", "the form has no `spec` part", field="spec")
    if not checked:
        await on_spec(parser.spec)
    await run_in_threadpool(fsync_paths, [f.path for f in parser.files.values()])
    return parser
