"""A small HTTP/1.1 keep-alive server on loopback for tests of `csml.link` and of the SDK's
pooled links: it counts the connections it accepted, records every POST (path,
Authorization, body) and answers what its `answer` function returns."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Answer = tuple[int, dict[str, str], bytes]
"""Status, extra headers, JSON body."""
Responder = Callable[["KeepAliveServer", str, bytes, int], Answer]
"""(server, path, body, client port) -> the answer."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: KeepAliveServer

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append((self.path, self.headers["Authorization"], body))
        status, headers, answer = self.server.answer(
            self.server, self.path, body, self.client_address[1]
        )
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        if self.path.endswith("/bye"):
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


class KeepAliveServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answer: Responder) -> None:
        """`answer(server, path, body, client port)`: what to send back."""
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer = answer
        self.seen: list[tuple[str, str, bytes]] = []
        self.connections = 0
        self.release = threading.Event()  # what a slow answer may wait for

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def serving(answer: Responder) -> Iterator[KeepAliveServer]:
    srv = KeepAliveServer(answer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
