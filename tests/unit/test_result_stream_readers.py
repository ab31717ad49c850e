"""Who reads the SDK's result stream (`csml.client.results.ResultStream`): over a link,
the waiting threads themselves, one at a time, against a real socket. A loopback HTTP
server stands for the coordinator's `GET /v1/jobs/events` and sends the events each
test gives it, when it gives them: so the tests say what a reading waiter does when
its own view comes, when another's does, when nothing comes before its deadline, when
the server ends the stream (`reconnect`), and when the stream breaks."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from csml.client import Client
from csml.client.results import LOST, RECHECK, ResultStream


class Events(ThreadingHTTPServer):
    """Each `GET /v1/jobs/events` answers 200, chunked, then sends what `send` queues for
    its connection (in order; `END` finishes the answer, `BREAK` drops the connection)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.streams: queue.SimpleQueue[queue.SimpleQueue[bytes]] = queue.SimpleQueue()
        self.opened = 0
        self.paths: list[str] = []  # of each GET, query and all

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


END, BREAK = b"<end>", b"<break>"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Events

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        out: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.server.opened += 1
        self.server.paths.append(self.path)
        self.server.streams.put(out)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        while True:
            data = out.get()
            if data == BREAK:
                self.close_connection = True
                self.wfile.write(b"5\r\nbroke")  # a chunk cut short, then the close
                self.wfile.flush()
                return
            if data == END:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()


def event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def view(job_id: str, state: str = "succeeded") -> dict[str, Any]:
    return {"id": job_id, "state": state}


@pytest.fixture
def server() -> Iterator[Events]:
    srv = Events()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def opened(server: Events) -> Iterator[tuple[ResultStream, queue.SimpleQueue[bytes]]]:
    """A stream opened over a link (the snapshot read by the opening thread), and the
    queue of what its connection is sent next."""
    with Client(server.url, "csml_test_token") as client:
        stream = client._results
        assert stream is not None
        opening = threading.Thread(target=stream.open)
        opening.start()
        out = server.streams.get(timeout=10)
        out.put(event("snapshot", {"jobs": []}))
        opening.join(timeout=10)
        assert stream._state == "connected" and stream._thread is None
        yield stream, out
        out.put(END)


def test_a_lone_waiter_reads_its_own_view_in_its_own_thread(
    opened: tuple[ResultStream, queue.SimpleQueue[bytes]],
) -> None:
    stream, out = opened
    inbox, latest, covered = stream.register("a", stream.mark())
    assert latest is None and covered
    out.put(event("job", view("b")))  # another job's end: kept, not this waiter's
    out.put(event("job", view("a")))
    assert stream.take(inbox, 10) == view("a")
    assert stream.register("b", None)[1] == view("b")
    assert not any(t.name == "csml-results" for t in threading.enumerate())


def test_a_reading_waiter_stops_at_its_deadline_and_the_next_one_reads_on(
    opened: tuple[ResultStream, queue.SimpleQueue[bytes]],
) -> None:
    stream, out = opened
    inbox, _, _ = stream.register("a", stream.mark())
    assert stream.take(inbox, 0.3) is None  # nothing came by its deadline: back to its caller
    assert not stream._lead and stream._state == "connected"  # the stream is not dropped
    out.put(event("job", view("a")))
    assert stream.take(inbox, 10) == view("a")


def two_waiters(stream: ResultStream) -> tuple[dict[str, Any], list[threading.Thread]]:
    """Jobs "a" and "b" waited for in two threads (each view lands in the dict), once one
    of them reads the stream and the other waits in its inbox."""
    got: dict[str, Any] = {}

    def wait(job_id: str) -> None:
        inbox, _, _ = stream.register(job_id, stream.mark())
        got[job_id] = stream.take(inbox, 10)

    threads = [threading.Thread(target=wait, args=(j,)) for j in ("a", "b")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while not (stream._lead and len(stream._following) == 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    return got, threads


def test_the_reading_passes_to_a_waiter_still_waiting(
    opened: tuple[ResultStream, queue.SimpleQueue[bytes]],
) -> None:
    """Two waiters: whichever reads hands the other its view, or, once its own came,
    leaves the reading to the other (woken with TURN): both get their views."""
    stream, out = opened
    got, threads = two_waiters(stream)
    reader = "a" if stream._following[0] is stream._waiters["b"][0] else "b"
    out.put(event("job", view(reader)))  # the reader's own first: it stops reading
    time.sleep(0.1)
    out.put(event("job", view("b" if reader == "a" else "a")))
    for t in threads:
        t.join(timeout=10)
    assert got == {"a": view("a"), "b": view("b")}


def test_a_reconnection_makes_waiters_re_read(
    server: Events, opened: tuple[ResultStream, queue.SimpleQueue[bytes]]
) -> None:
    """The server ends the stream (`reconnect`): the reading waiter connects again at
    once, and the new snapshot tells every waiter to re-read (a gap was possible)."""
    stream, out = opened
    mark = stream.mark()
    inbox, _, _ = stream.register("a", mark)
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(stream.take(inbox, 10)))
    reader.start()
    out.put(event("reconnect", {"after_ms": 0}))
    again = server.streams.get(timeout=10)
    again.put(event("snapshot", {"jobs": []}))
    reader.join(timeout=10)
    assert result == [RECHECK] and server.opened == 2
    assert stream._state == "connected" and stream.mark() != mark
    again.put(event("job", view("a")))
    assert stream.take(inbox, 10) == view("a")
    again.put(END)


def test_a_reconnection_s_snapshot_spares_the_waiters_of_the_jobs_it_shows(
    server: Events, opened: tuple[ResultStream, queue.SimpleQueue[bytes]]
) -> None:
    """A new connection asks for a snapshot of twice as many of the newest jobs as are
    waited for; a waiter whose job it shows takes that view (no re-read: no GET for each
    item of a batch every ~20 s), the others re-read."""
    stream, out = opened
    assert "limit=1&" in server.paths[0]  # opened with nobody waiting
    mark = stream.mark()
    inbox_a, _, _ = stream.register("a", mark)
    inbox_b, _, _ = stream.register("b", mark)
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(stream.take(inbox_a, 10)))
    reader.start()
    out.put(event("reconnect", {"after_ms": 0}))
    again = server.streams.get(timeout=10)
    assert "limit=4&" in server.paths[1], server.paths
    again.put(event("snapshot", {"jobs": [view("a", "running")]}))
    reader.join(timeout=10)
    assert result == [view("a", "running")]  # seen as it is now: nothing to re-read
    assert inbox_b.get(timeout=10) == RECHECK  # not in the snapshot: its waiter re-reads
    assert inbox_a.empty()
    again.put(event("job", view("a")))
    assert stream.take(inbox_a, 10) == view("a")
    again.put(END)


def test_a_broken_stream_sends_every_waiter_to_long_polling(
    opened: tuple[ResultStream, queue.SimpleQueue[bytes]],
) -> None:
    stream, out = opened
    got, threads = two_waiters(stream)
    out.put(BREAK)
    for t in threads:
        t.join(timeout=10)
    assert got == {"a": LOST, "b": LOST}
    assert stream._state == "failed" and not stream.open()  # not tried again for a while
