"""A raw HTTP/1.1 client for hostile requests: bodies streamed from a generator
(never held in memory), stopped as soon as the server answers."""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

MiB = 1 << 20


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client managed to send before the answer

    def json(self) -> Any:
        return json.loads(self.body)


def padding(total: int, chunk: int = MiB) -> Iterator[bytes]:
    """`total` bytes of a JSON string that never ends, made one chunk at a time."""
    yield b'{"pad": "'
    left = total - 9
    block = b"x" * chunk
    while left > 0:
        yield block[: min(chunk, left)]
        left -= chunk


def send(
    url: str,
    method: str,
    path: str,
    body: Iterable[bytes],
    *,
    length: int | None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Answer:
    """Send `body` (with `Content-Length: length`, or chunked when None) until the server
    answers or closes, then read its answer."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent = 0
        try:
            for chunk in body:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered (or closed): stop sending
                frame = chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk)
                sock.sendall(frame)
                sent += len(chunk)
            else:
                if length is None:
                    sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        return _read_answer(sock, sent)
    finally:
        sock.close()


def _read_answer(sock: socket.socket, sent: int) -> Answer:
    data = bytearray()
    try:
        while b"\r\n\r\n" not in data:
            got = sock.recv(65536)
            if not got:
                break
            data += got
        head, _, rest = bytes(data).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if not lines or not lines[0].startswith("HTTP/1.1 "):
            raise AssertionError(f"no HTTP answer (got {bytes(data)[:200]!r})")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        want = int(headers.get("content-length", "0"))
        body = bytearray(rest)
        while len(body) < want:
            got = sock.recv(65536)
            if not got:
                break
            body += got
    except ConnectionResetError as exc:
        raise AssertionError(
            f"connection reset before an answer (got {bytes(data)[:200]!r})"
        ) from exc
    return Answer(int(lines[0].split()[1]), headers, bytes(body), sent)


class PeakRss:
    """Samples a process's resident memory in a thread; `peak` is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


BOUNDARY = "csml-hostile-boundary"
FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def form(parts: Iterable[tuple[str, Iterable[bytes]]]) -> Iterator[bytes]:
    """A multipart/form-data body made as it is sent: (part name, its chunks) each."""
    for name, chunks in parts:
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{name}.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        yield from chunks
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def zeros(total: int, chunk: int = MiB) -> Iterator[bytes]:
    block = bytes(chunk)
    while total > 0:
        yield block[: min(chunk, total)]
        total -= chunk


class FolderWatch:
    """Samples a folder in a thread: the most bytes and files it held at once."""

    def __init__(self, folder: Path, interval: float = 0.002) -> None:
        self.folder = folder
        self.interval = interval
        self.peak_bytes = 0
        self.peak_files = 0
        self._stop = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        size = files = 0
        # os.walk skips a folder that goes away while it is walked (a staging folder
        # removed meanwhile holds nothing any more); `Path.rglob` raised, which ended the
        # sampling thread and left the peaks of the samples before it.
        for top, _, names in os.walk(self.folder):
            for name in names:
                try:
                    st = os.lstat(os.path.join(top, name))
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    files += 1
                    size += st.st_size
        self.peak_bytes = max(self.peak_bytes, size)
        self.peak_files = max(self.peak_files, files)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval)
        except BaseException as exc:  # raised again on exit: a test never trusts a dead watch
            self._failed = exc

    def __enter__(self) -> FolderWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._failed is not None:
            raise RuntimeError("the folder watch stopped sampling") from self._failed
        self.sample()
