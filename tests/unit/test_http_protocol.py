"""The coordinator's HTTP protocol (`csml.cli.http_protocol`): an answer's head and body
leave in one write; nothing is lost or reordered, a head is held at most one turn of the
loop and nothing else is held."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from csml.cli.http_protocol import JOIN_BYTES, CoalescingHttpToolsProtocol, CoalescingTransport


class FakeTransport:
    """What the socket got: one entry per write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.pieces: list[list[bytes]] = []  # what each write handed over, uncopied
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))
        self.pieces.append([data])

    def writelines(self, pieces: list[bytes]) -> None:
        assert not self.closed
        self.writes.append(b"".join(pieces))
        self.pieces.append(list(pieces))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_head_waits_for_its_body_of_the_same_turn_and_leaves_with_it() -> None:
    async def main() -> None:
        real = FakeTransport()
        t = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        head = b"HTTP/1.1 200 OK\r\n\r\n"
        t.write(head)
        assert real.writes == []  # held: a body may follow in this turn
        assert t.get_write_buffer_size() == len(head)
        t.write(bytearray(b"body"))
        assert real.writes == [head + b"body"]  # at once, together
        assert t.get_write_buffer_size() == 0
        t.write(head)
        await turns()
        assert real.writes[-1] == head  # no body came in its turn: sent when the turn ended
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        t.write(b"")  # an empty body still sends the head at once
        assert real.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n"

    asyncio.run(main())


def test_a_write_that_is_not_a_head_leaves_at_once_in_order() -> None:
    """A streamed chunk (an event of the result stream) is not held for the end of the
    turn: it would leave after whatever else the turn writes (another answer)."""

    async def main() -> None:
        real = FakeTransport()
        t = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        t.write(b"2a\r\nevent: job\r\n")
        assert real.writes == [b"2a\r\nevent: job\r\n"]  # at once, not at the turn's end
        t.write(b"")
        t.write(b"next")
        assert real.writes == [b"2a\r\nevent: job\r\n", b"next"]
        await turns()
        assert real.writes == [b"2a\r\nevent: job\r\n", b"next"]
        assert t.get_write_buffer_size() == 0

    asyncio.run(main())


def test_a_large_body_leaves_with_its_head_in_one_write_without_a_copy() -> None:
    async def main() -> None:
        real = FakeTransport()
        t = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        head, body = b"HTTP/1.1 200 OK\r\n\r\n", bytes(JOIN_BYTES)
        t.write(head)
        t.write(body)
        assert real.writes == [head + body]  # one write, at once
        (handed,) = real.pieces
        assert handed[0] is head and handed[1] is body  # the objects themselves
        t.write(b"HTTP/1.1 200 small head")
        t.write(b"small body")
        assert real.pieces[-1] == [b"HTTP/1.1 200 small headsmall body"]  # joined: cheaper

    asyncio.run(main())


def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        real = FakeTransport()
        t = CoalescingTransport(real, loop)  # type: ignore[arg-type]
        t.write(b"HTTP/1.1 200 last words")
        t.close()
        assert real.writes == [b"HTTP/1.1 200 last words"] and real.closed
        t.write(b"after close")
        await turns()
        assert real.writes == [b"HTTP/1.1 200 last words"]  # dropped, as asyncio's drops it

        other = FakeTransport()
        t = CoalescingTransport(other, loop)  # type: ignore[arg-type]
        t.write(b"HTTP/1.1 200 never sent")
        t.abort()
        await turns()
        assert other.writes == [] and other.aborted

    asyncio.run(main())


def serve_one(app: Any, request: bytes) -> FakeTransport:
    """`request` through the coordinator's protocol on a fake socket; what it wrote."""

    async def main() -> FakeTransport:
        config = uvicorn.Config(app, log_config=None, lifespan="off")
        config.load()
        protocol = CoalescingHttpToolsProtocol(config, ServerState(), {})
        real = FakeTransport()
        protocol.connection_made(real)  # type: ignore[arg-type]
        protocol.data_received(request)
        for _ in range(50):
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return real

    return asyncio.run(main())


def test_an_answer_is_one_write_with_its_head_and_body() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("hello " * 100)(scope, receive, send)

    real = serve_one(app, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(real.writes) == 1
    head, _, body = real.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 600" in head
    assert body == b"hello " * 100


def test_a_streamed_answer_still_leaves_chunk_by_chunk() -> None:
    async def chunks() -> Any:
        for n in range(3):
            yield f"event {n}\n"
            await asyncio.sleep(0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await StreamingResponse(chunks())(scope, receive, send)

    real = serve_one(app, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    wire = b"".join(real.writes)
    assert wire.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in wire
    assert wire.endswith(b"0\r\n\r\n")
    assert all(f"event {n}".encode() in wire for n in range(3))
    assert len(real.writes) >= 3  # not held until the end
