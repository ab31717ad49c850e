"""The hostile side of the job channel fuzz test: a real process writing garbage frames.

Run as `python -m tests.security.channel_fuzz_child CTRL_FD SEED`. For each socket
it receives over CTRL_FD (SCM_RIGHTS, with the case number), it reads the job's
start message as a real child does, writes case `n` of `case(SEED, n)` in random
chunks, and closes the socket. `case` is shared with the test, which knows from it
what the worker must conclude.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys

from csml.worker.channel import (
    HEADER,
    MAX_RESULT_BYTES,
    TO_CHILD,
    ErrorMsg,
    FrameReader,
    ProgressMsg,
    ResultMsg,
    encode,
)

KINDS = (
    "random",
    "valid",
    "truncated",
    "oversized",
    "unknown_kind",
    "bad_json",
    "bad_utf8",
    "wrong_fields",
    "out_of_order",
    "nested",
    "non_finite",
    "bitflip",
    "pickle",
)


def _frame(kind: int, body: bytes) -> bytes:
    return HEADER.pack(len(body), kind) + body


def _valid(rng: random.Random) -> bytes:
    frames = [
        encode(ProgressMsg(fraction=rng.random(), message="p" * rng.randrange(0, 500)))
        for _ in range(rng.randrange(0, 4))
    ]
    if rng.random() < 0.5:
        frames.append(encode(ResultMsg(result={"n": rng.randrange(10**6), "s": "r" * 50})))
    else:
        frames.append(encode(ErrorMsg(message="e" * rng.randrange(1, 300))))
    return b"".join(frames)


def case(seed: int, n: int) -> tuple[str, bytes]:
    """Case `n`: its kind and the bytes the child writes."""
    rng = random.Random(seed * 1_000_003 + n)
    kind = KINDS[n % len(KINDS)]
    if kind == "random":
        return kind, rng.randbytes(rng.randrange(1, 300))
    if kind == "valid":
        return kind, _valid(rng)
    if kind == "truncated":
        data = _valid(rng)
        return kind, data[: rng.randrange(1, len(data))]
    if kind == "oversized":
        msg_kind = rng.choice((1, 2, 3))
        cap = {1: 4096, 2: MAX_RESULT_BYTES, 3: 4 * 4000 + 64}[msg_kind]
        length = rng.randrange(cap + 1, 1 << 32)
        return kind, HEADER.pack(length, msg_kind) + rng.randbytes(rng.randrange(0, 2000))
    if kind == "unknown_kind":
        msg_kind = rng.choice([k for k in range(256) if k not in (1, 2, 3)])
        return kind, _frame(msg_kind, b'{"fraction": 0.5}')
    if kind == "bad_json":
        body = rng.choice([b"{", b"[]", b"null", b'{"fraction": }', b"\x00" * 8, b""])
        return kind, _frame(rng.choice((1, 2, 3)), body)
    if kind == "bad_utf8":
        return kind, _frame(3, b'{"message": "\xff\xfe"}')
    if kind == "wrong_fields":
        fields: dict[str, object] = rng.choice(
            [
                {"fraction": "0.5"},
                {"fraction": 2.0},
                {"fraction": 0.5, "message": 7},
                {"fraction": 0.5, "extra": 1},
                {"message": "x" * 501, "fraction": 0.1},
            ]
        )
        return kind, _frame(1, json.dumps(fields).encode())
    if kind == "out_of_order":  # messages a child may never send
        body = rng.choice([b'{"token": 1}', b'{"token": 1, "pid": 2}', b'{"features": []}'])
        first = encode(ProgressMsg(fraction=0.5)) if rng.random() < 0.5 else b""
        return kind, first + _frame(rng.choice((16, 32, 33, 34, 35)), body)
    if kind == "nested":
        depth = rng.randrange(300, 3000)
        return kind, _frame(2, b'{"result": {"a": ' + b"[" * depth + b"]" * depth + b"}}")
    if kind == "non_finite":
        body = rng.choice([b'{"fraction": NaN}', b'{"result": {"x": Infinity}}'])
        return kind, _frame(1 if b"fraction" in body else 2, body)
    if kind == "bitflip":
        flipped = bytearray(_valid(rng))
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return kind, bytes(flipped)
    body = b"\x80\x04\x95" + rng.randbytes(40) + b"."  # a pickle, framed as a result
    return kind, rng.choice([_frame(2, body), struct.pack("!i", len(body)) + body])


def main(ctrl_fd: int, seed: int) -> None:
    ctrl = socket.socket(fileno=ctrl_fd)
    rng = random.Random(seed)
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(ctrl, 16, 1)
        if not msg:
            return
        (n,) = struct.unpack("!I", msg)
        with socket.socket(fileno=fds[0]) as sock:
            try:
                FrameReader(sock, TO_CHILD).read(10)  # the start message, as a real child
                data = case(seed, n)[1]
                while data:
                    size = rng.randrange(1, 4096)
                    sock.sendall(data[:size])
                    data = data[size:]
            except OSError:
                pass  # the worker stopped reading: it has made up its mind
        ctrl.send(b"k")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
