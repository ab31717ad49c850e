"""The HTTP answer of a job file kept in the database (`csml.store.blobs.in_db`).

`BlobResponse` is a `FileResponse` whose bytes are in memory (the row's `content`), so
a file kept in the database is served as one on disk is: the same status, the same
headers (content type and length, `content-disposition` when named, `accept-ranges`,
`last-modified` and an `etag` made as Starlette makes them from a time and the size,
and whatever the route adds, e.g. `X-Content-SHA256`), HEAD and byte ranges alike.

Invariants:
- Never a path: nothing here opens a file, and `http.response.pathsend` (which names a
  file for the server to send) is never used; the whole body is sent in one message
  (it is at most `Settings.db_blob_max_bytes`), ranges are read from memory.
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
from starlette.types import Send


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

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        yield anyio.AsyncFile(io.BytesIO(self.content))

    async def _handle_simple(self, send: Send, send_header_only: bool, send_pathsend: bool) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        body = b"" if send_header_only else self.content
        await send({"type": "http.response.body", "body": body, "more_body": False})
