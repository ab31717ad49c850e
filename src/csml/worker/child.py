"""What runs inside a job's child process: limits and isolation first, then the operations.

A child serves one owner's jobs, one at a time, until the worker closes its
channel (`serve`). At its first job it applies the limits and isolation (see
`isolation.enter_job`): the owner's own uid, no_new_privs, no capabilities, a
clean environment; its private tmp dir is HOME, TMPDIR and the context's
scratch folder. If isolation fails no operation runs. Every later job must
come with the same sandbox and limits, or the child refuses it and stops.

Messages to the worker over the job's channel (frames of `channel`, never
pickle): `ProgressMsg`*, then exactly one `ResultMsg` or `ErrorMsg`. A result
over `channel.MAX_RESULT_BYTES` or not strict JSON becomes an error naming why;
a progress message is clamped to what the protocol accepts.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
from pathlib import Path

from pydantic import ValidationError

from csml.worker.channel import (
    MAX_ERROR_MESSAGE,
    MAX_PROGRESS_MESSAGE,
    MAX_RESULT_BYTES,
    TO_CHILD,
    ChannelClosed,
    ErrorMsg,
    FrameReader,
    ProgressMsg,
    ResultMsg,
    StartMsg,
    encode,
)

MB = 1024 * 1024


def _vm_size() -> int:
    """This process's address-space size in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def apply_limits(memory_mb: int, cpu_seconds: float, max_file_bytes: int) -> None:
    """Memory is what the process may allocate beyond the runtime already mapped;
    `cpu_seconds` is the process's CPU time over its life."""
    cpu = max(1, int(cpu_seconds + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    limit = _vm_size() + memory_mb * MB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _progress(sock: socket.socket, fraction: float, message: str) -> None:
    fraction = min(max(fraction, 0.0), 1.0) if math.isfinite(fraction) else 0.0
    sock.sendall(encode(ProgressMsg(fraction=fraction, message=message[:MAX_PROGRESS_MESSAGE])))


def _error(sock: socket.socket, message: str, retire: bool = False) -> None:
    sock.sendall(encode(ErrorMsg(message=message[:MAX_ERROR_MESSAGE], retire=retire)))


def _answer(sock: socket.socket, result: object) -> None:
    if not isinstance(result, dict):
        _error(sock, f"the operation returned {type(result).__name__}, not a JSON object")
        return
    size = len(json.dumps(result, allow_nan=False))  # TypeError/ValueError: not JSON
    if size > MAX_RESULT_BYTES - 16:
        _error(
            sock,
            f"the result is {size} bytes of JSON, over the {MAX_RESULT_BYTES}-byte limit "
            "(large data belongs in an output file)",
        )
        return
    sock.sendall(encode(ResultMsg(result=result)))


def serve(sock: socket.socket, app_name: str) -> None:
    """Run the jobs the worker sends, one at a time, until it closes the channel."""
    from csml.worker.isolation import IsolationError, enter_job

    reader = FrameReader(sock, TO_CHILD)
    first: StartMsg | None = None
    try:
        while True:
            try:
                job = reader.read(None)
            except ChannelClosed:
                return
            if not isinstance(job, StartMsg):
                return
            if first is None:
                first = job
                limits, sandbox = job.limits, job.sandbox
                os.chdir(job.output_dir)
                apply_limits(limits.memory_mb, limits.cpu_lifetime_seconds, limits.max_file_bytes)
                try:
                    enter_job(sandbox.uid, sandbox.gid, dict(sandbox.env))
                except IsolationError as exc:
                    _error(sock, f"the sandbox could not isolate the job: {exc}", retire=True)
                    return
            elif (job.sandbox, job.limits) != (first.sandbox, first.limits):
                _error(sock, "the job's sandbox is not this process's", retire=True)
                return
            if not run_job(sock, app_name, job):
                return
    finally:
        sock.close()


def run_job(sock: socket.socket, app_name: str, job: StartMsg) -> bool:
    """Run one job and answer; False if this process should serve no other job."""
    from csml.apps.base import JobContext, JobError
    from csml.apps.registry import load_app

    try:
        os.chdir(job.output_dir)
        op = load_app(app_name).operations[job.operation]
        ctx = JobContext(
            {k: Path(v) for k, v in job.inputs.items()},
            Path(job.output_dir),
            progress=lambda f, m: _progress(sock, f, m),
            scratch=Path(job.sandbox.tmp),
        )
        result = op.run(ctx, dict(job.params))
        _answer(sock, result)
    except JobError as exc:
        _error(sock, str(exc))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        _error(sock, f"invalid parameter {field}: {err['msg']}")
    except MemoryError:
        _error(sock, f"exceeded its memory limit of {job.limits.memory_mb} MB", retire=True)
        return False
    except (TypeError, ValueError) as exc:
        _error(sock, f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        _error(sock, f"the operation failed: {type(exc).__name__}: {exc}")
    return True
