"""`channel.FrameReader` as a job's child uses it: waiting for its next job with no
timeout on a blocking socket, it blocks in `recv` itself (no `select` first: one
system call per frame), and still reads frames split across sends, several frames in
one read, and tells a clean end from a truncated frame."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from csml.worker import channel
from csml.worker.channel import (
    TO_CHILD,
    ChannelClosed,
    FrameReader,
    JobLimitsMsg,
    JobSandboxMsg,
    ProtocolViolation,
    StartMsg,
    encode,
)


def start(n: int) -> StartMsg:
    return StartMsg(
        operation="echo",
        params={"i": n},
        inputs={},
        output_dir="/nonexistent",
        limits=JobLimitsMsg(
            memory_mb=100, cpu_seconds=10, cpu_lifetime_seconds=80, max_file_bytes=1 << 20
        ),
        sandbox=JobSandboxMsg(uid=None, gid=None, tmp="/nonexistent", env={}),
    )


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield ours, theirs
    ours.close()
    theirs.close()


@pytest.fixture
def no_select(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("select called by a blocking read")

    monkeypatch.setattr(channel.select, "select", refuse)


@pytest.mark.usefixtures("no_select")
def test_a_blocking_read_waits_in_recv_for_a_frame_sent_in_parts(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The frame arrives in three parts, the first only once the reader waits (a thread
    sends them in turn, each once the previous one was received)."""
    child, worker = pair
    frame = encode(start(7))
    parts = [frame[:3], frame[3:40], frame[40:]]
    reader = FrameReader(child, TO_CHILD)
    got: list[object] = []
    done = threading.Event()

    def read() -> None:
        got.append(reader.read(None))
        done.set()

    thread = threading.Thread(target=read)
    thread.start()
    for part in parts:
        worker.sendall(part)
    thread.join(timeout=30)
    assert done.is_set()
    assert got == [start(7)]


@pytest.mark.usefixtures("no_select")
def test_a_blocking_read_takes_frames_one_at_a_time_and_ends_cleanly(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    child, worker = pair
    worker.sendall(encode(start(1)) + encode(start(2)))
    worker.close()
    reader = FrameReader(child, TO_CHILD)
    assert reader.read(None) == start(1)
    assert reader.read(None) == start(2)
    with pytest.raises(ChannelClosed):
        reader.read(None)


@pytest.mark.usefixtures("no_select")
def test_a_blocking_read_of_a_truncated_frame_is_a_violation(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    child, worker = pair
    worker.sendall(encode(start(1))[:20])
    worker.close()
    with pytest.raises(ProtocolViolation, match="truncated frame"):
        FrameReader(child, TO_CHILD).read(None)


def test_a_read_with_a_timeout_still_times_out(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """(The worker's side: a job's messages are read with a timeout.)"""
    child, _worker = pair
    assert FrameReader(child, TO_CHILD).read(0.01) is None


def test_a_socket_with_a_timeout_of_its_own_is_read_through_select(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """No timeout asked, but the socket has one (not blocking): the read waits in
    `select` (never a `recv` that gives up on the socket's own timeout)."""
    child, worker = pair
    child.settimeout(0.01)
    reader = FrameReader(child, TO_CHILD)
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(reader.read(None)))
    thread.start()
    thread.join(timeout=0.2)  # waits past the socket's timeout: it did not give up
    worker.sendall(encode(start(3)))
    thread.join(timeout=30)
    assert got == [start(3)]
