"""`echo`: a built-in diagnostic app for tests, benchmarks and operators.

`echo` returns its parameters (and copies an optional file back). The other
operations misbehave on purpose (allocate, spin, crash, probe the network and
the file system) so that the sandbox can be checked; they exist only where
`CSML_ECHO_DIAGNOSTICS=1`, since anonymous users can call whatever a worker serves.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from pydantic import ConfigDict, Field

from csml.apps.base import App, Input, JobContext, OperationFn, OperationParams, Output

app = App("echo", version="1.0", description="Diagnostics: echo parameters, misbehave on purpose.")
DIAGNOSTICS = os.environ.get("CSML_ECHO_DIAGNOSTICS") == "1"


def diagnostic(**kw: Any) -> Callable[[OperationFn], OperationFn]:
    """Register an operation only when diagnostics are on."""
    return app.operation(**kw) if DIAGNOSTICS else (lambda func: func)


class EchoParams(OperationParams):
    model_config = ConfigDict(extra="allow")
    sleep: float = Field(0.0, ge=0, le=3600, description="Seconds to wait before answering.")


@app.operation(
    inputs=[Input("data", "Any file; copied back as output `data`.", required=False)],
    outputs=[Output("data", "The input file, unchanged.")],
    deterministic=True,
)
def echo(ctx: JobContext, params: EchoParams) -> dict[str, Any]:
    """Return the parameters; optionally sleep first, reporting progress."""
    if params.sleep:
        deadline = time.monotonic() + params.sleep
        while (left := deadline - time.monotonic()) > 0:
            ctx.progress(1 - left / params.sleep, f"sleeping, {left:.1f} s left")
            time.sleep(min(left, 0.2))
    if ctx.has_input("data"):
        shutil.copyfile(ctx.input("data"), ctx.output("data"))
    return {"params": params.model_dump()}


class AllocateParams(OperationParams):
    megabytes: int = Field(ge=1, le=1_000_000, description="Memory to allocate and touch.")


@diagnostic()
def allocate(ctx: JobContext, params: AllocateParams) -> dict[str, Any]:
    """Allocate and touch memory (to test the memory limit)."""
    block = bytearray(params.megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return {"allocated_mb": params.megabytes}


class SpinParams(OperationParams):
    seconds: float = Field(ge=0, le=3600, description="CPU seconds to burn.")


@diagnostic()
def spin(ctx: JobContext, params: SpinParams) -> dict[str, Any]:
    """Burn CPU time (to test the CPU-time and wall-clock limits)."""
    end = time.process_time() + params.seconds
    n = 0
    while time.process_time() < end:
        n += 1
    return {"iterations": n}


class CrashParams(OperationParams):
    pass


@diagnostic()
def crash(ctx: JobContext, params: CrashParams) -> dict[str, Any]:
    """Dereference a null pointer: the job process dies with SIGSEGV."""
    ctypes.string_at(0)
    return {}


# -- diagnostics of the sandbox's isolation (see tests/integration/test_sandbox.py) --


class ConnectParams(OperationParams):
    host: str = Field(description="Host name or address to connect to.")
    port: int = Field(ge=1, le=65535)
    timeout: float = Field(2.0, gt=0, le=30)


@diagnostic()
def connect(ctx: JobContext, params: ConnectParams) -> dict[str, Any]:
    """Try a TCP connection and report how it went (a sandboxed job has no network)."""
    import socket

    try:
        with socket.create_connection((params.host, params.port), timeout=params.timeout):
            return {"connected": True, "error": None}
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}


class ReadFileParams(OperationParams):
    path: str = Field(description="Absolute path of the file to read.")


@diagnostic()
def read_file(ctx: JobContext, params: ReadFileParams) -> dict[str, Any]:
    """Try to read a file and report how it went (its size and SHA-256, not its content)."""
    import hashlib
    from pathlib import Path

    try:
        data = Path(params.path).read_bytes()
    except OSError as exc:
        return {"read": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"read": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class SandboxInfoParams(OperationParams):
    sleep: float = Field(0.0, ge=0, le=600, description="Seconds to wait before answering.")
    leave_process: bool = Field(False, description="Start a detached process that outlives it.")
    leave_file: bool = Field(False, description="Leave a file in its tmp dir.")
    leave_thread: bool = Field(False, description="Leave a thread burning CPU.")


def _leave_process() -> int:
    """Double fork + setsid: a process that is neither our child nor in our group."""
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        grandchild = os.fork()
        if grandchild == 0:
            time.sleep(600)
            os._exit(0)
        os.write(w, str(grandchild).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    left = int(os.read(r, 32))
    os.close(r)
    return left


@diagnostic(inputs=[Input("data", "Any file; its path is reported.", required=False)])
def sandbox_info(ctx: JobContext, params: SandboxInfoParams) -> dict[str, Any]:
    """Report who and where the job is: uid, groups, environment, tmp dir, visible processes.

    With `sleep`, the input's path and the tmp dir are first sent as a progress message.
    """
    import json
    import os
    import stat
    import tempfile

    tmp = tempfile.gettempdir()
    with open("/proc/self/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    info: dict[str, Any] = {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "no_new_privs": status.get("NoNewPrivs"),
        "cap_eff": status.get("CapEff"),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "tmp": tmp,
        "tmp_mode": oct(stat.S_IMODE(os.stat(tmp).st_mode)),
        "tmp_owner": os.stat(tmp).st_uid,
        "scratch": str(ctx.scratch),
        "inputs": {"data": str(ctx.input("data"))} if ctx.has_input("data") else {},
        "visible_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    }
    if params.leave_process:
        info["left_pid"] = _leave_process()
    if params.leave_thread:
        import threading

        def burn() -> None:
            while True:
                pass

        threading.Thread(target=burn, daemon=True).start()
    if params.leave_file:
        with open(os.path.join(tmp, "left-by-the-job"), "w") as f:
            f.write("data of the job")
    if params.sleep:
        ctx.progress(0.0, json.dumps({"inputs": info["inputs"], "tmp": tmp}))
        time.sleep(params.sleep)
    return info


class WriteChannelParams(OperationParams):
    data: str = Field(max_length=1 << 20, description="Base64 of the raw bytes to write.")


@diagnostic()
def write_channel(ctx: JobContext, params: WriteChannelParams) -> dict[str, Any]:
    """Write raw bytes into the job's channel to its worker (to test that the worker
    refuses anything outside the protocol: see tests/security/test_row02_job_channel.py)."""
    import base64
    import socket
    import stat

    data = base64.b64decode(params.data)
    for fd in range(3, 1024):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.type != socket.SOCK_STREAM:
                    continue
                sock.sendall(data)
                return {"fd": fd, "written": len(data)}
        except OSError:
            continue
    return {"fd": None, "written": 0}
