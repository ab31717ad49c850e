"""Run jobs in sandboxed child processes, one owner per process, killable at any time.

Children are forked by a zygote process (see `zygote.py`) that has already
imported the app's libraries. A child serves one owner (`owner` of `run`, the
coordinator's opaque `owner_key`): it runs that owner's consecutive jobs, one
at a time, and is never given another owner's job. Between jobs it waits idle;
it is killed on a timeout, cancellation, protocol violation, crash, CPU overrun
(measured per job by the worker from /proc), an out-of-memory error, processes
left behind after a job, a job that fails to answer, more than
`IDLE_RSS_ALLOWANCE` of memory kept after a job, CPU used while idle, after
`idle_ttl` seconds idle, or when more than `max_idle` children are idle or the
memory the idle children hold beyond the zygote's (each measured when it went
idle) is over `idle_bytes` (least recently used first: the memory they may keep
is bounded, and so is their number). Jobs without an owner (and confidential
jobs: the agent passes no owner) get a child of their own that ends with the job.
Whatever a job does (crash, leak, overrun) dies with its child and the worker
goes on.

Isolation (see `isolation.py`, `isolation_files.py`, `isolation_procs.py`): no
network, a random uid of its own per child when the worker is root (so per
owner: no job reads another owner's files, nor the worker's), a private tmp dir
(emptied between jobs), a clean environment, nothing left running after a job;
`description` says what is active on this machine. Within one owner, a job can
see what the owner's earlier jobs in the same child left in its memory (and
the libraries' caches); files of earlier jobs are taken back from its uid.

The worker talks to the zygote and to each child only through `channel` frames
(validated, size-bounded, never pickle): a child that sends anything outside
the protocol fails its job as a protocol violation and is killed; a zygote
that does is killed and restarted. Either way the worker goes on.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
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
from csml.worker.isolation import describe, job_threads, zygote_env
from csml.worker.isolation_files import (
    Grant,
    clear_tmp,
    grant_files,
    new_grant,
    remove_tmp,
    take_back,
)
from csml.worker.isolation_procs import ProcFile, children, read_proc
from csml.worker.scratch_folder import ScratchFolder

ProgressFn = Callable[[float, str], None]


@dataclass
class Outcome:
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False
    answered: bool = False  # the child answered (and may serve another job)
    retire: bool = False  # the child asked not to be given another job
    outputs: list[str] | None = None  # the regular files in its output dir (None: not known)


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


@dataclass
class _Resident:
    """A child and what it keeps from job to job: its channel, uid and tmp dir."""

    token: int
    child: _Child
    channel: JobChannel
    base: Grant
    owner: str
    limits: JobLimitsMsg
    jobs: int = 0
    idle_since: float = 0.0
    idle_cpu: float = 0.0  # its CPU time when it went idle
    warm: str = ""  # the model it holds loaded (a `placement.warm_key`), if any
    cpu: float = -1.0  # its CPU time as last read (-1: not read yet)
    rss: int = -1  # its resident memory, read with `cpu` once a job answered (-1: not read)
    threads: int = 0  # its threads, read with `rss` (0: not read)
    extra_bytes: int = 0  # resident memory beyond the zygote's, after its last job
    sandbox: JobSandboxMsg | None = None  # what every job of it is told (its uid, tmp, env)
    # Its /proc/PID/stat and its main thread's children, kept open once it started (read
    # at every job: `_stat`, `_left_behind`); closed by the cleaner once it is gone.
    stat: ProcFile | None = None
    kids: ProcFile | None = None


class ZygoteDied(RuntimeError):
    pass


READY_TIMEOUT = 120.0  # the zygote imports the app's libraries first
EXIT_GRACE = 5.0  # a child told to stop that lives on this long is killed
STARTED_WAIT = 5.0  # `_left_behind` waits this long at most for a fork to be named
IDLE_TTL = 60.0  # seconds a child may wait for its owner's next job
MAX_IDLE = 8  # children kept waiting, over all owners (by default; see Sandbox)
CPU_LIFETIME_FACTOR = 8  # a reused child's CPU rlimit, in per-job budgets (a backstop)
IDLE_CPU_ALLOWANCE = 0.5  # CPU seconds an idle child may use (e.g. a thread a job left)
IDLE_RSS_ALLOWANCE = 64 << 20  # memory an idle child may hold beyond the zygote's
MAX_REACHABLE = 4096  # folders known to be traversable, at most (then forgotten)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid: int) -> int:
    """Resident memory of a process (0 if it is gone)."""
    try:
        return int(read_proc(f"/proc/{pid}/statm").split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def cpu_seconds_of(pid: int) -> float:
    """CPU time of a process (all its threads, and its children it has reaped)."""
    return proc_stat(pid)[0]


def proc_stat(pid: int) -> tuple[float, int, int]:
    """CPU time (as `cpu_seconds_of`), resident memory (as `resident_bytes`) and threads
    of a process, from one read of /proc/PID/stat ((0, 0, 0) if it is gone)."""
    try:
        return _parse_stat(read_proc(f"/proc/{pid}/stat"))
    except (OSError, IndexError, ValueError):
        return 0.0, 0, 0


def _parse_stat(data: bytes) -> tuple[float, int, int]:
    fields = data.rsplit(b")", 1)[1].split()
    cpu = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return cpu / CLOCK_TICKS, int(fields[21]) * PAGE_SIZE, int(fields[17])


def _stat(resident: _Resident) -> tuple[float, int, int]:
    """`proc_stat` of a resident's child, through its kept /proc file once opened."""
    if resident.stat is None:
        return proc_stat(resident.child.pid)
    try:
        return _parse_stat(resident.stat.read())
    except (OSError, IndexError, ValueError):
        return 0.0, 0, 0


def _open_proc(resident: _Resident) -> None:
    """Keep the /proc files of a child that started read at each of its jobs (left
    unopened if it is already gone: they are read by path then)."""
    pid = resident.child.pid
    if resident.stat is not None or not pid:
        return
    try:
        stat = ProcFile(f"/proc/{pid}/stat")
    except OSError:
        return
    try:
        resident.kids = ProcFile(f"/proc/{pid}/task/{pid}/children")
    except OSError:
        stat.close()
        return
    resident.stat = stat


def _close_proc(resident: _Resident) -> None:
    for f in (resident.stat, resident.kids):
        if f is not None:
            f.close()


@functools.lru_cache(maxsize=64)
def _limits(
    memory_mb: int, cpu_seconds: float, cpu_lifetime_seconds: float, max_file_bytes: int
) -> JobLimitsMsg:
    """(A frozen message: jobs of the same limits share one.)"""
    return JobLimitsMsg(
        memory_mb=memory_mb,
        cpu_seconds=cpu_seconds,
        cpu_lifetime_seconds=cpu_lifetime_seconds,
        max_file_bytes=max_file_bytes,
    )


def evictions(idle: list[tuple[int, int]], max_idle: int, idle_bytes: int) -> list[int]:
    """The idle children to end, least recently used first, so that at most `max_idle`
    remain holding at most `idle_bytes` beyond the zygote in all. `idle`: (token, bytes
    held beyond the zygote) of each idle child, least recently used first."""
    left, held = len(idle), sum(extra for _, extra in idle)
    out: list[int] = []
    for token, extra in idle:
        if left <= max_idle and held <= idle_bytes:
            break
        out.append(token)
        left, held = left - 1, held - extra
    return out


class Sandbox:
    """`workdir`: the worker's folder for job files, if not in the temp dir: the
    sandbox may then let job uids traverse it (and what lies below it).

    Idle children: at most `max_idle`, holding at most `idle_bytes` of memory beyond the
    zygote's in all (default: `max_idle` times `IDLE_RSS_ALLOWANCE`, what `max_idle`
    children may each keep).

    `slots`: how many jobs the worker runs at once; each job's libraries then size their
    thread pools to its share of the CPUs (`isolation.job_threads`; None: their own
    defaults)."""

    def __init__(
        self,
        app_name: str,
        workdir: Path | None = None,
        *,
        idle_ttl: float = IDLE_TTL,
        max_idle: int = MAX_IDLE,
        idle_bytes: int | None = None,
        slots: int | None = None,
    ) -> None:
        self.app_name = app_name
        self.job_threads = None if slots is None else job_threads(slots)
        self.idle_ttl = idle_ttl
        self.max_idle = max_idle
        self.idle_bytes = max_idle * IDLE_RSS_ALLOWANCE if idle_bytes is None else idle_bytes
        self._idle: dict[int, _Resident] = {}  # by token, least recently used first
        self._idle_held = 0  # the `extra_bytes` of the idle children, summed
        self.own_uid = os.geteuid() == 0  # root: each job gets a uid of its own
        self._lock = threading.Lock()
        self._children: dict[int, _Child] = {}
        self._pids: dict[int, int] = {}  # the pids of `_children` (each counted: reuse)
        self._tokens = itertools.count(1)
        self._root = ScratchFolder("csml-sandbox-")  # (sweeps those of killed workers)
        self._tmp_root = self._root.path
        if self.own_uid:
            os.chmod(self._tmp_root, 0o711)  # noqa: S103 - traverse only, for job uids
        self._roots = [self._tmp_root.parent, *([workdir.parent] if workdir else [])]
        self._reachable: set[str] = set()  # folders jobs can traverse (see `grant_files`)
        self._ready = threading.Event()
        self._features: list[str] | None = None
        self._zygote_rss, self._zygote_rss_at = 0, -1e9  # see `_zygote_bytes`
        self._start_zygote()
        self._finished: queue.Queue[_Resident | None] = queue.Queue()
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
            env=zygote_env(threads=self.job_threads),  # never the worker's: CSML_JOIN_TOKEN
        )
        theirs.close()
        # Its main thread's children (the jobs' processes and the orphans it adopted),
        # read at every job (`_left_behind`) through a descriptor kept open; replaced and
        # closed under `_lock` (where it is read) when the zygote is restarted or closed.
        try:
            self._zygote_kids: ProcFile | None = ProcFile(
                f"/proc/{self._zygote.pid}/task/{self._zygote.pid}/children"
            )
        except OSError:
            self._zygote_kids = None  # gone already: read by path (`_left_behind`)
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
                if found is not None and isinstance(message, StartedMsg) and not found.pid:
                    found.pid = message.pid
                    self._pids[found.pid] = self._pids.get(found.pid, 0) + 1
            if found is None:
                continue
            if isinstance(message, StartedMsg):
                found.started.set()
            else:
                found.status = message.status
                found.exited.set()

    def _ensure_zygote(self) -> None:
        with self._lock:
            if self._zygote.poll() is None:
                return
            self._ctrl.close()
            self._close_zygote_kids()
            self._start_zygote()

    def _close_zygote_kids(self) -> None:
        """(Under `_lock`.)"""
        if self._zygote_kids is not None:
            self._zygote_kids.close()
            self._zygote_kids = None

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._idle_held = list(self._idle.values()), {}, 0
        for r in idle:
            r.channel.close()
        self._ctrl.close()  # the zygote kills any job left, then exits
        try:
            self._zygote.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._zygote.kill()
        with self._lock:
            self._close_zygote_kids()
        self._finished.put(None)
        self._cleaner.join(timeout=10)
        if not self._cleaner.is_alive():  # (it read their /proc files: `_expire_idle`)
            for r in idle:
                _close_proc(r)
        self._root.close()

    def run(
        self,
        job: SandboxJob,
        on_progress: ProgressFn | None = None,
        owner: str = "",
        warm: str = "",
        on_started: Callable[[], None] | None = None,
        started_grace: float = 0.0,
    ) -> Outcome:
        """Run `job` in a child of `owner` (reused if one waits idle; "" for a child of
        its own). `warm`: the job's model stays loaded in its child if it succeeds (see
        `warm_models`). `on_started()` is called once the job has been in its child for
        `started_grace` seconds without answering (never if it answers sooner), or before
        waiting for a new child to start (it may be called again)."""
        limits = _limits(
            job.memory_mb,
            job.cpu_seconds,
            job.cpu_seconds * (CPU_LIFETIME_FACTOR if owner else 1),
            job.max_file_bytes,
        )
        resident = self._checkout(owner, limits)
        if resident is None:
            try:
                self._ensure_zygote()  # (a reused child needs no zygote: it is forked)
                resident = self._spawn(owner, limits)
            except OSError as exc:
                return Outcome(ok=False, error=f"the sandbox could not prepare the job: {exc}")
        reuse = False
        try:
            if len(self._reachable) > MAX_REACHABLE:
                self._reachable.clear()
            try:
                grant = grant_files(
                    resident.base,
                    job.inputs.values(),
                    job.output_dir,
                    self._roots,
                    self._reachable,
                )
            except OSError as exc:
                return Outcome(ok=False, error=f"the sandbox could not prepare the job: {exc}")
            kept: list[str] = []
            try:
                outcome = self._run(resident, job, grant, on_progress, on_started, started_grace)
            finally:
                kept = take_back(grant)  # now: the worker uploads the outputs next
            outcome.outputs = kept
            reuse = (
                bool(owner)
                and outcome.answered
                and not outcome.retire
                and not resident.child.exited.is_set()
                and self._cpu_left(resident, job)
                and not self._left_behind(resident)
                and not self._too_big(resident)
            )
            return outcome
        finally:
            if reuse:
                if warm and outcome.ok:
                    resident.warm = warm
                clear_tmp(resident.base)
                self._checkin(resident)
            else:
                self._retire(resident)

    def warm_models(self) -> list[str]:
        """The warm keys of the models idle children hold loaded (most recent first)."""
        with self._lock:
            return list(dict.fromkeys(r.warm for r in reversed(self._idle.values()) if r.warm))

    def _checkout(self, owner: str, limits: JobLimitsMsg) -> _Resident | None:
        """An idle child of `owner` made for the same limits, if any."""
        if not owner:
            return None
        with self._lock:
            for token, r in reversed(self._idle.items()):  # most recently used first
                if r.owner == owner and (r.limits is limits or r.limits == limits):
                    self._pop_idle(token)
                    break
            else:
                return None
        if r.child.exited.is_set() or r.channel.pending() or self._busy_while_idle(r):
            self._retire(r)  # died, spoke out of turn, or worked while idle
            return None
        return r

    @staticmethod
    def _busy_while_idle(resident: _Resident) -> bool:
        resident.cpu = _stat(resident)[0]  # read at checkout: the job's start
        return resident.cpu - resident.idle_cpu > IDLE_CPU_ALLOWANCE

    def _checkin(self, resident: _Resident) -> None:
        """(After a job answered: `resident.cpu` was read then, by the overrun check.)"""
        resident.idle_since = time.monotonic()
        resident.idle_cpu = resident.cpu
        with self._lock:
            self._idle[resident.token] = resident
            self._idle_held += resident.extra_bytes
            if len(self._idle) <= self.max_idle and self._idle_held <= self.idle_bytes:
                return  # (the usual case: no walk over every idle child per job)
            over = evictions(
                [(r.token, r.extra_bytes) for r in self._idle.values()],
                self.max_idle,
                self.idle_bytes,
            )
            evicted = [self._pop_idle(token) for token in over]
        for r in evicted:
            self._retire(r)

    def _pop_idle(self, token: int) -> _Resident:
        """(Under `_lock`.) An idle child, no longer idle."""
        resident = self._idle.pop(token)
        self._idle_held -= resident.extra_bytes
        return resident

    def _expire_idle(self) -> None:
        """Retire children idle too long, or that use CPU while idle."""
        cutoff = time.monotonic() - self.idle_ttl
        with self._lock:
            idle = list(self._idle.values())
        busy = {r.token for r in idle if self._busy_while_idle(r)}
        with self._lock:
            expired = [r for r in self._idle.values() if r.idle_since < cutoff or r.token in busy]
            for r in expired:
                self._pop_idle(r.token)
        for r in expired:
            self._retire(r)

    def _spawn(self, owner: str, limits: JobLimitsMsg) -> _Resident:
        """Ask the zygote for a new child: a uid and tmp dir of its own."""
        token = next(self._tokens)
        child = _Child()
        with self._lock:
            in_use = {c.uid for c in self._children.values() if c.uid is not None}
            self._children[token] = child
        try:
            base = new_grant(self._tmp_root, self.own_uid, in_use, name=f"child-{token}")
        except OSError:
            child.started.set()  # it never will (`_left_behind` waits for no such child)
            with self._lock:
                self._forget(token)
            raise
        child.uid = base.uid
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        resident = _Resident(token, child, JobChannel(ours), base, owner, limits)
        try:
            zygote.send(self._ctrl, RunMsg(token=token), [theirs.fileno()])
            child.sent = True
        except OSError:
            child.started.set()  # it never will (`_left_behind` waits for no such child)
            self._retire(resident)
            raise
        finally:
            theirs.close()
        return resident

    def _forget(self, token: int) -> None:
        """(Under `_lock`.) A child is gone: no longer one of `_children`."""
        child = self._children.pop(token, None)
        if child is not None and child.pid:
            left = self._pids.pop(child.pid) - 1
            if left:
                self._pids[child.pid] = left

    def _retire(self, resident: _Resident) -> None:
        """End a child: its channel closes (it exits), the cleaner makes sure of it."""
        resident.channel.close()
        self._finished.put(resident)

    def _clean(self) -> None:
        """Remove each retired child's tmp dir once it and all it started are gone;
        retire children idle too long."""
        checked = time.monotonic()
        while True:
            item: _Resident | None = None
            try:
                item = self._finished.get(timeout=1.0)
                got = True
            except queue.Empty:
                got = False
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                self._expire_idle()
            if not got:
                continue
            if item is None:
                return
            child = item.child
            if child.sent and not child.exited.wait(EXIT_GRACE):
                self._kill(child)
                child.exited.wait(10)
            remove_tmp(item.base)
            _close_proc(item)  # (only this thread reads the files of a retired child)
            with self._lock:
                self._forget(item.token)

    def _cpu_left(self, resident: _Resident, job: SandboxJob) -> bool:
        """Whether the child may take another job of full CPU budget under its rlimit
        (`resident.cpu`: read by the overrun check once the job answered)."""
        used = resident.cpu
        return used + job.cpu_seconds + 1 < resident.limits.cpu_lifetime_seconds

    def _too_big(self, resident: _Resident) -> bool:
        """Whether the child holds too much memory to be kept idle (what a job allocated
        stays with its process; the idle cap times this bounds what idle children hold)."""
        rss = resident.rss if resident.rss >= 0 else resident_bytes(resident.child.pid)
        extra = rss - self._zygote_bytes()
        resident.extra_bytes = max(0, extra)
        return extra > IDLE_RSS_ALLOWANCE

    def _zygote_bytes(self) -> int:
        """The zygote's resident memory, read at most once a second (it changes little:
        it only forks)."""
        now = time.monotonic()
        if now - self._zygote_rss_at >= 1.0:
            self._zygote_rss, self._zygote_rss_at = resident_bytes(self._zygote.pid), now
        return self._zygote_rss

    def _left_behind(self, resident: _Resident) -> bool:
        """Processes the job left: children of its child (of each of its threads; of its
        only one, as it had when it answered: no listing of its threads), or orphans the
        zygote adopted (any child of the zygote's that is not a job's; a child forked for
        another job meanwhile is a job's once the zygote's StartedMsg names it: it is
        waited for, instead of taken for an orphan, which ended a healthy child)."""
        if resident.threads == 1 and resident.kids is not None:
            try:
                if resident.kids.read().split():
                    return True
            except OSError:
                pass  # gone: then it left nothing (orphans show as the zygote's)
        elif children(resident.child.pid, threads=resident.threads != 1):
            return True
        with self._lock:
            try:
                if self._zygote_kids is not None:
                    adopted = set(self._zygote_kids.pids())
                else:
                    adopted = set(children(self._zygote.pid, threads=False))
            except (OSError, ValueError):
                adopted = set()  # the zygote is gone (it is restarted at the next spawn)
            unknown = adopted - self._pids.keys()
            if not unknown:
                return False
            # A child the zygote has just forked for another job (another slot's) is one
            # of its children before its StartedMsg names it: wait for the children asked
            # for and not yet named (each was listed in `_children` before it was asked
            # for, so before it could be forked), then look again at the pids read here.
            starting = [c for c in self._children.values() if not c.pid]
        for c in starting:
            if not c.started.wait(STARTED_WAIT):
                return True  # (fails closed: the child is not kept)
        with self._lock:
            return not self._pids.keys() >= unknown

    def _run(
        self,
        resident: _Resident,
        job: SandboxJob,
        grant: Grant,
        on_progress: ProgressFn | None,
        on_started: Callable[[], None] | None = None,
        started_grace: float = 0.0,
    ) -> Outcome:
        """Start the job and supervise it until it answers, or dies and is reaped."""
        child = resident.child
        if resident.sandbox is None:  # a grant's uid, gid and tmp are its base's
            resident.sandbox = JobSandboxMsg(**grant.payload())
        final: Outcome | None
        try:
            if on_started is not None and not child.started.is_set():
                on_started()  # no waiting before it
            if not child.started.wait(timeout=READY_TIMEOUT):
                raise OSError("the zygote did not start the job's process")
            _open_proc(resident)
            # A reused child's CPU was read at checkout, right before this job.
            cpu_before = resident.cpu if resident.cpu >= 0 else _stat(resident)[0]

            def overrun() -> str | None:
                resident.cpu, resident.rss, resident.threads = _stat(resident)
                if resident.cpu - cpu_before > job.cpu_seconds:
                    return f"exceeded its CPU-time limit of {job.cpu_seconds:g} s"
                return None

            resident.channel.start(
                StartMsg(
                    operation=job.operation,
                    params=job.params,
                    inputs={k: str(v) for k, v in job.inputs.items()},
                    output_dir=str(job.output_dir),
                    limits=resident.limits,
                    sandbox=resident.sandbox,
                )
            )
            resident.jobs += 1
            if on_started is not None and started_grace <= 0:
                on_started()
                on_started = None
        except ProtocolViolation as exc:
            final = Outcome(ok=False, error=f"protocol violation by the job process: {exc}")
        except ValueError as exc:  # over the start message's cap
            final = Outcome(ok=False, error=f"the job could not be sent to its process: {exc}")
        except OSError:
            final = None
        else:
            final = supervise(
                resident.channel, job, on_progress, overrun, on_started, started_grace
            )
        if final is not None and final.answered:
            return final
        resident.channel.close()
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
    channel: JobChannel,
    job: SandboxJob,
    on_progress: ProgressFn | None = None,
    overrun: Callable[[], str | None] | None = None,
    on_slow: Callable[[], None] | None = None,
    slow_after: float = 0.0,
) -> Outcome | None:
    """The job's outcome as its channel tells it: its answer, or a protocol violation,
    timeout, cancellation or overrun (`overrun()` names one; checked while the job
    runs and once it answered): the child must then be killed. None if the child
    ended without answering (its wait status says why). `on_slow()` is called once if
    the job has not answered `slow_after` seconds after this call."""
    try:
        final = _supervise(channel, job, on_progress, overrun, on_slow, slow_after)
    except ProtocolViolation as exc:
        return Outcome(ok=False, error=f"protocol violation by the job process: {exc}")
    except (OSError, ChannelClosed):
        return None
    if isinstance(final, ResultMsg | ErrorMsg) and overrun is not None and (why := overrun()):
        return Outcome(ok=False, error=why)
    if isinstance(final, ResultMsg):
        return Outcome(ok=True, result=dict(final.result), answered=True)
    if isinstance(final, ErrorMsg):
        return Outcome(ok=False, error=final.message, answered=True, retire=final.retire)
    return final


def _supervise(
    channel: JobChannel,
    job: SandboxJob,
    on_progress: ProgressFn | None,
    overrun: Callable[[], str | None] | None,
    on_slow: Callable[[], None] | None = None,
    slow_after: float = 0.0,
) -> ResultMsg | ErrorMsg | Outcome:
    """Relay progress until the child answers, overruns or is cancelled (`on_slow`: see
    `supervise`).

    Raises ChannelClosed (it died without answering), ProtocolViolation."""
    now = time.monotonic()
    deadline = now + job.timeout_seconds
    slow_at = now + slow_after
    while True:
        if job.cancel.is_set():
            return Outcome(ok=False, error="cancelled", cancelled=True)
        now = time.monotonic()
        remaining = deadline - now
        if remaining <= 0:
            return Outcome(ok=False, error=f"exceeded its time limit of {job.timeout_seconds:g} s")
        if on_slow is not None and now >= slow_at:
            on_slow()
            on_slow = None
        wait = min(remaining, 0.2) if on_slow is None else min(remaining, slow_at - now)
        message = channel.next(wait)
        if message is None:
            if overrun is not None and (why := overrun()):
                return Outcome(ok=False, error=why)
            continue
        if isinstance(message, ProgressMsg):
            if on_progress is not None:
                on_progress(message.fraction, message.message)
            continue
        return message
