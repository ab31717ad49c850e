"""What runs inside a job's child process: limits and isolation first, then the operation.

Isolation (see `isolation.enter_job`): the job's own uid, no_new_privs, no
capabilities, a clean environment; its private tmp dir is HOME, TMPDIR and the
context's scratch folder. If isolation fails the operation does not run.

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
    ErrorMsg,
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
    """Memory is what the job may allocate beyond the runtime already mapped."""
    cpu = max(1, int(cpu_seconds + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    limit = _vm_size() + memory_mb * MB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _progress(sock: socket.socket, fraction: float, message: str) -> None:
    fraction = min(max(fraction, 0.0), 1.0) if math.isfinite(fraction) else 0.0
    sock.sendall(encode(ProgressMsg(fraction=fraction, message=message[:MAX_PROGRESS_MESSAGE])))


def _error(sock: socket.socket, message: str) -> None:
    sock.sendall(encode(ErrorMsg(message=message[:MAX_ERROR_MESSAGE])))


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


def run_job(sock: socket.socket, app_name: str, job: StartMsg) -> None:
    from csml.apps.base import JobContext, JobError
    from csml.apps.registry import load_app
    from csml.worker.isolation import IsolationError, enter_job

    limits, sandbox = job.limits, job.sandbox
    try:
        os.chdir(job.output_dir)
        apply_limits(limits.memory_mb, limits.cpu_seconds, limits.max_file_bytes)
        try:
            enter_job(sandbox.uid, sandbox.gid, dict(sandbox.env))
        except IsolationError as exc:
            _error(sock, f"the sandbox could not isolate the job: {exc}")
            return
        op = load_app(app_name).operations[job.operation]
        ctx = JobContext(
            {k: Path(v) for k, v in job.inputs.items()},
            Path(job.output_dir),
            progress=lambda f, m: _progress(sock, f, m),
            scratch=Path(sandbox.tmp),
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
        _error(sock, f"exceeded its memory limit of {limits.memory_mb} MB")
    except (TypeError, ValueError) as exc:
        _error(sock, f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        _error(sock, f"the operation failed: {type(exc).__name__}: {exc}")
    finally:
        sock.close()
