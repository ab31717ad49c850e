"""The zygote: a process that has imported the app once and forks one child per job.

Started as `python -m csml.worker.zygote APP FD [DIR...]` by the worker (a fresh
interpreter with a minimal environment, so it never inherits the worker's
threads nor its secrets). It first isolates itself (`isolation.isolate_zygote`:
no network, private /proc; every job inherits that), imports the app, makes
sure jobs can reach the Python tree and the DIRs (the worker's temp dir), and
reports ("ready", 0, features). Over the control socket FD the worker then sends
("run", token) with one end of a per-job socket attached; the zygote forks, the
child runs the job on that socket (see `child.run_job`) and the zygote reports
("started", token, pid) and, once the child has exited and everything it left
behind is killed (`isolation.sweep`), ("exited", token, wait status).
"""

from __future__ import annotations

import array
import gc
import os
import pickle
import selectors
import signal
import socket
import sys
from multiprocessing.connection import Connection

MAX_CONTROL_MESSAGE = 4096


def send(ctrl: socket.socket, message: tuple[object, ...], fds: list[int] | None = None) -> None:
    data = pickle.dumps(message)
    if fds:
        ctrl.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        ctrl.sendmsg([data])


def recv(ctrl: socket.socket) -> tuple[tuple[object, ...] | None, list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(ctrl, MAX_CONTROL_MESSAGE, 4)
    if not msg:
        return None, fds
    return pickle.loads(msg), fds  # noqa: S301 - peer is our own worker process


def _run_child(job_fd: int, app_name: str) -> None:
    from csml.worker.child import run_job

    os.setsid()  # own process group: killing it kills anything the job started
    conn = Connection(job_fd)
    payload = conn.recv()
    run_job(conn, app_name, **payload)


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
    send(ctrl, ("ready", 0, features))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    tokens: dict[int, object] = {}
    sel = selectors.DefaultSelector()
    sel.register(ctrl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is wake_r:
                os.read(wake_r, 4096)
                continue
            message, fds = recv(ctrl)
            if message is None:  # the worker is gone: so are its jobs
                sweep(())
                os._exit(0)
            token = message[1]
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
            send(ctrl, ("started", token, pid))
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
                send(ctrl, ("exited", token, status))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
