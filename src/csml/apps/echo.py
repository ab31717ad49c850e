"""`echo`: a built-in diagnostic app for tests, benchmarks and operators.

`echo` returns its parameters (and copies an optional file back); the other
operations misbehave on purpose so that the sandbox's limits can be checked.
"""

from __future__ import annotations

import ctypes
import shutil
import time
from typing import Any

from pydantic import ConfigDict, Field

from csml.apps.base import App, Input, JobContext, OperationParams, Output

app = App("echo", version="1.0", description="Diagnostics: echo parameters, misbehave on purpose.")


class EchoParams(OperationParams):
    model_config = ConfigDict(extra="allow")
    sleep: float = Field(0.0, ge=0, le=3600, description="Seconds to wait before answering.")


@app.operation(
    inputs=[Input("data", "Any file; copied back as output `data`.", required=False)],
    outputs=[Output("data", "The input file, unchanged.")],
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


@app.operation()
def allocate(ctx: JobContext, params: AllocateParams) -> dict[str, Any]:
    """Allocate and touch memory (to test the memory limit)."""
    block = bytearray(params.megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return {"allocated_mb": params.megabytes}


class SpinParams(OperationParams):
    seconds: float = Field(ge=0, le=3600, description="CPU seconds to burn.")


@app.operation()
def spin(ctx: JobContext, params: SpinParams) -> dict[str, Any]:
    """Burn CPU time (to test the CPU-time and wall-clock limits)."""
    end = time.process_time() + params.seconds
    n = 0
    while time.process_time() < end:
        n += 1
    return {"iterations": n}


class CrashParams(OperationParams):
    pass


@app.operation()
def crash(ctx: JobContext, params: CrashParams) -> dict[str, Any]:
    """Dereference a null pointer: the job process dies with SIGSEGV."""
    ctypes.string_at(0)
    return {}
