"""What the SDK's httpx requests (`Client.request`) do when their connection breaks before
an answer comes, against a real socket: a loopback server reads each request and drops
the connection without answering the first `drops` of them, as a coordinator closing a
kept-alive connection just as a request goes out does (or httpcore's pool closing a
connection under the thread it handed it to, encode/httpcore#1110). A GET is sent once
more and gets its answer; a POST is never resent (it may have been applied); a GET that
breaks twice is the coordinator's failure and says so."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from csml.client import Client
from csml.client.errors import Unreachable


class DroppingServer(ThreadingHTTPServer):
    """Answers `{"ok": true}` to each request, except that it closes the connection of the
    first `drops` requests once it has read them, answering nothing."""

    daemon_threads = True

    def __init__(self, drops: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.drops = drops
        self.requests: list[bytes] = []  # each request's first line, in order
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: DroppingServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append(self.requestline.encode())
        if self.server.drops > 0:
            self.server.drops -= 1
            self.close_connection = True  # closed with the request unanswered
            return
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


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
