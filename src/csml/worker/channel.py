"""The job channel: length-prefixed frames of a closed set of typed messages, no pickle.

Used between the worker and a job's child (a stream socket) and between the
worker and its zygote (a SOCK_SEQPACKET socket, one frame per datagram). The
child runs untrusted code (parsers of hostile images and models), and so does
the zygote as far as the worker is concerned: nothing they send can make the
worker run code.

Invariants:
- A frame is a 5-byte header, `>IB` (body length, message kind), then the body:
  one UTF-8 JSON object. Nothing else is ever decoded; there is no pickle, no
  class name, no callable on the wire.
- The kind is one of `KINDS`; each kind has its own body cap (`CAPS`: small for
  control and progress, `MAX_RESULT_BYTES` for a result, which is the only
  message that carries a job's output inline; files go through the job's
  output dir). An unknown kind or a length over the cap is refused from the
  header alone, before a byte of the body is read, so a reader never holds
  more than one cap plus one read buffer.
- The body is validated by the kind's pydantic model (strict, no extra field,
  bounded strings, finite numbers); JSON nesting is bounded by the parser.
- Each side accepts only the kinds it may receive (`FROM_CHILD`, `TO_CHILD`,
  `FROM_ZYGOTE`, `TO_ZYGOTE`); `JobChannel` also checks their order (progress*,
  then exactly one answer per start; nothing between an answer and the next
  start).
- Any departure (truncated frame, oversized, bad UTF-8 or JSON, unknown kind,
  wrong fields, out of order) raises `ProtocolViolation` with a reason that
  names what was wrong; the caller fails that job (or restarts the zygote) and
  goes on. A clean end of stream at a frame boundary is `ChannelClosed`.
"""

from __future__ import annotations

import math
import select
import socket
import struct
import time
from collections.abc import Collection
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

HEADER = struct.Struct(">IB")
MAX_PROGRESS_MESSAGE = 500  # as the coordinator keeps it (schemas.jobs.Progress)
MAX_ERROR_MESSAGE = 4000  # as the coordinator keeps it (schemas.workers.JobCompletion)
MAX_RESULT_BYTES = 1 << 20  # a result's JSON, inline; outputs are files
MAX_START_BYTES = 64 << 20  # worker -> child only (the child is the one reading it)
MAX_CONTROL_BYTES = 4096
READ_SIZE = 1 << 16


class ProtocolViolation(Exception):
    """The peer sent something outside the protocol; the message says what."""


class ChannelClosed(Exception):
    """The peer closed the channel at a frame boundary."""


class WireMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    kind: ClassVar[int]
    cap: ClassVar[int] = MAX_CONTROL_BYTES


# -- child -> worker ---------------------------------------------------------


class ProgressMsg(WireMessage):
    kind = 1
    fraction: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    message: Annotated[str, Field(max_length=MAX_PROGRESS_MESSAGE)] = ""


class ResultMsg(WireMessage):
    """The job succeeded with this JSON result."""

    kind = 2
    cap = MAX_RESULT_BYTES
    result: dict[str, Any]

    @field_validator("result")
    @classmethod
    def _finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_finite(value)
        return value


class ErrorMsg(WireMessage):
    """The job failed; the message is shown to its owner."""

    kind = 3
    cap = 4 * MAX_ERROR_MESSAGE + 64  # JSON escapes
    message: Annotated[str, Field(max_length=MAX_ERROR_MESSAGE)]
    retire: bool = False  # the child asks not to be given another job (e.g. out of memory)


# -- worker -> child ---------------------------------------------------------


class JobLimitsMsg(WireMessage):
    """Per process, set at its first job (a reused process gets jobs of the same limits):
    memory beyond the runtime, file size, and CPU time over the process's whole life
    (`cpu_lifetime_seconds`; the worker enforces `cpu_seconds` per job)."""

    memory_mb: Annotated[int, Field(ge=1)]
    cpu_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    cpu_lifetime_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    max_file_bytes: Annotated[int, Field(ge=0)]


class JobSandboxMsg(WireMessage):
    uid: int | None
    gid: int | None
    tmp: str
    env: dict[str, str]


class StartMsg(WireMessage):
    """Run this job (worker -> child)."""

    kind = 16
    cap = MAX_START_BYTES
    operation: str
    params: dict[str, Any]
    inputs: dict[str, str]
    output_dir: str
    limits: JobLimitsMsg
    sandbox: JobSandboxMsg


# -- worker <-> zygote -------------------------------------------------------


class RunMsg(WireMessage):
    """Fork a child for job `token` on the attached socket (worker -> zygote)."""

    kind = 32
    token: Annotated[int, Field(ge=1)]


class ReadyMsg(WireMessage):
    """The zygote imported the app; `features` are the isolation achieved."""

    kind = 33
    features: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=32)]


class StartedMsg(WireMessage):
    kind = 34
    token: Annotated[int, Field(ge=1)]
    pid: Annotated[int, Field(ge=1)]


class ExitedMsg(WireMessage):
    kind = 35
    token: Annotated[int, Field(ge=1)]
    status: int


Message = ProgressMsg | ResultMsg | ErrorMsg | StartMsg | RunMsg | ReadyMsg | StartedMsg | ExitedMsg
KINDS: dict[int, type[WireMessage]] = {
    m.kind: m
    for m in (ProgressMsg, ResultMsg, ErrorMsg, StartMsg, RunMsg, ReadyMsg, StartedMsg, ExitedMsg)
}
CAPS = {kind: model.cap for kind, model in KINDS.items()}
FROM_CHILD = frozenset({ProgressMsg.kind, ResultMsg.kind, ErrorMsg.kind})
TO_CHILD = frozenset({StartMsg.kind})
FROM_ZYGOTE = frozenset({ReadyMsg.kind, StartedMsg.kind, ExitedMsg.kind})
TO_ZYGOTE = frozenset({RunMsg.kind})
_NAMES = {
    1: "progress",
    2: "result",
    3: "error",
    16: "start",
    32: "run",
    33: "ready",
    34: "started",
    35: "exited",
}


def _check_finite(value: Any) -> None:
    """(Nesting is already bounded by the JSON parser.)"""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and infinities are not JSON")
    if isinstance(value, dict):
        for v in value.values():
            _check_finite(v)
    elif isinstance(value, list):
        for v in value:
            _check_finite(v)


def encode(message: WireMessage) -> bytes:
    """One frame; ValueError if the body is over its kind's cap."""
    body = message.model_dump_json().encode()
    if len(body) > message.cap:
        raise ValueError(f"{_NAMES[message.kind]} message of {len(body)} bytes over {message.cap}")
    return HEADER.pack(len(body), message.kind) + body


def _check_header(length: int, kind: int, accept: Collection[int]) -> type[WireMessage]:
    model = KINDS.get(kind)
    if model is None:
        raise ProtocolViolation(f"unknown message kind {kind}")
    if kind not in accept:
        raise ProtocolViolation(f"a {_NAMES[kind]} message is not expected from this peer")
    if length > model.cap:
        raise ProtocolViolation(
            f"{_NAMES[kind]} message of {length} bytes is over the {model.cap}-byte limit"
        )
    return model


def _decode_body(model: type[WireMessage], body: bytes) -> Message:
    try:
        body.decode("utf-8")
        return model.model_validate_json(body)  # type: ignore[return-value]
    except UnicodeDecodeError:
        raise ProtocolViolation(f"{_NAMES[model.kind]} message is not UTF-8") from None
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise ProtocolViolation(
            f"invalid {_NAMES[model.kind]} message: {where}: {err['msg']}"[:300]
        ) from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolViolation(f"invalid {_NAMES[model.kind]} message: {exc}"[:300]) from None


def decode_datagram(data: bytes, accept: Collection[int]) -> Message:
    """One frame that must be exactly `data` (a SOCK_SEQPACKET datagram)."""
    if len(data) < HEADER.size:
        raise ProtocolViolation(f"truncated frame header ({len(data)} bytes)")
    length, kind = HEADER.unpack_from(data)
    model = _check_header(length, kind, accept)
    if len(data) != HEADER.size + length:
        raise ProtocolViolation(
            f"{_NAMES[kind]} frame announces {length} bytes, carries {len(data) - HEADER.size}"
        )
    return _decode_body(model, data[HEADER.size :])


class FrameReader:
    """Frames from a stream socket, with at most one frame (within its cap) buffered."""

    def __init__(self, sock: socket.socket, accept: Collection[int]) -> None:
        self.sock = sock
        self.accept = frozenset(accept)
        self._buf = bytearray()

    def pending(self) -> bool:
        """Bytes already received or waiting in the socket."""
        if self._buf:
            return True
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def _take(self) -> Message | None:
        if len(self._buf) < HEADER.size:
            return None
        length, kind = HEADER.unpack_from(self._buf)
        model = _check_header(length, kind, self.accept)
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        return _decode_body(model, body)

    def read(self, timeout: float | None) -> Message | None:
        """The next message, or None if none is complete within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            message = self._take()
            if message is not None:
                return message
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            data = self.sock.recv(READ_SIZE)
            if not data:
                if self._buf:
                    raise ProtocolViolation(
                        f"truncated frame: the channel closed {len(self._buf)} bytes into it"
                    )
                raise ChannelClosed()
            self._buf += data


def send(sock: socket.socket, message: WireMessage) -> None:
    sock.sendall(encode(message))


Answer = ResultMsg | ErrorMsg


class JobChannel:
    """The worker's end of a job child's channel: starts jobs, reads their messages in order.

    Per job: `start()`, then `next()` until it returns an answer (`ResultMsg` or
    `ErrorMsg`); progress before it is passed on. Anything else is a violation,
    including a message between an answer and the next `start()` (a reused child).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = FrameReader(sock, FROM_CHILD)
        self._running = False

    def start(self, job: StartMsg) -> None:
        if self._running:
            raise RuntimeError("a job is already running on this channel")
        if self._reader.pending():
            raise ProtocolViolation("the child sent a message while no job was running")
        send(self.sock, job)
        self._running = True

    def pending(self) -> bool:
        """Whether the child has sent anything not yet read."""
        return self._reader.pending()

    def next(self, timeout: float | None) -> ProgressMsg | Answer | None:
        """The running job's next message (None: nothing within `timeout`).

        Raises ProtocolViolation, ChannelClosed (the child ended without answering)."""
        if not self._running:
            raise ProtocolViolation("the child sent a message while no job was running")
        message = self._reader.read(timeout)
        if isinstance(message, ResultMsg | ErrorMsg):
            self._running = False
        return message  # type: ignore[return-value]

    def close(self) -> None:
        self.sock.close()
