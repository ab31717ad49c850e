"""Run each job in its own child process, with limits, isolated, killable at any time.

Children are forked by a zygote process (see `zygote.py`) that has already
imported the app's libraries, so a job starts in about a millisecond while
still getting a fresh process: whatever it does (crash, leak, overrun) dies
with it and the worker goes on.

Isolation (see `isolation.py`, `isolation_files.py`, `isolation_procs.py`): no
network, a random uid of its own per job when the worker is root, a private tmp
dir, a clean environment, nothing left running after it; `description` says what
is active on this machine.

The worker talks to the zygote and to each child only through `channel` frames
(validated, size-bounded, never pickle): a child that sends anything outside
the protocol fails its job as a protocol violation and is killed; a zygote
that does is killed and restarted. Either way the worker goes on.
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
from pathlib import Path
from typing import Any

from csml.worker import zygote
from csml.worker.channel import (
    FROM_ZYGOTE,
    ChannelClosed,
    ErrorMsg,
    ExitedMsg,
    JobChannel,
    JobLimitsMsg,
    JobSandboxMsg,
    ProgressMsg,
    ProtocolViolation,
    ReadyMsg,
    ResultMsg,
    RunMsg,
    StartedMsg,
    StartMsg,
)
from csml.worker.isolation import describe, zygote_env
from csml.worker.isolation_files import Grant, hand_over, remove_tmp, take_back

ProgressFn = Callable[[float, str], None]


@dataclass
class Outcome:
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False
    answered: bool = False  # the child answered (and exits by itself)


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
                message, fds = zygote.recv(ctrl, FROM_ZYGOTE)
            except ProtocolViolation as exc:
                print(f"csml worker: the zygote broke the protocol ({exc}); restarting it",
                      file=sys.stderr)  # fmt: skip
                self._zygote.kill()
                message, fds = None, []
            except OSError:
                message, fds = None, []
            for fd in fds:  # the zygote sends none
                os.close(fd)
            if message is None:
                with self._lock:
                    for child in self._children.values():
                        child.started.set()
                        child.exited.set()
                self._ready.set()
                return
            if isinstance(message, ReadyMsg):
                self._features = list(message.features)
                self._ready.set()
                continue
            assert isinstance(message, StartedMsg | ExitedMsg)
            with self._lock:
                found = self._children.get(message.token)
            if found is None:
                continue
            if isinstance(message, StartedMsg):
                found.pid = message.pid
                found.started.set()
            else:
                found.status = message.status
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
        channel = JobChannel(ours)
        final: Outcome | None
        try:
            try:
                zygote.send(self._ctrl, RunMsg(token=token), [theirs.fileno()])
                child.sent = True
            finally:
                theirs.close()
            payload = grant.payload()
            channel.start(
                StartMsg(
                    operation=job.operation,
                    params=job.params,
                    inputs={k: str(v) for k, v in job.inputs.items()},
                    output_dir=str(job.output_dir),
                    limits=JobLimitsMsg(
                        memory_mb=job.memory_mb,
                        cpu_seconds=job.cpu_seconds,
                        max_file_bytes=job.max_file_bytes,
                    ),
                    sandbox=JobSandboxMsg(**payload),
                )
            )
        except ProtocolViolation as exc:
            final = Outcome(ok=False, error=f"protocol violation by the job process: {exc}")
        except ValueError as exc:  # over the start message's cap
            final = Outcome(ok=False, error=f"the job could not be sent to its process: {exc}")
        except OSError:
            final = None
        else:
            final = supervise(channel, job, on_progress)
        finally:
            channel.close()
        if final is not None and final.answered:  # it exits by itself (see `_clean`)
            return final
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


def supervise(
    channel: JobChannel, job: SandboxJob, on_progress: ProgressFn | None = None
) -> Outcome | None:
    """The job's outcome as its channel tells it: its answer, or a protocol violation,
    timeout or cancellation (the child must then be killed); None if the child ended
    without answering (its wait status says why)."""
    try:
        final = _supervise(channel, job, on_progress)
    except ProtocolViolation as exc:
        return Outcome(ok=False, error=f"protocol violation by the job process: {exc}")
    except (OSError, ChannelClosed):
        return None
    if isinstance(final, ResultMsg):
        return Outcome(ok=True, result=dict(final.result), answered=True)
    if isinstance(final, ErrorMsg):
        return Outcome(ok=False, error=final.message, answered=True)
    return final


def _supervise(
    channel: JobChannel, job: SandboxJob, on_progress: ProgressFn | None
) -> ResultMsg | ErrorMsg | Outcome:
    """Relay progress until the child answers, overruns or is cancelled.

    Raises ChannelClosed (it died without answering), ProtocolViolation."""
    deadline = time.monotonic() + job.timeout_seconds
    while True:
        if job.cancel.is_set():
            return Outcome(ok=False, error="cancelled", cancelled=True)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Outcome(ok=False, error=f"exceeded its time limit of {job.timeout_seconds:g} s")
        message = channel.next(min(remaining, 0.2))
        if message is None:
            continue
        if isinstance(message, ProgressMsg):
            if on_progress is not None:
                on_progress(message.fraction, message.message)
            continue
        return message
