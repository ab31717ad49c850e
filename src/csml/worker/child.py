"""What runs inside a job's child process: limits and isolation first, then the operation.

Isolation (see `isolation.enter_job`): the job's own uid, no_new_privs, no
capabilities, a clean environment; its private tmp dir is HOME, TMPDIR and the
context's scratch folder. If isolation fails the operation does not run.

Messages to the parent over the pipe: ("progress", fraction, message),
then exactly one of ("ok", result) or ("error", message).
"""

from __future__ import annotations

import json
import os
import resource
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pydantic import ValidationError

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


def run_job(
    conn: Connection,
    app_name: str,
    operation: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    output_dir: str,
    limits: dict[str, Any],
    sandbox: dict[str, Any],
) -> None:
    from csml.apps.base import JobContext, JobError
    from csml.apps.registry import load_app
    from csml.worker.isolation import IsolationError, enter_job

    try:
        os.chdir(output_dir)
        apply_limits(
            int(limits["memory_mb"]), float(limits["cpu_seconds"]), int(limits["max_file_bytes"])
        )
        try:
            enter_job(sandbox["uid"], sandbox["gid"], sandbox["env"])
        except IsolationError as exc:
            conn.send(("error", f"the sandbox could not isolate the job: {exc}"))
            return
        op = load_app(app_name).operations[operation]
        ctx = JobContext(
            {k: Path(v) for k, v in inputs.items()},
            Path(output_dir),
            progress=lambda f, m: conn.send(("progress", f, m)),
            scratch=Path(sandbox["tmp"]),
        )
        result = op.run(ctx, params)
        json.dumps(result)  # must travel as JSON
        conn.send(("ok", result))
    except JobError as exc:
        conn.send(("error", str(exc)))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        conn.send(("error", f"invalid parameter {field}: {err['msg']}"))
    except MemoryError:
        conn.send(("error", f"exceeded its memory limit of {limits['memory_mb']} MB"))
    except (TypeError, ValueError) as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except Exception as exc:
        conn.send(("error", f"the operation failed: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()
