"""The worker agent: join, claim jobs, run them in the sandbox, report back.

Threads: one claims jobs (long-poll) while slots are free, one heartbeats
(extending leases, relaying progress, aborting cancelled jobs), and one per
slot runs a job. The coordinator may restart or be briefly unreachable: every
call retries with backoff, and the leases say what is still ours.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from csml.apps.registry import load_app
from csml.schemas import (
    ClaimedJob,
    ClaimResponse,
    Heartbeat,
    HeartbeatResponse,
    JobCompletion,
    Progress,
    RunningJob,
    WorkerRegistered,
    WorkerRegistration,
)
from csml.worker.sandbox import Sandbox, SandboxJob

log = logging.getLogger("csml.worker")
T = TypeVar("T")


class Revoked(Exception):
    """The coordinator no longer accepts this worker."""


@dataclass
class WorkerConfig:
    coordinator: str
    join_token: str
    app: str
    slots: int = 1
    workdir: Path | None = None
    claim_wait: float = 5.0


@dataclass
class _Running:
    claimed: ClaimedJob
    sandbox_job: SandboxJob | None = None
    progress: Progress = field(default_factory=Progress)
    cancel: threading.Event = field(default_factory=threading.Event)


class WorkerAgent:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.app = load_app(config.app)
        self.sandbox = Sandbox(config.app)  # before any thread: see zygote.py
        self.stopping = threading.Event()  # no new claims
        self.finished = threading.Event()  # running jobs are done: stop talking
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(config.slots)
        self._workdir = Path(tempfile.mkdtemp(prefix="csml-worker-", dir=config.workdir))
        self.http = httpx.Client(
            base_url=config.coordinator.rstrip("/"),
            timeout=httpx.Timeout(30.0, read=config.claim_wait + 30),
            limits=httpx.Limits(max_connections=config.slots + 4),
        )
        # Claims long-poll on a client of their own, closed by stop() to end the wait.
        self.claims = httpx.Client(
            base_url=config.coordinator.rstrip("/"),
            timeout=httpx.Timeout(30.0, read=config.claim_wait + 30),
        )
        self.registration: WorkerRegistered | None = None

    # -- HTTP with retries --------------------------------------------------

    def _call(
        self,
        what: str,
        fn: Callable[[], httpx.Response],
        until: threading.Event | None = None,
    ) -> httpx.Response:
        """Call, retrying transport errors and 5xx until `until` (default: shutdown) is set."""
        until = until or self.finished
        delay = 0.2
        while not until.is_set():
            try:
                response = fn()
            except httpx.TransportError as exc:
                log.warning("coordinator unreachable (%s: %s); retrying", what, type(exc).__name__)
            else:
                if response.status_code == 401:
                    raise Revoked(response.json().get("error", {}).get("message", "refused"))
                if response.status_code < 500:
                    return response
                log.warning("coordinator error %s on %s; retrying", response.status_code, what)
            until.wait(delay)
            delay = min(delay * 2, 2.0)
        raise Revoked("worker stopping")

    def _auth(self) -> dict[str, str]:
        assert self.registration is not None
        return {"Authorization": f"Bearer {self.registration.worker_token}"}

    def _path(self, suffix: str) -> str:
        assert self.registration is not None
        return f"/v1/workers/{self.registration.worker_id}{suffix}"

    # -- lifecycle ----------------------------------------------------------

    def register(self) -> WorkerRegistered:
        body = WorkerRegistration(
            app=self.app.manifest(), slots=self.config.slots, sandbox=self.sandbox.description
        )
        response = self._call(
            "register",
            until=self.stopping,
            fn=lambda: self.http.post(
                "/v1/workers",
                json=body.model_dump(mode="json"),
                headers={"Authorization": f"Bearer {self.config.join_token}"},
            ),
        )
        response.raise_for_status()
        self.registration = WorkerRegistered.model_validate(response.json())
        log.info(
            "joined the cluster",
            extra={
                "fields": {
                    "app": self.config.app,
                    "slots": self.config.slots,
                    "sandbox": self.sandbox.description,
                }
            },
        )
        return self.registration

    def run(self) -> None:
        """Serve until `stop()`; returns after running jobs finish or are handed back."""
        self.register()
        beat = threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat")
        beat.start()
        with ThreadPoolExecutor(self.config.slots, thread_name_prefix="slot") as pool:
            try:
                self._claim_loop(pool)
            except Revoked as exc:
                if not self.stopping.is_set():
                    log.error("the coordinator refused this worker: %s", exc)
                self.stopping.set()
        self.finished.set()
        self._leave()
        self.sandbox.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def stop(self) -> None:
        self.stopping.set()
        self.claims.close()

    def _leave(self) -> None:
        if self.registration is None:
            return
        with contextlib.suppress(httpx.HTTPError):
            self.http.delete(self._path(""), headers=self._auth(), timeout=5)

    def _claim_loop(self, pool: ThreadPoolExecutor) -> None:
        while not self.stopping.is_set():
            if not self._slots.acquire(timeout=0.5):
                continue
            free = 1
            while free < self.config.slots and self._slots.acquire(blocking=False):
                free += 1
            try:
                response = self._call(
                    "claim",
                    lambda n=free: self.claims.post(  # type: ignore[misc]
                        self._path("/claim"),
                        json={"max_jobs": n, "wait": self.config.claim_wait},
                        headers=self._auth(),
                    ),
                    until=self.stopping,
                )
                jobs = ClaimResponse.model_validate(response.json()).jobs
            except Exception:
                for _ in range(free):
                    self._slots.release()
                if self.stopping.is_set():
                    return
                raise
            for _ in range(free - len(jobs)):
                self._slots.release()
            for job in jobs:
                with self._lock:
                    self._running[job.id] = _Running(job)
                pool.submit(self._execute, job)

    def _heartbeat_loop(self) -> None:
        assert self.registration is not None
        interval = self.registration.heartbeat_seconds
        while not self.finished.wait(interval):
            with self._lock:
                running = [
                    RunningJob(
                        job_id=r.claimed.id, lease_id=r.claimed.lease_id, progress=r.progress
                    )
                    for r in self._running.values()
                ]
            try:
                response = self._call(
                    "heartbeat",
                    lambda beat=Heartbeat(running=running): self.http.post(  # type: ignore[misc]
                        self._path("/heartbeat"),
                        json=beat.model_dump(mode="json"),
                        headers=self._auth(),
                    ),
                )
            except Revoked as exc:
                if not self.finished.is_set():
                    log.error("heartbeat refused: %s; stopping", exc)
                self.stop()
                self._abort_all()
                return
            for job_id in HeartbeatResponse.model_validate(response.json()).abort:
                with self._lock:
                    r = self._running.get(job_id)
                if r is not None:
                    log.info("stopping job %s: cancelled or lease lost", job_id[:12])
                    r.cancel.set()

    def _abort_all(self) -> None:
        with self._lock:
            for r in self._running.values():
                r.cancel.set()

    # -- one job ------------------------------------------------------------

    def _execute(self, job: ClaimedJob) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="job-", dir=self._workdir))
        try:
            self._execute_in(job, workdir)
        except Revoked:
            pass
        except Exception:
            log.exception("job %s: worker-side failure; its lease will expire", job.id[:12])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            with self._lock:
                self._running.pop(job.id, None)
            self._slots.release()

    def _execute_in(self, job: ClaimedJob, workdir: Path) -> None:
        state = self._running[job.id]
        inputs_dir, outputs_dir = workdir / "inputs", workdir / "outputs"
        inputs_dir.mkdir()
        outputs_dir.mkdir()
        inputs = {f.name: self._download(job, f.name, inputs_dir / f.name) for f in job.inputs}
        sandbox_job = SandboxJob(
            operation=job.operation,
            params=job.params,
            inputs=inputs,
            output_dir=outputs_dir,
            timeout_seconds=job.limits.timeout_seconds,
            memory_mb=job.limits.memory_mb,
            cpu_seconds=job.limits.cpu_seconds,
            cancel=state.cancel,
        )

        def progress(fraction: float, message: str) -> None:
            state.progress = Progress(fraction=fraction, message=message)

        outcome = self.sandbox.run(sandbox_job, progress)
        if outcome.cancelled:
            return
        completion = JobCompletion(lease_id=job.lease_id, state="failed", error=outcome.error)
        if outcome.ok:
            declared = {o.name for o in self.app.operations[job.operation].outputs}
            for path in sorted(outputs_dir.iterdir()):
                if path.name in declared and path.is_file():
                    self._upload(job, path)
            completion = JobCompletion(
                lease_id=job.lease_id, state="succeeded", result=outcome.result
            )
        response = self._call(
            "complete",
            lambda: self.http.post(
                self._path(f"/jobs/{job.id}/complete"),
                json=completion.model_dump(mode="json"),
                headers=self._auth(),
            ),
        )
        if response.status_code == 409:
            log.info("job %s: lease lost before completion; result dropped", job.id[:12])
        elif response.is_error:
            log.error("job %s: completion refused: %s", job.id[:12], response.text[:200])

    def _download(self, job: ClaimedJob, name: str, target: Path) -> Path:
        def fetch() -> httpx.Response:
            with self.http.stream(
                "GET",
                self._path(f"/jobs/{job.id}/inputs/{name}"),
                params={"lease_id": job.lease_id},
                headers=self._auth(),
            ) as response:
                if response.status_code == 200:
                    with open(target, "wb") as out:
                        for chunk in response.iter_bytes(1 << 20):
                            out.write(chunk)
                else:
                    response.read()
                return response

        response = self._call(f"download {name}", fetch)
        response.raise_for_status()
        return target

    def _upload(self, job: ClaimedJob, path: Path) -> None:
        media = next(
            o.media_type for o in self.app.operations[job.operation].outputs if o.name == path.name
        )

        def put() -> httpx.Response:
            with open(path, "rb") as body:
                return self.http.put(
                    self._path(f"/jobs/{job.id}/outputs/{path.name}"),
                    params={"lease_id": job.lease_id},
                    content=_chunks(body),
                    headers={**self._auth(), "Content-Type": media},
                )

        response = self._call(f"upload {path.name}", put)
        response.raise_for_status()


def _chunks(body: Any, size: int = 1 << 20) -> Any:
    while chunk := body.read(size):
        yield chunk
