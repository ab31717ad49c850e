"""The result stream's reading of server-sent events from raw bytes (`csml.client.results`):
lines end at LF, CRLF or CR wherever the chunks are cut, and events are what httpx's
text lines gave before."""

from __future__ import annotations

import json

import httpx
import pytest

from csml.client.results import _events, _Feed, _lines
from csml.client.sdk import Client

STREAM = (
    b": keep-alive\n\n"
    b'event: snapshot\ndata: {"jobs": []}\n\n'
    b'event: job\r\ndata: {"id": "a", "state": "succeeded"}\r\n\r\n'
    b'event: job\rdata: {"id": "b",\rdata: "s": "\\u00e9\xc3\xa9"}\r\r'
    b'event: gone\ndata: {"id": "c"}\n\n'
    b"event: reconnect\ndata: {}\n\n"
)
EXPECTED = [
    ("snapshot", {"jobs": []}),
    ("job", {"id": "a", "state": "succeeded"}),
    ("job", {"id": "b", "s": "\u00e9\u00e9"}),
    ("gone", {"id": "c"}),
    ("reconnect", {}),
]


def _cut(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 64, 1 << 16])
def test_events_whatever_the_chunks(size: int) -> None:
    assert list(_events(_lines(_cut(STREAM, size)))) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1 << 16])
def test_lines_match_httpx_text_lines(size: int) -> None:
    """Same lines as httpx's `iter_lines` (which the stream used), as bytes."""
    chunks = _cut(STREAM + b"a tail without an end", size)
    theirs = list(httpx.Response(200, content=iter(chunks)).iter_lines())
    ours = [line.decode() for line in _lines(chunks)]
    assert ours == theirs


def test_a_cr_at_a_chunk_end_ends_its_line_unless_a_lf_follows() -> None:
    assert list(_lines([b"a\r", b"b\n"])) == [b"a", b"b"]
    assert list(_lines([b"a\r", b"\nb\n"])) == [b"a", b"b"]
    assert list(_lines([b"a\r", b"\r\n"])) == [b"a", b""]
    assert list(_lines([b"a\r"])) == [b"a"]


def test_a_large_line_across_many_chunks() -> None:
    blob = "x" * 300_000
    data = b"event: job\ndata: " + json.dumps({"id": "a", "blob": blob}).encode() + b"\n\n"
    assert list(_events(_lines(_cut(data, 65536)))) == [("job", {"id": "a", "blob": blob})]


def test_an_event_without_data_is_skipped() -> None:
    assert list(_events(_lines([b"event: job\ndata:\n\n", b"data: {}\n\n"]))) == [("message", {})]


def test_an_endless_line_or_event_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile coordinator cannot grow the client's memory without bound: a line or an
    event's data over MAX_EVENT_BYTES ends the stream (the waiters then long-poll)."""
    monkeypatch.setattr("csml.client.results.MAX_EVENT_BYTES", 1000)
    endless = (b"data: " + b"x" * 100 for _ in range(10**6))
    with pytest.raises(ValueError, match="line is over 1000 bytes"):
        list(_lines(endless))
    many = (b"data: " + b"x" * 100 + b"\n" for _ in range(10**6))
    with pytest.raises(ValueError, match="data is over 1000 bytes"):
        list(_events(_lines(many)))
    blob = "x" * 880
    fits = [b'data: {"blob": "' + blob.encode() + b'"}\n\n']
    assert list(_events(_lines(fits))) == [("message", {"blob": blob})]


def _fed(chunks: list[bytes]) -> list[tuple[str, dict[str, object]]]:
    feed = _Feed()
    return [event for chunk in chunks for event in feed.feed(chunk)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 64, 1 << 16])
def test_a_feed_gives_the_events_of_the_generators_chunk_by_chunk(size: int) -> None:
    """`_Feed` (what a waiting thread reads the stream with, one chunk at a time, with
    nothing read ahead) gives the events `_events(_lines(...))` gives, wherever the
    chunks are cut, and each as soon as the chunk that completes it is fed."""
    chunks = _cut(STREAM, size)
    assert _fed(chunks) == EXPECTED == list(_events(_lines(chunks)))
    feed = _Feed()
    assert feed.feed(b'event: job\ndata: {"id": "a"}\n') == []
    assert feed.feed(b"\n") == [("job", {"id": "a"})]
    assert feed.feed(b"a\r") == [] and feed.feed(b"\r\n") == []  # a line "a", then an end
    # A CR at a chunk's end waits for the next chunk (a LF may follow it).
    assert _fed([b"a\r", b"b\n", b"data: {}\r", b"\r"]) == []
    assert _fed([b"a\r", b"b\n", b"data: {}\r", b"\r", b"\n"]) == [("message", {})]


def test_a_feed_refuses_an_endless_line_or_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("csml.client.results.MAX_EVENT_BYTES", 1000)
    feed = _Feed()
    with pytest.raises(ValueError, match="line is over 1000 bytes"):
        for _ in range(20):
            feed.feed(b"data: " + b"x" * 100)
    feed = _Feed()
    with pytest.raises(ValueError, match="data is over 1000 bytes"):
        for _ in range(20):
            feed.feed(b"data: " + b"x" * 100 + b"\n")
    blob = "x" * 880
    assert _Feed().feed(b'data: {"blob": "' + blob.encode() + b'"}\n\n') == [
        ("message", {"blob": blob})
    ]


def test_a_new_identitys_stream_is_asked_what_the_old_one_was() -> None:
    """`create_identity`/`delete_identity` start a fresh stream (it follows one identity);
    it keeps asking for inline outputs and every change if the old one did (a `map` with
    `inline_outputs` before the switch would otherwise download each output)."""
    with Client("http://127.0.0.1:9", "csml_test_token") as client:
        assert client._results is not None
        client._results.want_inline(4096)
        client._results.want_progress()
        first = client._results
        client._new_result_stream()
        assert client._results is not first
        assert client._results.inline_outputs == 4096
        assert client._results.progress
