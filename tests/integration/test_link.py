"""The keep-alive link (csml.link): round trips, a connection the server dropped while idle,
close() from another thread, bounded bodies."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import h11
import pytest

from csml import link as link_module
from csml.link import HttpxLink, Link, LinkError, open_link
from tests.integration.keepalive import Answer, KeepAliveServer, serving


def _answer(srv: KeepAliveServer, path: str, body: bytes, port: int) -> Answer:
    """Echo the body and the client's port; `/slow` waits for the server's release."""
    if path.endswith("/slow"):
        srv.release.wait(10)
    return 201, {}, json.dumps({"echo": json.loads(body), "peer": port}).encode()


@pytest.fixture
def server() -> Iterator[KeepAliveServer]:
    with serving(_answer) as srv:
        yield srv


def _url(srv: KeepAliveServer) -> str:
    return f"{srv.url}/prefix"


def test_a_round_trip_keeps_its_connection(server: KeepAliveServer) -> None:
    link = Link(_url(server), None, timeout=5)
    first = link.post("/a", b'{"n":1}', {"Authorization": "Bearer t"})
    second = link.post("/b", b'{"n":2}', {"Authorization": "Bearer t"})
    assert (first.status_code, first.is_error) == (201, False)
    assert first.headers["content-type"] == "application/json"
    assert first.json()["echo"] == {"n": 1} and second.json()["echo"] == {"n": 2}
    assert server.connections == 1  # kept alive
    assert [(p, a) for p, a, _ in server.seen] == [
        ("/prefix/a", "Bearer t"),
        ("/prefix/b", "Bearer t"),
    ]
    link.close()


def test_a_connection_the_server_closed_is_replaced_before_it_is_used(
    server: KeepAliveServer,
) -> None:
    link = Link(_url(server), None, timeout=5)
    assert link.post("/bye", b"{}", {}).status_code == 201
    time.sleep(0.2)  # the server has closed its end
    assert link.post("/a", b"{}", {}).status_code == 201
    assert server.connections == 2
    assert [p for p, _, _ in server.seen] == ["/prefix/bye", "/prefix/a"]  # each sent once
    link.close()


def test_close_ends_a_call_blocked_in_a_read_and_every_later_call(server: KeepAliveServer) -> None:
    link = Link(_url(server), None, timeout=30)
    failures: list[BaseException] = []

    def call() -> None:
        try:
            link.post("/slow", b"{}", {})
        except LinkError as exc:
            failures.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    while not server.seen:
        time.sleep(0.01)
    start = time.monotonic()
    link.close()
    thread.join(5)
    assert not thread.is_alive() and len(failures) == 1
    assert time.monotonic() - start < 5
    with pytest.raises(LinkError, match="closed"):
        link.post("/a", b"{}", {})


def test_nothing_listening_is_a_link_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LinkError):
        Link(f"http://127.0.0.1:{port}", None, timeout=2).post("/a", b"{}", {})


def test_an_answer_over_the_bound_is_refused(
    server: KeepAliveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link_module, "MAX_BODY", 10)
    link = Link(_url(server), None, timeout=5)
    with pytest.raises(LinkError, match="over 10"):
        link.post("/a", b'{"n":1}', {})
    monkeypatch.setattr(link_module, "MAX_BODY", 1 << 20)
    assert link.post("/a", b"{}", {}).status_code == 201  # usable again, a new connection
    assert server.connections == 2


def test_https_needs_its_tls_context() -> None:
    with pytest.raises(ValueError, match="TLS context"):
        Link("https://127.0.0.1:1", None, timeout=1)


def test_a_coordinator_behind_a_proxy_is_reached_through_httpx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    assert isinstance(open_link("http://coordinator:8600", True, 5), Link)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert isinstance(open_link("http://coordinator:8600", True, 5), HttpxLink)
    monkeypatch.setenv("NO_PROXY", "coordinator")
    assert isinstance(open_link("http://coordinator:8600", True, 5), Link)


class _Raw:
    """A loopback server answering each request with canned bytes, sent in pieces; a
    client that closes its connection gets the next answers on its next one."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        todo = list(self.answers)
        while todo:
            conn, _ = self.sock.accept()
            self.connections += 1
            with conn:
                try:
                    while todo and self._answer(conn, todo):
                        pass
                except OSError:
                    pass  # the client left this connection: on to its next one

    def _answer(self, conn: socket.socket, todo: list[list[bytes]]) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            got = conn.recv(4096)
            if not got:
                return False
            data += got
        head, _, body = data.partition(b"\r\n\r\n")
        named = head.lower().split(b"content-length: ")
        length = int(named[1].split(b"\r\n")[0]) if len(named) > 1 else 0
        while len(body) < length:
            body += conn.recv(4096)
        self.requests.append(data)
        for piece in todo.pop(0):
            conn.sendall(piece)
            time.sleep(0.01)
        return True


def test_answers_in_pieces_chunked_and_after_an_informational_one() -> None:
    raw = _Raw(
        [
            [
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Le",
                b'ngth: 7\r\n\r\n{"a"',
                b":1}",
            ],
            [
                b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n",
                b'3;x=y\r\n{"b\r\n4\r\n":2}\r\n0\r\nTrailer: t\r\n\r\n',
            ],
            [b"HTTP/1.1 204 No Content\r\n\r\n"],
        ]
    )
    link = Link(raw.url, None, timeout=5)
    first = link.post("/a", b'{"n":1}', {"Authorization": "Bearer t"})
    assert (first.status_code, first.json()) == (200, {"a": 1})
    second = link.post("/b", b"{}", {})
    assert (second.status_code, second.json(), second.headers["x-a"]) == (202, {"b": 2}, "b")
    assert link.post("/c", b"{}", {}).content == b""
    # One connection, and each request went in one piece: head and body.
    assert raw.requests[0].startswith(b"POST /a HTTP/1.1\r\nHost: 127.0.0.1:")
    assert raw.requests[0].endswith(b'\r\nAuthorization: Bearer t\r\n\r\n{"n":1}')
    link.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"SMTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_a_malformed_answer_is_a_link_error(answer: bytes) -> None:
    link = Link(_Raw([[answer]]).url, None, timeout=5)
    with pytest.raises(LinkError):
        link.post("/a", b"{}", {})


def test_a_header_that_would_split_the_request_is_refused_before_sending() -> None:
    raw = _Raw([])
    link = Link(raw.url, None, timeout=5)
    with pytest.raises(LinkError, match="invalid header"):
        link.post("/a", b"{}", {"Authorization": "Bearer t\r\nX-Evil: 1"})
    assert raw.requests == []


def test_a_stream_comes_as_sent_and_keeps_its_connection_only_once_it_ended() -> None:
    """`Link.stream` (the SDK's result stream): the body as it arrives, of any length;
    a stream left before its end drops its connection; an error answer reads whole."""
    raw = _Raw(
        [
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"6\r\nevent:\r\n",
                b"3\r\n a\n\r\n0\r\n\r\n",
            ],
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
                b"6\r\nsecond\r\n",
            ],
            [b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"],
        ]
    )
    link = Link(raw.url, None, timeout=5)
    status, chunks = link.stream("/events?a=1", {"Authorization": "Bearer t"})
    assert (status, list(chunks)) == (200, [b"event:", b" a\n"])
    status, chunks = link.stream("/events", {})
    assert (status, next(chunks)) == (200, b"first")
    chunks.close()  # left before its end: that connection cannot serve another request
    status, chunks = link.stream("/events", {})
    assert (status, b"".join(chunks)) == (503, b"busy")
    assert raw.connections == 2
    assert raw.requests[0].startswith(b"GET /events?a=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert raw.requests[0].endswith(b"\r\nAuthorization: Bearer t\r\n\r\n")
    link.close()


def test_h11_writes_each_distinct_head_once_and_a_link_keeps_few(
    server: KeepAliveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same request again goes out as the same bytes without h11 writing its head
    anew; a body of another length too (its Content-Length is added to the kept head);
    a new token is a new head; at most HEADS are kept."""
    written: list[str] = []
    request = h11.Request

    def counted(**kw: Any) -> h11.Request:
        written.append(str(kw["target"]))
        return request(**kw)

    monkeypatch.setattr(h11, "Request", counted)
    monkeypatch.setattr(link_module, "HEADS", 3)
    link = Link(_url(server), None, timeout=5)
    for body, token in (
        (b'{"n":1}', "a"),
        (b'{"n":2}', "a"),
        (b'{"n":10}', "a"),
        (b'{"n":1000}', "a"),
        (b'{"n":1}', "b"),
        (b'{"n":1}', "c"),
        (b'{"n":1}', "d"),
        (b'{"n":10}', "a"),
    ):
        answer = link.post("/a", body, {"Authorization": f"Bearer {token}"})
        assert answer.json()["echo"] == json.loads(body)
    # One head per token, whatever the length; a's was dropped for d's, and made again.
    assert written == ["/prefix/a", "/prefix/a", "/prefix/a", "/prefix/a", "/prefix/a"]
    assert len(link._heads) == 3
    link.close()


def test_a_result_stream_behind_a_proxy_asks_for_its_link_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind a proxy the stream follows through httpx; its reconnections (about every
    20 s) do not build and drop an httpx client each to learn that again."""
    from csml.client import results
    from csml.client.sdk import Client

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    made: list[object] = []

    def counted(*args: Any) -> object:
        made.append(open_link(*args))
        return made[-1]

    monkeypatch.setattr(results, "open_link", counted)
    client = Client("http://127.0.0.1:9", "t" * 43, insecure_http=True)
    stream = results.ResultStream(client)
    assert [stream._link_to_follow() for _ in range(3)] == [None, None, None]
    assert len(made) == 1 and isinstance(made[0], HttpxLink)
    client.close()
