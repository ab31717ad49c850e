"""Run each job in its own child process, with limits, isolated, killable at any time.

Children are forked by a zygote process (see `zygote.py`) that has already
imported the app's libraries, so a job starts in about a millisecond while
still getting a fresh process: whatever it does (crash, leak, overrun) dies
with it and the worker goes on.

Isolation (see `isolation.py`, `isolation_files.py`, `isolation_procs.py`): no
network, a random uid of its own per job when the worker is root, a private tmp
dir, a clean environment, nothing left running after it; `description` says what
is active on this machine.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from csml.worker import zygote
from csml.worker.isolation import describe, zygote_env
from csml.worker.isolation_files import Grant, hand_over, remove_tmp, take_back

ProgressFn = Callable[[float, str], None]


@dataclass
class Outcome:
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False


@dataclass
class SandboxJob:
    operation: str
    params: dict[str, Any]
    inputs: dict[str, Path]
    output_dir: Path
    timeout_seconds: float
    memory_mb: int
    cpu_seconds: float
    max_file_bytes: int = 1 << 30
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Child:
    started: threading.Event = field(default_factory=threading.Event)
    exited: threading.Event = field(default_factory=threading.Event)
    pid: int = 0
    status: int | None = None
    uid: int | None = None
    sent: bool = False  # the zygote was asked to start it


class ZygoteDied(RuntimeError):
    pass


READY_TIMEOUT = 120.0  # the zygote imports the app's libraries first
EXIT_GRACE = 5.0  # a child that answered yet lives on this long is killed


class Sandbox:
    """`workdir`: the worker's folder for job files, if not in the temp dir: the
    sandbox may then let job uids traverse it (and what lies below it)."""

    def __init__(self, app_name: str, workdir: Path | None = None) -> None:
        self.app_name = app_name
        self.own_uid = os.geteuid() == 0  # root: each job gets a uid of its own
        self._lock = threading.Lock()
        self._children: dict[int, _Child] = {}
        self._tokens = itertools.count(1)
        self._tmp_root = Path(tempfile.mkdtemp(prefix="csml-sandbox-"))
        if self.own_uid:
            os.chmod(self._tmp_root, 0o711)  # noqa: S103 - traverse only, for job uids
        self._roots = [self._tmp_root.parent, *([workdir.parent] if workdir else [])]
        self._ready = threading.Event()
        self._features: list[str] | None = None
        self._start_zygote()
        self._finished: queue.Queue[tuple[int, _Child, Grant] | None] = queue.Queue()
        self._cleaner = threading.Thread(target=self._clean, daemon=True, name="sandbox-clean")
        self._cleaner.start()

    @property
    def description(self) -> str:
        """What isolation is active (known once the zygote is ready)."""
        self._ready.wait(READY_TIMEOUT)
        return describe(self._features, self.own_uid)

    def _start_zygote(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ctrl = ours
        self._zygote = subprocess.Popen(
            [
                *(sys.executable, "-m", "csml.worker.zygote"),
                *(self.app_name, str(theirs.fileno()), *map(str, self._roots)),
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=zygote_env(),  # never the worker's: it holds CSML_JOIN_TOKEN
        )
        theirs.close()
        self._reader = threading.Thread(target=self._read_control, daemon=True, name="zygote")
        self._reader.start()

    def _read_control(self) -> None:
        ctrl = self._ctrl
        while True:
            try:
                message, _ = zygote.recv(ctrl)
            except OSError:
                message = None
            if message is None:
                with self._lock:
                    for child in self._children.values():
                        child.started.set()
                        child.exited.set()
                self._ready.set()
                return
            kind, token, value = message
            if kind == "ready" and isinstance(value, list):
                self._features = [str(f) for f in value]
                self._ready.set()
                continue
            if not isinstance(token, int) or not isinstance(value, int):
                continue
            with self._lock:
                found = self._children.get(token)
            if found is None:
                continue
            if kind == "started":
                found.pid = value
                found.started.set()
            elif kind == "exited":
                found.status = value
                found.exited.set()

    def _ensure_zygote(self) -> None:
        with self._lock:
            if self._zygote.poll() is None:
                return
            self._ctrl.close()
            self._start_zygote()

    def close(self) -> None:
        self._ctrl.close()  # the zygote kills any job left, then exits
        try:
            self._zygote.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._zygote.kill()
        self._finished.put(None)
        self._cleaner.join(timeout=10)
        shutil.rmtree(self._tmp_root, ignore_errors=True)

    def run(self, job: SandboxJob, on_progress: ProgressFn | None = None) -> Outcome:
        self._ensure_zygote()
        token = next(self._tokens)
        child = _Child()
        with self._lock:
            in_use = {c.uid for c in self._children.values() if c.uid is not None}
            self._children[token] = child
        try:
            grant = hand_over(
                job.inputs.values(),
                job.output_dir,
                self._tmp_root,
                self.own_uid,
                in_use,
                name=f"job-{token}",
                roots=self._roots,
            )
        except OSError as exc:
            with self._lock:
                self._children.pop(token, None)
            return Outcome(ok=False, error=f"the sandbox could not prepare the job: {exc}")
        child.uid = grant.uid
        try:
            return self._run(token, child, job, grant, on_progress)
        finally:
            take_back(grant)  # now: the worker uploads the outputs next
            self._finished.put((token, child, grant))

    def _clean(self) -> None:
        """Remove each job's tmp dir once its child and all it started are gone."""
        while (item := self._finished.get()) is not None:
            token, child, grant = item
            if child.sent and not child.exited.wait(EXIT_GRACE):
                self._kill(child)
                child.exited.wait(10)
            remove_tmp(grant)
            with self._lock:
                self._children.pop(token, None)

    def _run(
        self,
        token: int,
        child: _Child,
        job: SandboxJob,
        grant: Grant,
        on_progress: ProgressFn | None,
    ) -> Outcome:
        """Start the child and supervise it until it answers, or dies and is reaped."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        conn = Connection(os.dup(ours.fileno()))
        ours.close()
        try:
            try:
                zygote.send(self._ctrl, ("run", token), [theirs.fileno()])
                child.sent = True
            finally:
                theirs.close()
            conn.send(
                {
                    "operation": job.operation,
                    "params": job.params,
                    "inputs": {k: str(v) for k, v in job.inputs.items()},
                    "output_dir": str(job.output_dir),
                    "limits": {
                        "memory_mb": job.memory_mb,
                        "cpu_seconds": job.cpu_seconds,
                        "max_file_bytes": job.max_file_bytes,
                    },
                    "sandbox": grant.payload(),
                }
            )
            final = self._supervise(conn, child, job, on_progress)
        except OSError:
            final = None
        finally:
            conn.close()
        if isinstance(final, tuple):  # it answered, and exits by itself (see `_clean`)
            if final[0] == "ok":
                return Outcome(ok=True, result=final[1])
            return Outcome(ok=False, error=str(final[1]))
        if isinstance(final, Outcome):
            self._kill(child)
        child.exited.wait(timeout=10)
        if isinstance(final, Outcome):
            return final
        return Outcome(ok=False, error=self._death(child.status, job))

    def _kill(self, child: _Child) -> None:
        child.started.wait(timeout=10)
        if child.pid and not child.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)

    @staticmethod
    def _supervise(
        conn: Connection, child: _Child, job: SandboxJob, on_progress: ProgressFn | None
    ) -> tuple[Any, ...] | Outcome | None:
        """Relay progress until the child answers, dies, overruns or is cancelled."""
        deadline = time.monotonic() + job.timeout_seconds
        while True:
            if job.cancel.is_set():
                return Outcome(ok=False, error="cancelled", cancelled=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Outcome(
                    ok=False, error=f"exceeded its time limit of {job.timeout_seconds:g} s"
                )
            if not wait([conn], timeout=min(remaining, 0.2)):
                continue
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return None  # died without answering
            if message[0] == "progress":
                if on_progress is not None:
                    on_progress(float(message[1]), str(message[2]))
                continue
            return tuple(message)

    @staticmethod
    def _death(status: int | None, job: SandboxJob) -> str:
        """Why a child ended without answering."""
        if status is None:
            return "the job process ended without a result (sandbox restarted)"
        if os.WIFEXITED(status):
            return f"the job process exited with status {os.WEXITSTATUS(status)} without a result"
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return f"exceeded its CPU-time limit of {job.cpu_seconds:g} s"
        if sig == signal.SIGXFSZ:
            return f"wrote a file over the limit of {job.max_file_bytes} bytes"
        if sig == signal.SIGKILL:
            return (
                "the job process was killed (SIGKILL), most likely for memory "
                f"(limit {job.memory_mb} MB)"
            )
        if sig == signal.SIGSEGV:
            return "the job process crashed (SIGSEGV, segmentation fault)"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"the job process died from {name}"
