"""What the SDK's httpx requests (`Client.request`) do when their connection breaks before
an answer comes, against a real socket: a loopback server reads each request and drops
the connection without answering the first `drops` of them, as a coordinator closing a
kept-alive connection just as a request goes out does (or httpcore's pool closing a
connection under the thread it handed it to, encode/httpcore#1110). A GET is sent once
more and gets its answer; a POST is never resent (it may have been applied); a GET that
breaks twice is the coordinator's failure and says so."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from csml.client import Client
from csml.client.errors import Unreachable


class DroppingServer:
    """Answers `{"ok": true}` to each request, except that it closes the connection of the
    first `drops` requests once it has read their head, answering nothing."""

    def __init__(self, drops: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.drops = drops
        self.requests: list[bytes] = []  # each request's first line, in order
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                self.requests.append(head.split(b"\r\n", 1)[0])
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(data) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data[length:]
                if self.drops > 0:
                    self.drops -= 1
                    return  # closed with the request unanswered
                body = b'{"ok": true}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def server() -> Iterator[DroppingServer]:
    made = DroppingServer(drops=1)
    yield made
    made.close()


def test_a_get_whose_connection_breaks_is_sent_once_more(server: DroppingServer) -> None:
    with Client(server.url, insecure_http=True) as client:
        response = client.request("GET", "/v1/jobs/abc")
    assert response.json() == {"ok": True}
    assert server.requests == [b"GET /v1/jobs/abc HTTP/1.1"] * 2


def test_a_post_whose_connection_breaks_is_not_resent(server: DroppingServer) -> None:
    with (
        Client(server.url, insecure_http=True) as client,
        pytest.raises(Unreachable, match="RemoteProtocolError"),
    ):
        client.request("POST", "/v1/jobs", json={"app": "echo"})
    assert server.requests == [b"POST /v1/jobs HTTP/1.1"]


def test_a_get_that_breaks_twice_is_unreachable(server: DroppingServer) -> None:
    server.drops = 2
    with (
        Client(server.url, insecure_http=True) as client,
        pytest.raises(Unreachable, match="cannot reach the coordinator"),
    ):
        client.request("GET", "/v1/apps")
    assert server.requests == [b"GET /v1/apps HTTP/1.1"] * 2


def test_every_connection_the_pool_may_open_is_kept_while_idle() -> None:
    """No idle connection is ever 'surplus' (httpcore closes surplus idle connections
    without regard to a request it has just assigned one to), and idle ones are let go
    before the coordinator's 5 s keep-alive."""
    with Client("http://127.0.0.1:9", insecure_http=True) as client:
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        assert pool._max_keepalive_connections == pool._max_connections
        assert pool._keepalive_expiry < 5.0
