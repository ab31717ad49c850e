"""A keep-alive JSON-over-HTTP/1.1 connection for the per-job calls to the coordinator.

The worker agent claims and completes jobs many times a second; through httpx's
client each call cost ~2.4x the CPU of the same call over the standard library's
`http.client` (measured against a coordinator on loopback: 795 vs 331 µs of client
CPU per claim), and `http.client` itself spends much of the rest parsing headers
with the `email` package and writing a request in two system calls. A `Link` is one
connection to the coordinator on a plain socket, spoken through `h11` (the HTTP/1.1
state machine httpx itself uses, without httpx's layers): each request is one write
(head and body); answers are parsed by h11 (Content-Length, chunked or up to the
close; informational answers skipped; the head bounded by `MAX_HEAD`). It is used by
one thread at a time (the agent's claimer, or the thread sending completions alone;
an SDK submit); everything else the agent sends (registration, heartbeats, file
transfers) stays on httpx.

Invariants:
- Same trust as the agent's httpx clients: `transport.check_url` already passed, and
  https uses the TLS context they use (the agent passes it: the pinning context of
  `transport.verify_option`, or httpx's default context for `verify=True`).
- A connection the server closed while idle (keep-alive timeout, restart) is
  noticed before it is reused (readable at rest means closed) and replaced; a request
  is never sent twice: a failure after sending is the caller's (its retry policy,
  as with httpx).
- Every failure to connect, send or read is `LinkError` (an `OSError`), and leaves
  no connection behind; `close()` from another thread ends a call blocked in a read
  at once (the socket is shut down), and every later call fails.
- Bodies are bounded: a response over `MAX_BODY` bytes is a `LinkError`; so is a
  malformed answer (h11's `RemoteProtocolError`: not HTTP/1, a bad header, length or
  chunk). A header name or value h11 will not send (CR, LF, controls: it could split
  the request) is refused before anything is sent.
- A connection is reused only when h11 says both sides may go on (keep-alive, nothing
  read past the answer).
- A coordinator that httpx would reach through a proxy (HTTP(S)_PROXY / ALL_PROXY in
  the environment, the host not in NO_PROXY) is reached through httpx, proxy and all
  (`open_link` returns an `HttpxLink` then): a link never bypasses a proxy.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import threading
import urllib.request
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11
import httpx

MAX_BODY = 64 << 20


class LinkError(OSError):
    """The call did not complete (connection refused, reset, timed out, closed)."""


class LinkResponse:
    """What a caller reads of an answer (a subset of httpx.Response); `headers` by
    lower-case name."""

    def __init__(
        self, status_code: int, content: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.status_code = status_code
        self.content = content
        self.headers = headers or {}

    @property
    def is_error(self) -> bool:
        return self.status_code >= 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class Poster(Protocol):
    def post(
        self, path: str, content: bytes, headers: dict[str, str]
    ) -> LinkResponse | httpx.Response: ...

    def close(self) -> None: ...


def open_link(base_url: str, verify: ssl.SSLContext | bool, timeout: float) -> Poster:
    """A `Link` to the coordinator, or an `HttpxLink` where httpx would use a proxy.
    `verify`: as for httpx (`transport.verify_option`); `timeout`: of each read."""
    if proxied(base_url):
        return HttpxLink(base_url, verify, timeout)
    context = None
    if urlsplit(base_url).scheme == "https":
        context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context()
    return Link(base_url, context, timeout)


def proxied(base_url: str) -> bool:
    """Whether a proxy from the environment applies to `base_url` (as httpx reads it)."""
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")  # NO_PROXY, on Linux


class HttpxLink:
    """The same calls through httpx (and so through its proxy settings)."""

    def __init__(self, base_url: str, verify: ssl.SSLContext | bool, timeout: float) -> None:
        self._http = httpx.Client(
            base_url=base_url, timeout=httpx.Timeout(30.0, read=timeout), verify=verify
        )

    def post(self, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
        return self._http.post(
            path, content=content, headers={**headers, "Content-Type": "application/json"}
        )

    def close(self) -> None:
        self._http.close()


class Link:
    def __init__(self, base_url: str, context: ssl.SSLContext | None, timeout: float) -> None:
        """`context`: the TLS context for an https URL (required then)."""
        parts = urlsplit(base_url)
        self._https = parts.scheme == "https"
        if self._https and context is None:
            raise ValueError("an https link needs its TLS context")
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        default = self._port == (443 if self._https else 80)
        self._host_header = host if default else f"{host}:{self._port}"
        self._timeout = timeout
        self._context = context
        self._conn: _Wire | None = None
        self._lock = threading.Lock()  # guards _conn and _closed against close()
        self._closed = False

    def post(self, path: str, content: bytes, headers: dict[str, str]) -> LinkResponse:
        """POST `content` (JSON) to `path`; the answer, whatever its status."""
        fields = [
            ("Host", self._host_header),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(content))),
            *headers.items(),
        ]
        try:
            request = h11.Request(method="POST", target=self._prefix + path, headers=fields)
        except h11.LocalProtocolError as exc:
            raise LinkError(f"invalid header: {exc}") from None
        wire = self._connection()
        try:
            status, answer_headers, body = wire.exchange(request, content)
            if not wire.reusable():
                self._drop(wire)
            return LinkResponse(status, body, answer_headers)
        except (OSError, ValueError, h11.ProtocolError) as exc:
            self._drop(wire)
            if isinstance(exc, LinkError):
                raise
            raise LinkError(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        """End the connection now (from any thread); later calls fail."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            _shut(conn.sock)

    def _connection(self) -> _Wire:
        """The open connection, or a new one, connected (so that `close()` can end it)."""
        with self._lock:
            if self._closed:
                raise LinkError("the link is closed")
            conn, stale = self._conn, None
            if conn is not None and _closed_at_rest(conn.sock):
                self._conn, stale, conn = None, conn, None
        if stale is not None:
            _shut(stale.sock)
        if conn is not None:
            return conn
        try:
            conn = _Wire(self._new())
        except (OSError, ValueError) as exc:
            raise LinkError(f"{type(exc).__name__}: {exc}") from None
        with self._lock:
            if not self._closed:
                self._conn = conn
                return conn
        _shut(conn.sock)
        raise LinkError("the link is closed")

    def _new(self) -> socket.socket:
        """A connected socket (TLS set up over https), as `http.client` makes it."""
        sock = socket.create_connection((self._host, self._port), self._timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                return self._context.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _drop(self, conn: _Wire) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
        _shut(conn.sock)


MAX_HEAD = 64 << 10
READ_SIZE = 1 << 16


class _Wire:
    """One socket and its h11 state: one request and its answer at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    def exchange(self, request: h11.Request, content: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send `request` with `content` in one write; its answer's status, headers (by
        lower-case name) and body. Raises LinkError over the bounds, h11.ProtocolError if
        malformed, OSError if the connection fails."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        send = self.h11.send
        wire = b"".join(
            b for b in (send(request), send(h11.Data(data=content)), send(h11.EndOfMessage())) if b
        )
        self.sock.sendall(wire)  # one write: the server gets the request in one read
        # Nothing is buffered between answers (`reusable`), so the answer needs a read:
        # do it before asking h11, which would only say NEED_DATA.
        self.h11.receive_data(self.sock.recv(READ_SIZE))  # b"" is the close
        status, headers = 0, {}
        body = bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(self.sock.recv(READ_SIZE))  # b"" is the close
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
                length = headers.get("content-length")
                if length is not None and int(length) > MAX_BODY:
                    raise LinkError(f"a response of {length} bytes is over {MAX_BODY}")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise LinkError(f"a response over {MAX_BODY} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise LinkError("the connection closed before the whole answer")
            # InformationalResponse (1xx): skipped; the final answer follows.

    def reusable(self) -> bool:
        """Both sides may go on (keep-alive) and nothing was read past the answer."""
        data, closed = self.h11.trailing_data
        return (
            self.h11.our_state is h11.DONE
            and self.h11.their_state is h11.DONE
            and not data
            and not closed
        )


def _closed_at_rest(conn: socket.socket) -> bool:
    """A connection between requests has nothing to read: if it is readable, the server
    closed it (or broke the protocol): either way, not reusable."""
    if isinstance(conn, ssl.SSLSocket) and conn.pending():
        return True
    try:
        readable, _, _ = select.select([conn], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _shut(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()
