"""Isolation of job processes: no network, a uid of their own, a clean environment.

- The zygote calls `isolate_zygote()` first thing, before importing anything (a
  user namespace can only be entered by a single-threaded process). As root it
  enters a new network namespace (only a loopback interface, down: nothing is
  reachable, not even 127.0.0.1) and a mount namespace with its own /proc mounted
  `hidepid=invisible` (a job sees only its own processes). As another user it
  tries a user + network namespace (its uid mapped to itself). Every job forked
  afterwards inherits these at no per-job cost. If neither works the job keeps
  the worker's network, and `describe()` says so.
- Each job child calls `enter_job()` after fork (once: a child serves one
  owner's jobs): as root it becomes a fresh random uid/gid from `UID_RANGE` (no
  supplementary groups, so no job can read another owner's files nor the
  worker's), then no_new_privs, no capabilities,
  not dumpable, umask 077, and an environment replaced by `job_env()`.
- As root, after the imports, `expose()` lets job uids reach the Python tree
  even if it lies in a directory they may not enter (e.g. /root/.pyenv), inside
  the zygote's mount namespace only.
- The zygote is a child subreaper: whatever a job leaves behind (even after
  `setsid` and a double fork) becomes its child, and `isolation_procs.sweep()`
  kills it when the job ends.
- The zygote itself starts with `zygote_env()`, never the worker's environment,
  which holds secrets such as CSML_JOIN_TOKEN.
- Libraries that size a thread pool of their own (OpenMP, OpenBLAS, MKL, OpenCV)
  are given `job_threads(slots)` threads per job: the worker's CPUs shared by its
  slots (`THREAD_POOLS`, set in the zygote's environment before the app's
  imports read them; one the worker's environment sets wins). A worker of S
  slots runs S jobs at once: threads of one job beyond its share of the CPUs
  only wait for each other (OpenCV's pool spins, then sleeps, at every parallel
  call), and with every slot busy they take CPU from the other jobs.
"""

from __future__ import annotations

import ctypes
import os
import resource
import secrets
import stat
import tempfile
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

from csml.apps.imagesafety import OPENCV_MAX_PIXELS

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_SLAVE = 2, 4, 8, 1 << 12, 1 << 14, 1 << 19
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 4, 36, 38
_CAP_VERSION_3 = 0x20080522

# Never a login or container uid (systemd assigns 524288-1879048191 to containers;
# 0x7FFE0000 up is its "foreign" range, 2^31 up is avoided for signedness bugs).
UID_RANGE = range(0x70000000, 0x7FFE0000)
JOB_NPROC = 512  # processes + threads of one job (its uid is its own)
JOB_PATH = "/usr/bin:/bin"
PASSED_TO_ZYGOTE = (
    "PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED",
    "LANG", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM",
    "OPENCV_IO_MAX_IMAGE_PIXELS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CSML_ECHO_DIAGNOSTICS",
)  # fmt: skip
PASSED_TO_JOB = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM", "TZ",
    "CUDA_VISIBLE_DEVICES",
)  # fmt: skip
THREAD_POOLS = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM",
)  # fmt: skip
"""The libraries' own settings of their thread pool's size, read once when they load."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_SECUREBITS = _libc.prctl(27, 0, 0, 0, 0)  # PR_GET_SECUREBITS; inherited by forks


class IsolationError(RuntimeError):
    """The job could not be isolated as promised: it must not run."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl({option})")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {target}")


def isolate_zygote() -> list[str]:
    """Namespaces for the zygote (and so every job); returns the features achieved."""
    features: list[str] = []
    uid, gid = os.getuid(), os.getgid()
    if os.geteuid() == 0:
        try:
            _unshare(CLONE_NEWNET)
            features.append("netns")
        except OSError:
            pass
        try:
            _unshare(CLONE_NEWNS)
            _mount("none", "/", None, MS_REC | MS_SLAVE, None)  # nothing leaks to the host
            features.append("mountns")
            # "invisible", not "2": kernels before 5.8 share one set of proc options
            # across all mounts (this would change the host's /proc); they refuse it.
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
            features.append("hidepid")
        except OSError:
            pass
    else:
        try:
            _unshare(CLONE_NEWUSER | CLONE_NEWNET)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")):  # fmt: skip
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            features.append("userns-netns")
        except OSError:
            pass
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    return features


def _blocking(path: Path) -> list[Path]:
    """The ancestors of `path` that another uid may not traverse."""
    return [a for a in reversed(path.parents) if not os.stat(a).st_mode & stat.S_IXOTH]


def expose(paths: Iterable[str]) -> list[str]:
    """In this (private) mount namespace, let any uid reach `paths`; return those it cannot.

    For a path below a directory others may not enter (e.g. Python in /root/.pyenv,
    /root being 0700), a tmpfs is mounted over that directory holding only bind
    mounts of the way to the path: jobs reach the Python tree, and see nothing else
    of /root. The host's view and permissions are untouched.
    """
    plan: dict[Path, set[Path]] = {}  # directory to cover -> directories to bind in it
    for p in {os.path.realpath(p) for p in paths if os.path.isdir(p)}:
        if blocking := _blocking(Path(p)):
            chain = [*reversed(Path(p).parents), Path(p)]
            plan.setdefault(blocking[0], set()).add(chain[chain.index(blocking[-1]) + 1])
    for cover, binds in plan.items():
        outer = [b for b in binds if not any(o in b.parents for o in binds)]
        fds = {b: os.open(b, os.O_PATH | os.O_DIRECTORY) for b in outer}  # before hiding them
        try:
            _mount("tmpfs", str(cover), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0711,size=64k")
            for b, fd in fds.items():
                os.makedirs(b, mode=0o711, exist_ok=True)
                _mount(f"/proc/self/fd/{fd}", str(b), None, MS_BIND | MS_REC, None)
        finally:
            for fd in fds.values():
                os.close(fd)
    return sorted(p for p in paths if os.path.isdir(p) and _blocking(Path(p)))


def python_paths() -> list[str]:
    """What a job's lazy imports need to reach."""
    import sys

    found = [p for p in sys.path if p and os.path.isabs(p)]
    for name, module in list(sys.modules.items()):  # e.g. editable installs
        file = getattr(module, "__file__", None)
        if "." not in name and isinstance(file, str):
            found.append(os.path.dirname(file))
    exe = os.path.dirname(os.path.realpath(sys.executable))
    return [*found, sys.prefix, sys.base_prefix, sys.exec_prefix, exe]


def describe(features: Collection[str] | None, own_uid: bool) -> str:
    """The worker's `sandbox` string (at most 200 characters)."""
    if features is None:
        return "process per owner; sandbox not started"
    if "netns" in features:
        net = "no network (netns)"
    elif "userns-netns" in features:
        net = "no network (user+net namespace)"
    else:
        net = "NO network isolation available (namespaces refused)"
    parts = [
        "process per owner (warm zygote fork, reused)",
        net,
        "own random uid per owner" if own_uid else "worker's uid",
        "no_new_privs, private tmp, clean env",
    ]
    if "hidepid" in features:
        parts.append("hidepid /proc")
    parts.append("rlimits on memory, CPU, file size" + (", processes" if own_uid else ""))
    return "; ".join(parts)


def usable_cpus() -> int:
    """How many CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def job_threads(slots: int, cpus: int | None = None) -> int:
    """Threads per job for a worker of `slots` slots: its CPUs shared out, at least 1."""
    return max(1, (usable_cpus() if cpus is None else cpus) // max(1, slots))


def zygote_env(
    environ: Mapping[str, str] | None = None, threads: int | None = None
) -> dict[str, str]:
    """The zygote's whole environment: what imports need, no secret; with `threads`, the
    size of each library's thread pool (`THREAD_POOLS`) unless `environ` sets it."""
    source = os.environ if environ is None else environ
    env = {k: source[k] for k in PASSED_TO_ZYGOTE if k in source}
    if threads is not None:
        for name in THREAD_POOLS:
            env.setdefault(name, str(threads))
    env.setdefault("PATH", JOB_PATH)
    env.setdefault("LANG", "C.UTF-8")
    # Read by OpenCV once, when it loads in the zygote: a second guard behind imagesafety.
    env.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(OPENCV_MAX_PIXELS))
    return env


def job_env(tmp: str | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A job's whole environment (without HOME and TMPDIR if `tmp` is None)."""
    source = os.environ if environ is None else environ
    env = {k: source[k] for k in PASSED_TO_JOB if k in source}
    env.update(PATH=JOB_PATH, LANG="C.UTF-8")
    env["OPENCV_IO_MAX_IMAGE_PIXELS"] = source.get("OPENCV_IO_MAX_IMAGE_PIXELS", "") or str(
        OPENCV_MAX_PIXELS
    )
    if tmp is not None:
        env.update(HOME=tmp, TMPDIR=tmp)
    return env


_zygote_prepared = False


def prepare_zygote() -> None:
    """After the imports, once for all jobs (a fork inherits it; cheaper than after it):
    no_new_privs, not dumpable, and the jobs' environment (less HOME and TMPDIR). What
    the worker passed only for the imports goes; what the app's imports set stays."""
    global _zygote_prepared
    env = job_env(None)
    for name in set(PASSED_TO_ZYGOTE) - set(env):
        os.environ.pop(name, None)
    os.environ.update(env)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/PID/{environ,mem,fd} for others
    _zygote_prepared = True


def draw_uid(in_use: Collection[int] = ()) -> int:
    while (uid := UID_RANGE[secrets.randbelow(len(UID_RANGE))]) in in_use:
        pass
    return uid


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]


def enter_job(uid: int | None, gid: int | None, env: dict[str, str]) -> None:
    """In the job's child, after fork: drop everything. Raises IsolationError."""
    try:
        if uid is not None and gid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (JOB_NPROC, JOB_NPROC))
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if set(os.getresuid()) != {uid} or set(os.getresgid()) != {gid} or os.getgroups():
                raise IsolationError(f"still {os.getresuid()}/{os.getresgid()}")
        if not _zygote_prepared:
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
            _prctl(PR_SET_DUMPABLE, 0)
        if uid is None or _SECUREBITS != 0:
            # (leaving uid 0 for another clears every capability, unless securebits say not)
            data = (_CapData * 2)()
            _check(_libc.capset(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), data), "capset")
    except OSError as exc:
        raise IsolationError(str(exc)) from exc
    os.umask(0o077)
    if not _zygote_prepared:
        os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # forget a temp dir looked up in the zygote: use TMPDIR
