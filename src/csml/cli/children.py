"""The processes a CLI command starts (`csml up`'s workers, `csml demo`'s platform):
what they are given, how they end.

Invariants:
- A child gets only the environment it needs: no `CSML_*` setting of the
  coordinator (operator token, database URL, data folder...) reaches a worker;
  secrets a worker does need (its join token) go over its stdin, never the
  environment.
- A child started with `--parent-pid` ends when its parent does, even a parent
  killed with SIGKILL: on Linux the kernel sends it SIGTERM (`PR_SET_PDEATHSIG`),
  elsewhere a thread polls the parent's pid. A parent that died before the
  child set this up is noticed at once.
- `stop_processes` always leaves nothing running: SIGTERM, a grace period, then
  SIGKILL for whatever is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger("csml.cli")

# What `csml worker` reads from the environment besides what it is told by `csml up`.
WORKER_SETTINGS = frozenset(
    {
        "CSML_CLAIM_WAIT",
        "CSML_WORKDIR",
        "CSML_ATTESTATION",
        "CSML_ATTESTATION_COLLATERAL",
        "CSML_ATTESTATION_PROVIDERS",
        "CSML_INSECURE_HTTP",
        "CSML_ECHO_DIAGNOSTICS",
    }
)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def worker_env(
    environ: Mapping[str, str], coordinator: str, pin_sha256: str | None = None
) -> dict[str, str]:
    """A local worker's environment: the caller's, minus every coordinator setting."""
    env = {k: v for k, v in environ.items() if not k.startswith("CSML_") or k in WORKER_SETTINGS}
    env["CSML_COORDINATOR"] = coordinator
    if pin_sha256:
        env["CSML_PIN_SHA256"] = pin_sha256
    return env


def exit_with_parent(parent_pid: int) -> None:
    """Get SIGTERM when `parent_pid` (our parent) dies, however it dies."""
    armed = False
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # it died before we could ask
        os.kill(os.getpid(), signal.SIGTERM)


def orphaned(parent_pid: int | None) -> bool:
    """True when we were started with `--parent-pid` and that parent is gone."""
    return parent_pid is not None and os.getppid() != parent_pid


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM each, wait up to `grace` seconds in all, SIGKILL what is left; reap all."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("process %d did not stop within %g s; killing it", p.pid, grace)
            p.kill()
            p.wait()
