"""The zygote: a process that has imported the app once and forks one child per job.

Started as `python -m csml.worker.zygote APP FD [DIR...]` by the worker (a fresh
interpreter with a minimal environment, so it never inherits the worker's
threads nor its secrets). It first isolates itself (`isolation.isolate_zygote`:
no network, private /proc; every job inherits that), imports the app, makes
sure jobs can reach the Python tree and the DIRs (the worker's temp dir), and
reports `ReadyMsg(features)`. Over the control socket FD (SOCK_SEQPACKET) the
worker then sends `RunMsg(token)` with one end of a per-job socket attached; the
zygote forks, the child reads its `StartMsg` and runs the job on that socket
(see `child.run_job`) and the zygote reports `StartedMsg(token, pid)` and, once
the child has exited and everything it left behind is killed
(`isolation.sweep`), `ExitedMsg(token, wait status)`. Every message is a frame
of `channel` (one per datagram, validated; never pickle).
"""

from __future__ import annotations

import array
import contextlib
import gc
import os
import selectors
import signal
import socket
import sys
from collections.abc import Collection

from csml.worker.channel import (
    HEADER,
    MAX_CONTROL_BYTES,
    TO_ZYGOTE,
    ExitedMsg,
    Message,
    ProtocolViolation,
    ReadyMsg,
    RunMsg,
    StartedMsg,
    WireMessage,
    decode_datagram,
    encode,
)


def send(ctrl: socket.socket, message: WireMessage, fds: list[int] | None = None) -> None:
    data = encode(message)
    if fds:
        ctrl.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        ctrl.sendmsg([data])


def recv(ctrl: socket.socket, accept: Collection[int]) -> tuple[Message | None, list[int]]:
    """The next control message (None: the peer closed), or ProtocolViolation; any fds
    received with a refused message are closed."""
    msg, fds, flags, _addr = socket.recv_fds(ctrl, HEADER.size + MAX_CONTROL_BYTES + 1, 4)
    if not msg:
        return None, fds
    try:
        if (
            flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
            or len(msg) > HEADER.size + MAX_CONTROL_BYTES
        ):
            raise ProtocolViolation("control message over its size limit")
        return decode_datagram(msg, accept), fds
    except ProtocolViolation:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def _run_child(job_fd: int, app_name: str) -> None:
    from csml.worker.child import serve

    os.setsid()  # own process group: killing it kills anything its jobs started
    serve(socket.socket(fileno=job_fd), app_name)


def main(app_name: str, ctrl_fd: int, reachable: list[str]) -> None:
    from csml.worker.isolation import expose, isolate_zygote, prepare_zygote, python_paths
    from csml.worker.isolation_procs import sweep

    features = isolate_zygote()  # before any import that may start threads
    from csml.apps.registry import load_app

    app = load_app(app_name)
    for module in (*app.preload, "csml.worker.child"):
        __import__(module)
    if "mountns" in features and os.geteuid() == 0:  # jobs get uids of their own
        unreachable = expose([*python_paths(), *reachable])
        if unreachable:
            print(f"csml zygote: jobs cannot reach {', '.join(unreachable)}", file=sys.stderr)
    prepare_zygote()
    gc.freeze()  # keep the warm heap shared with children (fewer copy-on-write faults)
    ctrl = socket.socket(fileno=ctrl_fd)
    send(ctrl, ReadyMsg(features=features))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    tokens: dict[int, int] = {}
    sel = selectors.DefaultSelector()
    sel.register(ctrl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is wake_r:
                os.read(wake_r, 4096)
                continue
            try:
                message, fds = recv(ctrl, TO_ZYGOTE)
            except ProtocolViolation as exc:
                print(f"csml zygote: refused a control message: {exc}", file=sys.stderr)
                message = None
            if message is None:  # the worker is gone (or broken): so are its jobs
                sweep(())
                os._exit(0)
            assert isinstance(message, RunMsg)
            token = message.token
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                sweep(())
                os._exit(0)
            pid = os.fork()
            if pid == 0:
                sel.close()
                ctrl.close()
                signal.set_wakeup_fd(-1)
                os.close(wake_r)
                os.close(wake_w)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                code = 0
                try:
                    _run_child(fds[0], app_name)
                except BaseException:
                    code = 70
                finally:
                    os._exit(code)
            os.close(fds[0])
            tokens[pid] = token
            send(ctrl, StartedMsg(token=token, pid=pid))
        while True:  # reap jobs, and what they left behind (we are their subreaper)
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in tokens:
                token = tokens.pop(pid)
                if not sweep(tokens):
                    print(
                        f"csml zygote: processes left by job {pid} survive SIGKILL", file=sys.stderr
                    )
                send(ctrl, ExitedMsg(token=token, status=status))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
