"""Bench-only timestamps across processes (bench/latency.py): NOT part of csml.

Put this folder on PYTHONPATH and set CSML_LATENCY_TRACE=<dir>: every Python process
started so (the SDK's bench process, the coordinator, the worker agents; not the zygote
nor job children, which get a clean environment) wraps a few csml functions, once their
modules are imported, to append `wall-time pid thread event job` lines to
<dir>/<pid>.trace. Without the variable it does nothing. `bench/latency.py` reads the
files and prints where the median job's round trip went.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

DIR = os.environ.get("CSML_LATENCY_TRACE", "")
_out: Any = None
_lock = threading.Lock()


def rec(event: str, job: str = "", blocking: bool = True) -> None:
    """Append one line; with `blocking` False (from a GC callback, which may run inside
    this very function), drop it rather than wait for the lock."""
    global _out
    line = f"{time.time():.6f} {os.getpid()} {threading.current_thread().name} {event} {job}\n"
    if not _lock.acquire(blocking):
        return
    try:
        if _out is None:
            _out = open(os.path.join(DIR, f"{os.getpid()}.trace"), "a", buffering=1)  # noqa: SIM115
        _out.write(line)
    finally:
        _lock.release()


def _wrap(
    owner: Any,
    name: str,
    event: str,
    job: Callable[..., str] | None = None,
    after: bool = True,
    result_event: Callable[[Any], str | None] | None = None,
) -> None:
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def outer(*args: Any, **kwargs: Any) -> Any:
        jid = ""
        if job is not None:
            try:
                jid = job(*args, **kwargs)
            except Exception:
                jid = ""
        rec(event + ".0", jid)
        out = inner(*args, **kwargs)
        if after:
            extra = result_event(out) if result_event is not None else None
            rec(event + ".1", extra or jid)
        return out

    setattr(owner, name, outer)


def _wrap_async(
    owner: Any, name: str, event: str, result_event: Callable[[Any], str | None] | None = None
) -> None:
    inner = getattr(owner, name)

    @functools.wraps(inner)
    async def outer(*args: Any, **kwargs: Any) -> Any:
        rec(event + ".0")
        out = await inner(*args, **kwargs)
        rec(event + ".1", (result_event(out) if result_event is not None else None) or "")
        return out

    setattr(owner, name, outer)


def _first_words(data: bytes) -> str:
    """The start of what went over a socket, as one field of a trace line."""
    return data.decode("latin-1").replace(" ", "_").replace("\r", "").replace("\n", "|")


def _patch(name: str, module: Any) -> None:
    if name == "csml.link":
        _wrap(module.Link, "post", "link", job=lambda self, path, *a, **k: path.rsplit("/", 1)[-1])
    elif name == "csml.store.writer":
        _wrap(module.Writer, "_run_batch", "w.batch", result_event=None)
        orig_deliver = module._deliver

        def deliver(batch: Any) -> Any:
            rec("w.deliver", str(len(batch)))
            return orig_deliver(batch)

        module._deliver = deliver
    elif name == "sqlalchemy.engine.default":
        _wrap(module.DefaultDialect, "do_commit", "db.commit")
    elif name == "csml.coordinator.queue":
        _wrap_async(module.JobQueue, "submit_async", "c.submit", result_event=lambda j: j.id)
        _wrap_async(
            module.JobQueue,
            "claim_and_beat_async",
            "c.claim",
            result_event=lambda a: ",".join(j.id for j in a.jobs) if a.jobs else "-",
        )
        _wrap_async(module.JobQueue, "complete_many_async", "c.complete")
        _wrap_async(module.JobQueue, "complete_and_claim_async", "c.complete")
    elif name == "csml.coordinator.notify":
        _wrap(module.Notifier, "notify", "c.notify", job=lambda self, key: key, after=False)
    elif name == "csml.coordinator.api_events":
        _wrap(module, "_changed", "c.changed", job=lambda c, o, ids, *a, **k: ",".join(ids))
    elif name == "csml.worker.agent":
        _wrap(module.WorkerAgent, "_execute", "a.execute", job=lambda self, j: j.id)
        _wrap(
            module.WorkerAgent, "_complete", "a.handoff", job=lambda self, j, c: j.id, after=False
        )
        _wrap(module.WorkerAgent, "_send_completions", "a.send")
        _wrap(module.WorkerAgent, "_end", "a.end", job=lambda self, j, *a: j, after=False)
    elif name == "csml.worker.sandbox":
        _wrap(module.Sandbox, "run", "s.run")
        _wrap(module.Sandbox, "_run", "s._run")
        _wrap(module, "supervise", "s.supervise")
        _wrap(module, "grant_files", "s.grant")
        _wrap(module, "take_back", "s.takeback")
        _wrap(module, "clear_tmp", "s.cleartmp")
        _wrap(module.Sandbox, "_checkout", "s.checkout")
        _wrap(module.Sandbox, "_left_behind", "s.leftbehind")
        _wrap(module.Sandbox, "_too_big", "s.toobig")
        _wrap(module, "cpu_seconds_of", "s.cpu")
        _wrap(module, "JobSandboxMsg", "s.sandboxmsg")
        _wrap(module, "StartMsg", "s.startmsg")
    elif name == "csml.worker.channel":
        _wrap(module.JobChannel, "start", "ch.start")
        _wrap(module.JobChannel, "next", "ch.next")
        _wrap(module, "encode", "ch.encode")
        _wrap(module, "_decode_body", "ch.decode")
    elif name == "csml.client.results":
        _wrap(
            module.ResultStream,
            "_deliver",
            "sdk.deliver",
            job=lambda self, j: f"{j.get('id')}:{j.get('state')}",
            after=False,
        )
    elif name == "csml.cli.http_protocol":
        _wrap(
            module.CoalescingHttpToolsProtocol,
            "data_received",
            "c.recv",
            job=lambda self, data: _first_words(bytes(data[:40])),
            after=False,
        )
        _wrap(
            module.CoalescingTransport,
            "write",
            "c.send",
            job=lambda self, data: _first_words(bytes(data[:30])),
            after=False,
        )
    elif name == "csml.client.sdk":
        _wrap(module.Job, "wait", "sdk.wait", job=lambda self, *a, **k: self.id)


TARGETS = {
    "sqlalchemy.engine.default",
    "csml.link",
    "csml.store.writer",
    "csml.coordinator.queue",
    "csml.coordinator.notify",
    "csml.coordinator.api_events",
    "csml.worker.agent",
    "csml.worker.sandbox",
    "csml.worker.channel",
    "csml.client.results",
    "csml.client.sdk",
    "csml.cli.http_protocol",
}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def patched(module: Any) -> None:
            exec_module(module)
            _patch(fullname, module)

        loader.exec_module = patched  # type: ignore[method-assign]
        return spec


def _gc(phase: str, info: dict[str, int]) -> None:
    if info.get("generation", 0) >= 1:  # young collections are many and short
        rec(f"gc{info['generation']}.{0 if phase == 'start' else 1}", blocking=False)


def install() -> None:
    if DIR and not any(isinstance(f, _Finder) for f in sys.meta_path):
        import gc

        sys.meta_path.insert(0, _Finder())
        gc.callbacks.append(_gc)


install()
