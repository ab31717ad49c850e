"""The coordinator's HTTP/1.1 protocol: uvicorn's httptools protocol, one write per answer.

uvicorn writes an answer's head (status line and headers) in one `transport.write`
and its body in another, so every answer costs two `send` system calls, and on
loopback two deliveries that each wake the reader (the head alone wakes a client that
then waits again for the body). `CoalescingTransport` holds an answer's head (a write
that starts with the status line, `HTTP/`) until the next write or the end of the
loop's turn (`loop.call_soon`), whichever comes first: the head and a body sent
together (`Response`: `http.response.start` then `http.response.body` with no await
between them) leave in one `send`, when the body is written, without waiting. Any
other write (a body, a streamed chunk: an event of `GET /v1/jobs/events`) leaves at
once, with the head if one is held: nothing else is known to follow it in the turn,
and holding it would send it after whatever else the turn does (an event held so
went out after the answer of the request whose commit made it: a job's result
reached its client that much later).

Invariants:
- Bytes go out in the order they were written, and nothing written is lost: `close()`
  writes what is held before closing (asyncio's transport itself sends what it buffered
  before closing); `abort()` drops it, as asyncio's does its own buffer.
- Only a head is held, for at most one turn of the loop, and only while nothing
  follows it: the next write sends both at once. A streamed body (events, a file)
  leaves chunk by chunk, each chunk when it is written.
- What is held is not copied to be sent: pieces of at least `JOIN_BYTES` together go to
  the real transport's `writelines` (one vectored write with uvloop, which keeps what
  the socket did not take as views of the same objects), smaller ones are joined (a
  copy cheaper than a vector).
- Flow control is the real transport's: `get_write_buffer_size` counts what is held, and
  the real transport calls the protocol's `pause_writing`/`resume_writing` as before.
- Everything else (`get_extra_info`, reading, `set_protocol` for an upgrade) is the
  real transport's.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

JOIN_BYTES = 16 * 1024
"""Held pieces at least this large together are handed over as a list, not joined."""
HEAD = b"HTTP/"
"""How an answer's head (its status line) starts: the only write held."""


class CoalescingTransport(asyncio.Transport):
    """A transport that sends what is written in one loop turn with one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` now, with what is held; but an answer's head (nothing held) is held
        until the turn ends: its body (even empty) takes it along at once."""
        chunk = data if isinstance(data, bytes) else bytes(data)
        if self._held:
            self._held.append(chunk)
            self._held_bytes += len(chunk)
            self._flush()
        elif chunk.startswith(HEAD):
            self._held.append(chunk)
            self._held_bytes += len(chunk)
            self._loop.call_soon(self._flush)
        elif chunk and not self._transport.is_closing():
            self._transport.write(chunk)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        if not self._held:
            return
        held, size = self._held, self._held_bytes
        self._held, self._held_bytes = [], 0
        if self._transport.is_closing():
            return  # as asyncio's write after close: dropped
        if len(held) == 1:
            self._transport.write(held[0])
        elif size >= JOIN_BYTES:
            self._transport.writelines(held)  # a large body: no copy to join it to its head
        else:
            self._transport.write(b"".join(held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._held_bytes = [], 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held_bytes

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a `CoalescingTransport`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not `asyncio.Transport` subclasses: duck-typed.
        real = cast(asyncio.Transport, transport)
        super().connection_made(CoalescingTransport(real, self.loop))
