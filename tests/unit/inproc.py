"""The coordinator in this process, for the fast tier: no server, worker process or root.

`InProcessCoordinator` builds the real FastAPI app (`create_app`) on SQLite in a
temporary folder and serves it to synchronous httpx clients (the SDK's `Client`,
the CLI) through `PortalTransport`: each request runs on one event loop in a
helper thread, as under uvicorn. The lifespan's background loops (lease reaper,
retention sweep) do not run on their own: a test calls `reap()` or `sweep()` after
setting the clock (`SetClock`), so timing never depends on sleeping.

`HttpWorker` plays a worker over the worker API (register with a join token,
claim, heartbeat, move files, complete) and runs operations with
`csml.apps.testing.run_operation`, as a worker's job process would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
from fastapi import FastAPI
from sqlalchemy import event

from csml.apps.base import App
from csml.apps.testing import run_operation
from csml.client import Client
from csml.coordinator import retention
from csml.coordinator.app import create_app
from csml.coordinator.config import Settings
from csml.coordinator.state import Core
from csml.schemas import ClaimedJob, ClaimResponse, HeartbeatResponse, WorkerRegistered
from csml.store import jobs as jobs_store
from csml.store.db import sqlite_url
from csml.store.jobs import JobRow
from csml.store.tables import set_clock
from tests.clock import SetClock

OPERATOR_TOKEN = "csml-unit-tests-operator"
BASE_URL = "http://127.0.0.1:8600"  # a loopback name: the requests never leave the process


class PortalTransport(httpx.BaseTransport):
    """A synchronous httpx transport into an ASGI app served on a blocking portal's loop."""

    def __init__(self, app: FastAPI, portal: anyio.from_thread.BlockingPortal) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # a streamed (multipart) body becomes bytes, readable on the loop
        return self._portal.call(self._send, request)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        response = await self._asgi.handle_async_request(request)
        content = await response.aread()
        return httpx.Response(response.status_code, headers=response.headers, content=content)


class InProcessCoordinator:
    """The real coordinator app on SQLite under `root`; the time is `clock`'s (made the
    process's clock until `stack` closes). Coordinators built on one `root` share its store."""

    def __init__(self, root: Path, stack: ExitStack, clock: SetClock, **settings: Any) -> None:
        data_dir = root / "data"
        defaults: dict[str, Any] = {
            "data_dir": data_dir,
            "database_url": sqlite_url(data_dir),
            "pow_difficulty": 0,
            "operator_token": OPERATOR_TOKEN,
        }
        self.clock = clock
        stack.callback(set_clock, set_clock(clock))
        self.settings = Settings(**{**defaults, **settings})
        self.app = create_app(self.settings)
        self.core: Core = self.app.state.core
        stack.callback(self.core.engine.dispose)
        stack.callback(self.core.writer.close)  # before the engine goes (LIFO)
        self.portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
        self.portal.call(self._bind_notifier)
        stack.callback(self.core.notifier.close)
        self.transport = PortalTransport(self.app, self.portal)
        self.http = stack.enter_context(
            httpx.Client(base_url=BASE_URL, transport=self.transport, timeout=30)
        )
        self._stack = stack

    async def _bind_notifier(self) -> None:
        self.core.notifier.bind(asyncio.get_running_loop())

    def client(self, token: str | None = None) -> Client:
        """An SDK client of this coordinator (no identity unless `token`)."""
        # The transport buffers whole responses: no event stream, long-polls instead.
        client = Client(BASE_URL, token or "", transport=self.transport, result_stream=False)
        self._stack.callback(client.close)
        return client

    def new_user(self) -> Client:
        client = self.client()
        client.create_identity()
        return client

    def join_token(self, app: str) -> str:
        """A join token for workers of `app` (that may announce its manifest), made by the
        operator through the operator API."""
        r = self.http.post(
            "/v1/operator/join-tokens",
            json={"label": "unit tests", "apps": [app], "publish": True},
            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        )
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token

    def worker(self, app: App, slots: int = 4) -> HttpWorker:
        """A worker of `app` that joined through the worker API."""
        r = self.http.post(
            "/v1/workers",
            json={"app": app.manifest().model_dump(mode="json"), "slots": slots, "sandbox": "none"},
            headers={"Authorization": f"Bearer {self.join_token(app.name)}"},
        )
        assert r.status_code == 201, r.text
        return HttpWorker(self.http, app, WorkerRegistered.model_validate(r.json()))

    def job_row(self, job_id: str) -> JobRow:
        """The job's stored row (it must exist)."""
        with self.core.queue.read() as conn:
            found = jobs_store.by_id(conn, job_id)
        assert found is not None, job_id
        return found

    def reap(self) -> int:
        """One pass of the lease reaper, at the clock's time."""
        return self.core.queue.reap()

    def sweep(self) -> int:
        """One pass of the retention sweep, at the clock's time."""
        return retention.sweep(self.core)


@dataclass
class HttpWorker:
    """A worker that speaks the worker API; its jobs run in this process."""

    http: httpx.Client
    app: App
    registered: WorkerRegistered

    @property
    def id(self) -> str:
        return self.registered.worker_id

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.registered.worker_token}"}

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(f"/v1/workers/{self.id}{path}", json=body, headers=self._headers())

    def claim(self, max_jobs: int = 1) -> list[ClaimedJob]:
        r = self.post("/claim", {"max_jobs": max_jobs, "wait": 0})
        assert r.status_code == 200, r.text
        return ClaimResponse.model_validate(r.json()).jobs

    def claim_ids(self, max_jobs: int) -> list[str]:
        return [job.id for job in self.claim(max_jobs)]

    def heartbeat(self, *running: ClaimedJob, fraction: float = 0.0) -> HeartbeatResponse:
        beats = [
            {
                "job_id": job.id,
                "lease_id": job.lease_id,
                "progress": {"fraction": fraction, "message": f"{fraction:.0%} done"},
            }
            for job in running
        ]
        r = self.post("/heartbeat", {"running": beats})
        assert r.status_code == 200, r.text
        return HeartbeatResponse.model_validate(r.json())

    def complete(
        self,
        job: ClaimedJob,
        state: str = "succeeded",
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> httpx.Response:
        body = {"lease_id": job.lease_id, "state": state, "result": result, "error": error}
        return self.post(f"/jobs/{job.id}/complete", body)

    def download(self, job: ClaimedJob, name: str) -> httpx.Response:
        return self.http.get(
            f"/v1/workers/{self.id}/jobs/{job.id}/inputs/{name}",
            params={"lease_id": job.lease_id},
            headers=self._headers(),
        )

    def upload(self, job: ClaimedJob, name: str, data: bytes) -> httpx.Response:
        return self.http.put(
            f"/v1/workers/{self.id}/jobs/{job.id}/outputs/{name}",
            params={"lease_id": job.lease_id},
            content=data,
            headers=self._headers(),
        )

    def run(self, job: ClaimedJob, workdir: Path) -> httpx.Response:
        """Run a claimed job as a worker would: fetch its inputs, run the operation,
        upload its outputs, report the result (or the error the operation raised)."""
        inputs: dict[str, bytes] = {}
        for info in job.inputs:
            r = self.download(job, info.name)
            assert r.status_code == 200, r.text
            inputs[info.name] = r.content
        try:
            done = run_operation(self.app, job.operation, job.params, inputs, workdir / job.id)
        except Exception as exc:
            return self.complete(job, "failed", error=f"{type(exc).__name__}: {exc}")
        for name, path in done.outputs.items():
            r = self.upload(job, name, path.read_bytes())
            assert r.status_code == 204, r.text
        return self.complete(job, "succeeded", done.result)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON error body of a refused request."""
    body: dict[str, Any] = response.json()["error"]
    return body


@contextmanager
def sent_statements(
    coordinator: InProcessCoordinator, keep: Callable[[str], bool] = lambda _s: True
) -> Iterator[list[str]]:
    """The SQL statements the coordinator's engine sends meanwhile (one line each, white
    space folded), those `keep` accepts."""
    sent: list[str] = []

    def record(_conn: object, _cur: object, statement: str, *_: object) -> None:
        flat = " ".join(statement.split())
        if keep(flat):
            sent.append(flat)

    engine = coordinator.core.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)
