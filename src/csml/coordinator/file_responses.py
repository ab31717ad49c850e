"""File answers of the job routes: a stored file (a job's output to its owner, a job's
input to its worker) read at once on the event loop and sent as one body (`WholeFile`),
and a file kept in the database sent from its row's bytes (`BlobResponse`).

Both answer a plain request (GET, no `Range`, status 200: `_plain`) with one body
sent at once, without the task group Starlette's `FileResponse` starts under ASGI
< 2.4 (uvicorn's httptools protocol says 2.3) to listen for a disconnect while a file
streams: a task created, a `receive` awaited and both cancelled, for a body that
leaves in one `send` (a disconnect during it ends that `send`, as for any other
answer). That is what Starlette itself does under ASGI 2.4. Any other request
(HEAD, ranges, a file that streams) is `FileResponse.__call__`'s, as before.

`WholeFile` invariants:
- Same headers and ranges as Starlette's `FileResponse` (it is one): only the plain
  answer (no range, not HEAD) of a file of at most `WHOLE_FILE_BYTES` is read at once;
  a larger file, or one whose size is not what was stat'ed, streams as before.
- Memory per answer is bounded by `WHOLE_FILE_BYTES` (plus one byte read to see that
  the file did not grow).
- The file's stat is the route's (on the loop, before the answer): without it the
  answer streams as `FileResponse` does (stat, open, reads and close in the thread pool).

`BlobResponse` (a file kept in the database, `csml.store.blobs.in_db`) is a
`FileResponse` whose bytes are in memory (the row's `content`), so it is served as a
file on disk is: the same status, the same headers (content type and length,
`content-disposition` when named, `accept-ranges`, `last-modified` and an `etag` made as
Starlette makes them from a time and the size, and whatever the route adds, e.g.
`X-Content-SHA256`), HEAD and byte ranges alike. Its invariants:
- Never a path: nothing opens a file, and `http.response.pathsend` (which names a file
  for the server to send) is never used; the whole body is sent in one message (it is
  at most `Settings.db_blob_max_bytes`), ranges are read from memory.
- The time standing for the file's modification (`modified`) is the caller's: the job's
  end for an output, its creation for an input (when a file would have been written).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
from starlette.responses import FileResponse
from starlette.types import Receive, Scope, Send

WHOLE_FILE_BYTES = 1 << 20
"""A file at most this large is read and sent in one piece by `WholeFile`."""


def _plain(response: FileResponse, scope: Scope) -> bool:
    """Whether the request is a plain GET of the whole file (no `Range`), answered 200,
    with nothing to run after it: one body, sent at once."""
    return (
        scope["type"] == "http"
        and scope["method"] == "GET"
        and response.status_code == 200
        and response.background is None
        and response.stat_result is not None
        and not any(k == b"range" for k, _ in scope.get("headers", ()))
    )


class WholeFile(FileResponse):
    """A `FileResponse` whose plain answer of a small file (at most `WHOLE_FILE_BYTES`) is
    read at once on the event loop and sent as one body, instead of opened, read in
    64 KiB chunks and closed in the thread pool (four hops for a 100 KB annotated photo
    or input image). Larger files stream as before."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = self.stat_result.st_size if self.stat_result is not None else None
        if size is not None and size <= WHOLE_FILE_BYTES and _plain(self, scope):
            await self._handle_simple(send, False, False)  # no disconnect listener: see above
            return
        await super().__call__(scope, receive, send)

    async def _handle_simple(self, send: Send, send_header_only: bool, send_pathsend: bool) -> None:
        size = self.stat_result.st_size if self.stat_result is not None else None
        if send_header_only or send_pathsend or size is None or size > WHOLE_FILE_BYTES:
            await super()._handle_simple(send, send_header_only, send_pathsend)
            return
        with open(self.path, "rb") as file:
            body = file.read(size + 1)
        if len(body) != size:  # not what was stat'ed: stream it as FileResponse would
            await super()._handle_simple(send, send_header_only, send_pathsend)
            return
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _stat(size: int, modified: float) -> os.stat_result:
    """What `os.stat` would say of a regular 0600 file of `size` bytes written at `modified`."""
    return os.stat_result((stat.S_IFREG | 0o600, 0, 0, 1, 0, 0, size, modified, modified, modified))


class BlobResponse(FileResponse):
    """A `FileResponse` of bytes kept in the database (see the module docstring)."""

    def __init__(
        self,
        content: bytes,
        name: str,
        modified: float,
        *,
        media_type: str,
        filename: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            name,  # never opened: for messages only
            media_type=media_type,
            filename=filename,
            headers=headers,
            stat_result=_stat(len(content), modified),
        )
        self.content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _plain(self, scope):
            await self._handle_simple(send, False, False)  # no disconnect listener: see above
            return
        await super().__call__(scope, receive, send)

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        yield anyio.AsyncFile(io.BytesIO(self.content))

    async def _handle_simple(self, send: Send, send_header_only: bool, send_pathsend: bool) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        body = b"" if send_header_only else self.content
        await send({"type": "http.response.body", "body": body, "more_body": False})
