"""One result stream per `Client`, shared by every `Job.wait()`.

The coordinator pushes each change of the caller's jobs on `GET /v1/jobs/events`
(server-sent events). A `ResultStream`, opened by the first `Job.wait`, reads it and
hands each job's newest view to the threads waiting for it; waiting a thousand jobs
costs one connection, not a thousand long-polls.

Who reads: over the client's own link (`csml.link`, the usual case) the waiting
threads themselves (`take`), one at a time: a waiter that finds nobody reading reads
until its own view (or LOST, RECHECK) comes, handing every other view to its waiter,
then leaves the reading to a waiter still waiting (`TURN`, one wake-up). A lone waiter
(a client that submits and waits, one job at a time) so reads its job's end with no
thread to wake (`bench/client_cost.py`: half the SDK's context switches per job; a
wake-up is costly on a VM). Nothing
is read while nobody waits: the events wait in the socket (and then in the
coordinator's flow control) for the next waiter. Through httpx (a proxy) one daemon
thread reads and hands every view over, as before.

Invariants:
- At most one connection per stream, and at most one thread reading it; reconnects
  when the server ends it (`reconnect`, about every 20 s), at once with its own reader
  thread, else when a waiter next reads. Every (re)connection starts a new *generation*.
- A waiter that reads waits for bytes at most until its own deadline (`Link.readable`:
  nothing is read ahead of what was handled, `_Feed` parses chunk by chunk), and when
  it stops reading while others wait, one of them is woken to read on: no waiter waits
  for a stream that nobody reads.
- A waiter never misses its job's end. It registers before looking, then takes the
  newest view the stream holds for its job (the last `RECENT` job ids are kept), and
  re-reads the job once (GET) unless the stream has covered it without a gap: the
  same connection was up before the job was submitted (`mark` before the POST) and
  no kept view was dropped since. After each reconnection every waiter whose job the
  new snapshot does not show re-reads once; the snapshot (taken after the stream
  follows the jobs' changes) lists twice as many of the newest jobs as are waited
  for, so a batch's items in flight are seen in it, with no GET each.
- A waiter that hears nothing for `SAFETY_SECONDS` re-reads its job: a bug or a lost
  frame delays a result, never hangs a wait.
- When the stream cannot be opened (429: too many streams for the identity, an
  error, a coordinator without it) or drops, waiters go back to long-polling; it is
  not tried again for `RETRY_SECONDS`.
- A line or an event's data over `MAX_EVENT_BYTES` drops the stream (waiters long-poll):
  a hostile or broken coordinator cannot grow the client's memory without bound.
- Only views are kept, never the token; the views of at most `RECENT` jobs. Outputs
  that came inline with a view (asked with `want_inline`) are kept apart, for at most
  `RECENT_INLINE_BYTES` in all (the oldest go first: their jobs download them).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx

from csml.link import Link, open_link

if TYPE_CHECKING:
    from csml.client.sdk import Client

log = logging.getLogger("csml.client.results")

RECENT = 4096
RECENT_INLINE_BYTES = 32 << 20  # base64 of inline outputs kept for waiters not yet registered
SAFETY_SECONDS = 30.0  # a waiter that heard nothing for this long re-reads its job
RETRY_SECONDS = 30.0
SNAPSHOT_MOST = 500  # most jobs a snapshot may list (`GET /v1/jobs/events?limit=`)
OPEN_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # the coordinator sends a keep-alive comment more often than this
MAX_EVENT_BYTES = 16 << 20  # one line or one event's data; a longer one drops the stream
LOST = "lost"  # to a waiter: the stream is gone, long-poll
RECHECK = "recheck"  # to a waiter: events may have been missed, re-read once
TURN = "turn"  # to a waiter (never returned by `take`): nobody reads the stream, read it

Mark = tuple[int, int]
Item = dict[str, Any] | str


class ResultStream:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._cond = threading.Condition()
        self._state = "idle"  # idle -> connecting -> connected -> (connecting | failed)
        self._generation = 0
        self._dropped = 0  # kept views dropped from `_recent` so far
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._recent_inline: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._inline_kept = 0  # bytes in `_recent_inline`
        self.inline_outputs = 0  # asked of the coordinator: outputs up to this size inline
        self.progress = False  # asked of the coordinator: every change, not only ends
        self._every_change = False  # the current connection sends every change
        self._waiters: dict[str, list[queue.SimpleQueue[Item]]] = {}
        self._retry_at = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None  # the reader thread (httpx only)
        # Followed over a link (`_by_waiters`): read by the waiting threads themselves, one
        # at a time (`_lead`); the others wait in their inbox (`_following`).
        self._by_waiters: bool | None = None  # decided when first opened
        self._lead = False
        self._following: list[queue.SimpleQueue[Item]] = []
        self._chunks: Generator[bytes, None, None] | None = None  # the followed body
        self._feed = _Feed()
        self._ready: deque[tuple[str, dict[str, Any]]] = deque()  # read, not yet handled
        self._response: httpx.Response | None = None
        self._link: Link | None = None
        self._via_httpx = False  # open_link chose httpx (a proxy): not asked again

    # -- used by Job --------------------------------------------------------

    def mark(self) -> Mark | None:
        """Where the stream is now (take it before submitting); None if not connected."""
        with self._cond:
            return (self._generation, self._dropped) if self._state == "connected" else None

    def open(self) -> bool:
        """Start the reader if needed and wait until it is connected; False if it cannot be
        (the caller long-polls)."""
        if self._by_waiters is None:
            self._by_waiters = self._link_to_follow() is not None
        with self._cond:
            if self._closed:
                return False
            if self._state == "failed" and time.monotonic() >= self._retry_at:
                self._state = "idle"
            if not self._by_waiters:
                if self._state == "idle":
                    self._state = "connecting"
                    self._thread = threading.Thread(
                        target=self._run, name="csml-results", daemon=True
                    )
                    self._thread.start()
                self._cond.wait_for(lambda: self._state != "connecting", OPEN_TIMEOUT)
                return self._state == "connected"
            # Followed by the waiters: this thread connects (and reads the snapshot) unless
            # another one reads now; then it waits for that one to say how it went.
            deadline = time.monotonic() + OPEN_TIMEOUT
            while self._state in ("idle", "connecting") and self._lead:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    break
            if self._state not in ("idle", "connecting") or self._lead:
                return self._state == "connected"
            self._lead = True
            if self._state == "idle":
                self._state = "connecting"
        self._read_as_lead(None, deadline)
        with self._cond:
            return self._state == "connected"

    def want_inline(self, most: int) -> None:
        """Ask for outputs of at most `most` bytes inline with the `job` events of jobs that
        succeed (`Job.download` then needs no request). From the next connection on: a
        stream already connected gets them after its next reconnect (about 20 s)."""
        with self._cond:
            self.inline_outputs = max(self.inline_outputs, most)

    def want_progress(self) -> bool:
        """Ask for every change of the jobs (submitted, running, progress), not only their
        ends, from the next connection on; whether the stream (as it is connected now, or
        will connect) sends them. A waiter that reports progress long-polls while not."""
        with self._cond:
            self.progress = True
            return self._every_change or self._state not in ("connected", "connecting")

    def register(
        self, job_id: str, mark: Mark | None
    ) -> tuple[queue.SimpleQueue[Item], dict[str, Any] | None, bool]:
        """A queue of `job_id`'s views (and LOST/RECHECK), the newest view kept, and
        whether the stream has seen every change of the job since `mark`."""
        inbox: queue.SimpleQueue[Item] = queue.SimpleQueue()
        with self._cond:
            self._waiters.setdefault(job_id, []).append(inbox)
            covered = self._state == "connected" and mark == (self._generation, self._dropped)
            latest = self._recent.get(job_id)
            kept = self._recent_inline.get(job_id)
            if latest is not None and kept is not None:
                latest = {**latest, "inline_outputs": kept[0]}
            return inbox, latest, covered

    def take(self, inbox: queue.SimpleQueue[Item], timeout: float) -> Item | None:
        """The next item for `inbox` (a view of its job, LOST or RECHECK) within `timeout`
        seconds; None if none came. Over a link, the stream is read by the waiting threads
        themselves: while no other thread reads it, this one does (handing every view read
        to its waiter) until its own item comes, then leaves it to one of the waiters
        still waiting (`TURN`). One waiter alone thus reads its job's end itself, with no
        thread to wake; with httpx (a proxy), the reader thread hands everything over."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                item = _poll(inbox)
                if item is not None:
                    self._pass_turn()
                    return item
                lead = bool(self._by_waiters) and not self._lead and self._state != "failed"
                if lead:
                    self._lead = True
                else:
                    self._following.append(inbox)
            if lead:
                item = self._read_as_lead(inbox, deadline)
                if item is not None or time.monotonic() >= deadline:
                    return item
                continue  # the stream failed: LOST is in the inbox (or came meanwhile)
            try:
                item = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
            finally:
                with self._cond:
                    self._following.remove(inbox)
            if item != TURN:
                with self._cond:
                    self._pass_turn()
                return item

    def _read_as_lead(self, inbox: queue.SimpleQueue[Item] | None, deadline: float) -> Item | None:
        """(the thread that took `_lead`) `_read`, then give the reading up, to a waiter
        still waiting if any; the item `inbox` got meanwhile, if any."""
        try:
            self._read(inbox, deadline)
        finally:
            with self._cond:
                self._lead = False
                item = _poll(inbox) if inbox is not None else None
                self._pass_turn()
        return item

    def _pass_turn(self) -> None:
        """(caller holds the lock) Nobody reads the stream: wake a waiter to read it (and
        an `open` waiting for the reader to connect, to connect itself)."""
        if self._by_waiters and not self._lead:
            if self._following:
                self._following[0].put(TURN)
            if self._state == "connecting":
                self._cond.notify_all()

    def _read(self, inbox: queue.SimpleQueue[Item] | None, deadline: float) -> None:
        """(the reading thread, `_lead`) Read and handle events until `inbox` has an item
        (without one: until connected), the deadline passes, or the stream fails (then
        every waiter gets LOST). Connects when not connected."""
        try:
            while time.monotonic() < deadline and not self._closed:
                if inbox is not None and not inbox.empty():
                    return
                if inbox is None and self._state != "connecting":
                    return  # opened (or failed): the opener's question is answered
                if self._ready:
                    name, data = self._ready.popleft()
                    if not self._handle(name, data):
                        self._ended()
                    continue
                link = self._link
                if self._chunks is None or link is None:
                    self._connect()
                    continue
                if not link.readable(deadline - time.monotonic()):
                    return
                try:
                    chunk = next(self._chunks)
                except StopIteration:  # the server ended the stream: connect again
                    self._ended()
                    continue
                self._ready.extend(self._feed.feed(chunk))
            if self._closed:
                raise RuntimeError("the result stream is closed")
        except Exception as exc:  # refused, dropped, or a bad frame: long-poll instead
            self._ended()
            if not self._closed:
                log.info("result stream unavailable, long-polling instead: %s", exc)
            self._failed()

    def _connect(self) -> None:
        """(the reading thread) Open the stream on the link; its events are read later."""
        link = self._link_to_follow()
        if link is None:
            raise RuntimeError("no link to follow the stream on")
        with self._cond:
            self._state = "connecting"
        status, chunks = link.stream(
            f"/v1/jobs/events?{urlencode(self._params())}", self._client._headers()
        )
        if status != 200:
            with contextlib.closing(chunks):
                text = b"".join(itertools.islice(chunks, 4))[:200].decode("utf-8", "replace")
            raise RuntimeError(f"HTTP {status}: {text}")
        self._chunks, self._feed = chunks, _Feed()
        self._ready.clear()

    def _ended(self) -> None:
        """(the reading thread) The followed answer is over, or left: drop what is left
        of it (the link drops a connection left early); a gap starts."""
        chunks, self._chunks = self._chunks, None
        self._ready.clear()
        if chunks is not None:
            with contextlib.suppress(Exception):
                chunks.close()
        with self._cond:
            self._gap()

    def _gap(self) -> None:
        """(caller holds the lock) The connection is over: a gap starts, so marks taken
        before it are stale (a waiter registered then re-reads its job)."""
        if self._state == "connected":
            self._state = "connecting"
            self._generation += 1

    def unregister(self, job_id: str, inbox: queue.SimpleQueue[Item]) -> None:
        with self._cond:
            inboxes = self._waiters.get(job_id, [])
            if inbox in inboxes:
                inboxes.remove(inbox)
            if not inboxes:
                self._waiters.pop(job_id, None)

    def close(self) -> None:
        """Stop following. The connection is shut down, not just closed: the reader thread
        blocked in `recv` wakes at once and the coordinator sees the stream end now (a
        stream left open would hold the coordinator's graceful shutdown)."""
        with self._cond:
            self._closed = True
            response, link = self._response, self._link
        if link is not None:
            link.close()  # shuts its socket down: a read blocked on it ends at once
        if response is not None:
            stream = response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            response.close()

    # -- the reader thread --------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed:
                self._read_once()  # returns when the server ends the stream
        except Exception as exc:  # refused, dropped, or a bad frame: long-poll instead
            if not self._closed:
                log.info("result stream unavailable, long-polling instead: %s", exc)
            self._failed()

    def _failed(self) -> None:
        """The stream cannot be followed: every waiter long-polls, for `RETRY_SECONDS`."""
        with self._cond:
            self._state = "failed"
            self._retry_at = time.monotonic() + RETRY_SECONDS
            self._generation += 1
            self._response = None
            self._cond.notify_all()
            self._broadcast(LOST)

    def _params(self) -> dict[str, str | int]:
        """The query of a new connection."""
        with self._cond:
            # The snapshot lists the identity's newest jobs: as many as twice the jobs
            # waited for now, so that a batch's items in flight (its newest) are in it and
            # their waiters need no re-read after a reconnection (a GET each, every ~20 s).
            newest = min(SNAPSHOT_MOST, max(1, 2 * len(self._waiters)))
        params: dict[str, str | int] = {"limit": newest, "positions": "false"}
        with self._cond:
            # Ends only, unless a waiter reports progress: a waiter needs nothing else (a
            # coordinator without the option ignores it and sends every change).
            self._every_change = self.progress
        if not self._every_change:
            params["ended_only"] = "true"
        if self.inline_outputs:
            params["inline_outputs"] = self.inline_outputs
        return params

    def _read_once(self) -> None:
        """(the reader thread: the stream goes through httpx) One connection, until the
        server ends it."""
        self._follow_httpx(self._params())
        with self._cond:
            self._response = None
            self._gap()

    def _link_to_follow(self) -> Link | None:
        """The stream's own keep-alive link (`csml.link`), kept across reconnections; None
        where the SDK uses httpx for it (a custom transport, a proxy)."""
        options = self._client._link_options
        if options is None or self._via_httpx:
            return None
        with self._cond:
            if self._link is None and not self._closed:
                made = open_link(self._client.url, options[0], READ_TIMEOUT)
                if not isinstance(made, Link):  # through a proxy: httpx, proxy and all
                    made.close()
                    self._via_httpx = True
                    return None
                self._link = made
            return self._link

    def _follow_httpx(self, params: dict[str, str | int]) -> None:
        client = self._client
        timeout = httpx.Timeout(OPEN_TIMEOUT, read=READ_TIMEOUT)
        with client._http.stream(
            "GET",
            "/v1/jobs/events",
            params=params,
            headers=client._headers(),
            timeout=timeout,
        ) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            with self._cond:
                self._response = response
            self._follow(response.iter_bytes())

    def _follow(self, chunks: Iterable[bytes]) -> None:
        """Deliver the events of one connection until the server ends it."""
        for name, data in _events(_lines(chunks)):
            if not self._handle(name, data):
                break

    def _handle(self, name: str, data: dict[str, Any]) -> bool:
        """Act on one event; False when it ends the connection (`reconnect`)."""
        if name == "snapshot":
            jobs = [job for job in data.get("jobs", []) if isinstance(job, dict)]
            seen = {job.get("id") for job in jobs}
            with self._cond:
                self._state = "connected"
                self._generation += 1
                self._cond.notify_all()
                # Whatever happened while we were away: a job the snapshot shows is seen
                # as it is now (its view follows), the others' waiters re-read theirs.
                for job_id, inboxes in self._waiters.items():
                    if job_id not in seen:
                        for inbox in inboxes:
                            inbox.put(RECHECK)
            for job in jobs:
                self._deliver(job)
        elif name == "job":
            self._deliver(data)
        elif name == "gone":
            with self._cond:
                for inbox in self._waiters.get(str(data.get("id")), []):
                    inbox.put(RECHECK)  # its GET says what happened
        elif name == "reconnect":
            return False
        return True

    def _deliver(self, job: dict[str, Any]) -> None:
        job_id = job.get("id")
        if not isinstance(job_id, str):
            return
        inline = job.pop("inline_outputs", None)
        with self._cond:
            self._recent[job_id] = job
            self._recent.move_to_end(job_id)
            if isinstance(inline, dict):
                self._keep_inline(job_id, inline)
                job = {**job, "inline_outputs": inline}
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
                self._dropped += 1
            for inbox in self._waiters.get(job_id, []):
                inbox.put(job)

    def _keep_inline(self, job_id: str, inline: dict[str, Any]) -> None:
        """(caller holds the lock)"""
        size = sum(len(v) for v in inline.values() if isinstance(v, str))
        old = self._recent_inline.pop(job_id, None)
        if old is not None:
            self._inline_kept -= old[1]
        self._recent_inline[job_id] = (inline, size)
        self._inline_kept += size
        while self._inline_kept > RECENT_INLINE_BYTES and self._recent_inline:
            self._inline_kept -= self._recent_inline.popitem(last=False)[1][1]

    def _broadcast(self, item: str) -> None:
        """(caller holds the lock)"""
        for inboxes in self._waiters.values():
            for inbox in inboxes:
                inbox.put(item)


class _Lines:
    """The lines of a byte stream fed chunk by chunk, without their ends (LF, CRLF or CR,
    as server-sent events allow), wherever the chunks are cut. Bytes, not text: httpx's
    `iter_lines` decodes and re-splits every chunk as text, which costs ~8x as much on
    the large lines of inline outputs. A line over `MAX_EVENT_BYTES` raises ValueError."""

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # the start of a line not ended yet
        self._held = 0  # bytes in pending

    def split(self, chunk: bytes) -> list[bytes]:
        """The lines `chunk` ends (the start of one not ended yet is kept)."""
        lines: list[bytes] = []
        pending = self._pending
        if pending and pending[-1].endswith(b"\r") and not chunk.startswith(b"\n"):
            lines.append(b"".join(pending)[:-1])  # a CR that ended its line at the chunk's end
            pending.clear()
            self._held = 0
        pieces = chunk.splitlines(keepends=True)  # split at LF, CRLF, CR only (bytes)
        last = len(pieces) - 1
        for n, piece in enumerate(pieces):
            if piece.endswith(b"\n") or (piece.endswith(b"\r") and n < last):
                if pending:
                    pending.append(piece)
                    piece = b"".join(pending)
                    pending.clear()
                    self._held = 0
                lines.append(piece.rstrip(b"\r\n"))  # one line end: an earlier CR split it
            else:
                pending.append(piece)  # unended, or a CR that a LF may follow
                self._held += len(piece)
                if self._held > MAX_EVENT_BYTES:
                    raise ValueError(f"an event stream line is over {MAX_EVENT_BYTES} bytes")
        return lines

    def rest(self) -> bytes | None:
        """The line left unended when the stream ended, if any."""
        return b"".join(self._pending).rstrip(b"\r\n") if self._pending else None


class _Events:
    """Server-sent events as (name, JSON data) from their lines, one line at a time;
    comments (keep-alives) are skipped. An event whose data is over `MAX_EVENT_BYTES`
    raises ValueError."""

    def __init__(self) -> None:
        self._name = "message"
        self._data: list[bytes] = []
        self._held = 0

    def add(self, line: bytes, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Take one line; an event it ends is appended to `events`."""
        if not line:
            text = b"".join(self._data)
            if text:
                events.append((self._name, json.loads(text)))
            self._name, self._data, self._held = "message", [], 0
        elif line.startswith(b":"):
            return
        elif line.startswith(b"event:"):
            self._name = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            self._data.append(line[5:].strip())
            self._held += len(self._data[-1])
            if self._held > MAX_EVENT_BYTES:
                raise ValueError(f"an event's data is over {MAX_EVENT_BYTES} bytes")


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a whole byte stream (`_Lines`), the last one even if unended."""
    splitter = _Lines()
    for chunk in chunks:
        yield from splitter.split(chunk)
    rest = splitter.rest()
    if rest is not None:
        yield rest


def _events(lines: Iterable[bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The events of a whole stream's lines (`_Events`), each as soon as it ends."""
    assembler = _Events()
    for line in lines:
        events: list[tuple[str, dict[str, Any]]] = []
        assembler.add(line, events)
        yield from events


class _Feed:
    """`_events(_lines(chunks))` fed one chunk at a time: `feed` returns the events the
    chunk completes and keeps the rest (a line or an event not ended yet), so a reader
    can stop between chunks with nothing read ahead. Same lines, events and bounds."""

    def __init__(self) -> None:
        self._lines = _Lines()
        self._events = _Events()

    def feed(self, chunk: bytes) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        for line in self._lines.split(chunk):
            self._events.add(line, events)
        return events


def _poll(inbox: queue.SimpleQueue[Item]) -> Item | None:
    """The next item in `inbox` now, skipping `TURN`s (the caller reads, or will); None."""
    while True:
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return None
        if item != TURN:
            return item
