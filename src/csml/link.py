"""A keep-alive JSON-over-HTTP/1.1 connection for the per-job calls to the coordinator.

The worker agent claims and completes jobs many times a second; through httpx's
client each call cost ~2.4x the CPU of the same call over the standard library's
`http.client` (measured against a coordinator on loopback: 795 vs 331 µs of client
CPU per claim), and `http.client` itself spends much of the rest parsing headers
with the `email` package and writing a request in two system calls. A `Link` is one
connection to the coordinator on a plain socket: each request is written by `h11` (the
HTTP/1.1 library httpx itself uses) and sent in one write (head and body); answers are
parsed by `httptools` (llhttp, in C; the parser uvicorn serves the coordinator with):
Content-Length, chunked or up to the close; informational answers skipped; the head
bounded by `MAX_HEAD`. h11's state machine took about a hundred Python calls per
answer, httptools a handful. It is used by one thread at a time (the agent's claimer,
or the thread sending completions alone; an SDK submit; an SDK result stream, which
follows one long answer through `Link.stream`); everything else the agent sends
(registration, heartbeats, file transfers) stays on httpx.

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
- Bodies are bounded: a response over `MAX_BODY` bytes is a `LinkError` (not a
  stream's, which the caller bounds); so is a malformed answer (httptools'
  `HttpParserError`: not HTTP/1, a bad header, length or chunk) or a protocol switch.
  A header name or value h11 will not send (CR, LF, controls: it could split
  the request) is refused before anything is sent.
- A connection is reused only when the answer ended and says the connection may go on
  (keep-alive), and nothing was read past it; a stream left before its end is dropped.
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
from collections.abc import Generator, Iterator
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11
import httptools
import httpx

MAX_BODY = 64 << 20
HEADS = 64  # request heads a link keeps, each written by h11 once
ZERO_LENGTH = b"\r\nContent-Length: 0\r\n"  # in a kept POST head, where the length goes


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


JSON = "application/json"


class Poster(Protocol):
    def post(
        self, path: str, content: bytes, headers: dict[str, str], content_type: str = JSON
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

    def post(
        self, path: str, content: bytes, headers: dict[str, str], content_type: str = JSON
    ) -> httpx.Response:
        return self._http.post(
            path, content=content, headers={**headers, "Content-Type": content_type}
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
        self._heads: dict[tuple[str, str, tuple[tuple[str, str], ...]], bytes] = {}

    def post(
        self, path: str, content: bytes, headers: dict[str, str], content_type: str = JSON
    ) -> LinkResponse:
        """POST `content` (JSON, unless `content_type` says otherwise: an SDK's multipart
        submission) to `path`; the answer, whatever its status."""
        fields = (
            ("Host", self._host_header),
            ("Content-Type", content_type),
            ("Content-Length", "0"),
            *headers.items(),
        )
        # The kept head is written with length 0 (a claim's or a batch's body differs in
        # length from call to call): the body's goes in its place, the first such line
        # (after Host and Content-Type: a header value holds no CR or LF).
        before, _, after = self._head("POST", path, fields).partition(ZERO_LENGTH)
        head = b"%s\r\nContent-Length: %d\r\n%s" % (before, len(content), after)
        wire = self._connection()
        try:
            status, answer_headers, body = wire.exchange(head, content)
            if not wire.reusable():
                self._drop(wire)
            return LinkResponse(status, body, answer_headers)
        except (OSError, ValueError, h11.ProtocolError) as exc:
            self._drop(wire)
            if isinstance(exc, LinkError):
                raise
            raise LinkError(f"{type(exc).__name__}: {exc}") from None

    def stream(
        self, path: str, headers: dict[str, str], accept: str = "text/event-stream"
    ) -> tuple[int, Generator[bytes, None, None]]:
        """GET `path` (with its query) and follow the answer as it comes: its status
        and an iterator of its body's bytes, which ends with the answer. No bound on
        the whole body (a stream has no end in sight: the caller bounds what it keeps);
        its head is bounded as a POST's is. The link serves nothing else until the
        iterator ends; a failure while reading raises LinkError from the iterator.
        `accept`: the result stream's events by default; an SDK download asks `*/*`."""
        fields = (("Host", self._host_header), ("Accept", accept), *headers.items())
        head = self._head("GET", path, fields)
        wire = self._connection()
        try:
            status, pieces = wire.stream(head)
        except (OSError, ValueError, h11.ProtocolError) as exc:
            self._drop(wire)
            if isinstance(exc, LinkError):
                raise
            raise LinkError(f"{type(exc).__name__}: {exc}") from None
        return status, self._follow(wire, pieces)

    def _head(self, method: str, path: str, fields: tuple[tuple[str, str], ...]) -> bytes:
        """The request's head as h11 writes it (validated: a header h11 will not send is a
        LinkError, before anything is sent). Written once per distinct head and kept: a
        link sends the same few heads (the same path and token; a POST's length is added
        to the kept head, `post`) again and again; at most `HEADS` are kept, the oldest
        dropped first."""
        key = (method, path, fields)
        head = self._heads.get(key)
        if head is None:
            try:
                request = h11.Request(method=method, target=self._prefix + path, headers=[*fields])
            except h11.LocalProtocolError as exc:
                raise LinkError(f"invalid header: {exc}") from None
            head = h11.Connection(h11.CLIENT).send(request) or b""
            if len(self._heads) >= HEADS:
                del self._heads[next(iter(self._heads))]
            self._heads[key] = head
        return head

    def _follow(self, wire: _Wire, pieces: Iterator[bytes]) -> Generator[bytes, None, None]:
        ended = False
        try:
            yield from pieces
            ended = wire.reusable()
        except (OSError, ValueError) as exc:
            if isinstance(exc, LinkError):
                raise
            raise LinkError(f"{type(exc).__name__}: {exc}") from None
        finally:
            if not ended:  # a stream left early, or failed: its connection is in no state to go on
                self._drop(wire)

    def readable(self, timeout: float) -> bool:
        """Whether a followed stream's next piece (or its end) can be had within `timeout`
        seconds: bytes already read (with the answer's head, or past its end) or bytes to
        read; True when there is no connection (the next read then fails at once). So a
        thread that follows a stream can wait here, bounded, before it reads on: the
        stream's iterator then gives what `recv` got (`_Wire._body`) without waiting."""
        with self._lock:
            conn = self._conn
        if conn is None:
            return True
        answer = conn.answer
        if answer is not None and (answer.body or answer.done):
            return True  # read with the head (or the answer's end): no need to wait
        sock = conn.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes waiting in the TLS layer: select cannot see them
        try:
            ready, _, _ = select.select([sock], [], [], max(0.0, timeout))
        except (OSError, ValueError):
            return True
        return bool(ready)

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
    """One socket: one request and its answer at a time. h11 writes each request (a
    fresh client state machine per request: it only serialises); httptools (llhttp, in
    C: the parser uvicorn serves the coordinator with) reads the answer, at a few
    Python calls per answer where h11's state machine took about a hundred."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.keep = False  # the last answer let the connection go on (`reusable`)
        self.answer: _Answer | None = None  # the streamed answer (`Link.readable`)

    def exchange(self, head: bytes, content: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send `head` (as h11 wrote it, with its Content-Length) and `content` in one
        write; the answer's status, headers (by lower-case name) and body. Raises
        LinkError if malformed or over the bounds, OSError if the connection fails."""
        answer = self._send(head + content)
        while not answer.done:
            if not self._read(answer):
                break  # the end of a body that runs to the close
        self.keep = answer.keep and answer.done and not answer.trailing
        return answer.status, answer.headers, b"".join(answer.body)

    def stream(self, head: bytes) -> tuple[int, Iterator[bytes]]:
        """Send `head` (a request with no body); once its answer's head is in, its status
        and an iterator of its body's bytes as they come."""
        answer = self.answer = self._send(head, bounded=False)
        while not answer.head_done:
            if not self._read(answer):
                break
        return answer.status, self._body(answer)

    def _body(self, answer: _Answer) -> Iterator[bytes]:
        while True:
            if answer.body:
                piece = b"".join(answer.body)
                answer.body.clear()
                yield piece
            if answer.done or not self._read(answer):
                break
        self.keep = answer.keep and answer.done and not answer.trailing

    def _send(self, request: bytes, bounded: bool = True) -> _Answer:
        self.keep = False
        self.sock.sendall(request)  # one write: the server gets the request in one read
        answer = _Answer(bounded)
        answer.parser = httptools.HttpResponseParser(answer)
        return answer

    def _read(self, answer: _Answer) -> bool:
        """Read once into `answer`; False at a close that ends a body running to it.
        Raises LinkError on a malformed answer, a broken bound, or an early close."""
        assert answer.parser is not None
        data = self.sock.recv(READ_SIZE)
        if not data:
            if answer.until_close:  # no length given: the body ends with the connection
                return False
            raise LinkError("the connection closed before the whole answer")
        try:
            answer.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise LinkError("the coordinator switched protocols") from None
        except httptools.HttpParserError as exc:
            if not answer.done:
                raise LinkError(f"a malformed answer: {exc}") from None
            answer.trailing = True  # bytes past the answer that are no answer
        if answer.over is not None:
            raise LinkError(answer.over)
        if not answer.head_done:
            answer.fed += len(data)
            if answer.fed > MAX_HEAD:
                raise LinkError(f"an answer's head over {MAX_HEAD} bytes")
        return True

    def reusable(self) -> bool:
        """Both sides may go on (keep-alive) and nothing was read past the answer."""
        return self.keep


class _Answer:
    """httptools' callbacks for one answer: informational (1xx) answers are skipped; the
    final one's status, headers (lower-case names; a repeated name keeps its last value,
    as before), body and whether the connection may be reused."""

    __slots__ = (
        "body",
        "bounded",
        "done",
        "fed",
        "head_done",
        "headers",
        "keep",
        "over",
        "parser",
        "size",
        "status",
        "trailing",
        "until_close",
    )

    def __init__(self, bounded: bool = True) -> None:
        self.bounded = bounded  # the whole body within MAX_BODY (not for a stream)
        self.fed = 0  # bytes read before the final answer's head ended
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.head_done = False  # the final answer's head has ended
        self.until_close = False  # its body runs to the connection's close
        self.done = False
        self.keep = False
        self.trailing = False  # something followed the final answer
        self.over: str | None = None  # a bound it broke

    def on_message_begin(self) -> None:
        if self.done:
            self.trailing = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done:
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.done:
            return
        assert self.parser is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # informational: its message ends here, the final answer follows
        self.status, self.head_done = status, True
        length = self.headers.get("content-length")
        if self.bounded and length is not None and length.isdigit() and int(length) > MAX_BODY:
            self.over = f"a response of {length} bytes is over {MAX_BODY}"
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self.until_close = length is None and not chunked and status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        if self.done:
            return
        self.size += len(body)
        if self.bounded and self.size > MAX_BODY:
            self.over = f"a response over {MAX_BODY} bytes"
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.done:
            return
        assert self.parser is not None
        if not self.head_done:  # the end of an informational answer
            self.headers = {}
            return
        self.done = True
        self.keep = self.parser.should_keep_alive()


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
