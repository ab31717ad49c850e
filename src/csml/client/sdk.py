"""`Client` and `Job`: submit, wait, fetch results.

client = Client("http://127.0.0.1:8600")
client.create_identity()
job = client.submit("opencv", "detect_faces", files={"image": "photo.jpg"})
job.wait(timeout=60)
print(job.result)
job.download("annotated", "faces.png")
"""

from __future__ import annotations

import json
import mimetypes
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import httpx

from csml.client.config import UserConfig
from csml.client.errors import CsmlError, QueueFull, Unreachable, WaitTimeout, raise_for
from csml.schemas import AppInfo, IdentityCreated, JobState
from csml.schemas import Job as JobData

FileArg = str | os.PathLike[str] | bytes | IO[bytes]
ProgressCallback = Callable[["Job"], None]


class Client:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        saved = UserConfig.load() if url is None or token is None else None
        self.url = (url or os.environ.get("CSML_URL") or (saved.url if saved else "")).rstrip("/")
        self.token = token or os.environ.get("CSML_TOKEN") or (saved.token if saved else None)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing -----------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {**self._headers(), **kw.pop("headers", {})}
        try:
            response = self._http.request(method, path, headers=headers, **kw)
        except httpx.TransportError as exc:
            raise Unreachable(
                f"cannot reach the coordinator at {self.url} ({type(exc).__name__}); "
                "is it running? (`csml up`)"
            ) from exc
        raise_for(response)
        return response

    # -- identities and apps ------------------------------------------------

    def create_identity(self) -> IdentityCreated:
        """Create an anonymous identity and use its token from now on."""
        created = IdentityCreated.model_validate(self.request("POST", "/v1/identities").json())
        self.token = created.token
        return created

    def apps(self) -> list[AppInfo]:
        return [AppInfo.model_validate(a) for a in self.request("GET", "/v1/apps").json()]

    def app(self, name: str) -> AppInfo:
        return AppInfo.model_validate(self.request("GET", f"/v1/apps/{name}").json())

    # -- jobs ---------------------------------------------------------------

    def submit(
        self,
        app: str,
        operation: str,
        *,
        files: dict[str, FileArg] | None = None,
        params: dict[str, Any] | None = None,
        limits: dict[str, float] | None = None,
        retry_queue_full: float = 0.0,
    ) -> Job:
        """Submit a job; files stream from disk. With `retry_queue_full`, wait up to that
        many seconds for room in a full queue."""
        spec: dict[str, Any] = {"app": app, "operation": operation, "params": params or {}}
        if limits:
            spec["limits"] = limits
        deadline = time.monotonic() + retry_queue_full
        while True:
            try:
                return self._submit_once(spec, files or {})
            except QueueFull as exc:
                if time.monotonic() + exc.retry_after > deadline:
                    raise
                time.sleep(exc.retry_after)

    def _submit_once(self, spec: dict[str, Any], files: dict[str, FileArg]) -> Job:
        if not files:
            response = self.request("POST", "/v1/jobs", json=spec)
            return Job(self, JobData.model_validate(response.json()))
        with ExitStack() as stack:
            parts: list[tuple[str, Any]] = [("spec", (None, json.dumps(spec), "application/json"))]
            for name, value in files.items():
                parts.append((name, _file_part(name, value, stack)))
            response = self.request("POST", "/v1/jobs", files=parts)
        return Job(self, JobData.model_validate(response.json()))

    def job(self, job_id: str) -> Job:
        return Job(self, JobData.model_validate(self.request("GET", f"/v1/jobs/{job_id}").json()))

    def jobs(
        self, *, state: str | None = None, app: str | None = None, limit: int = 100
    ) -> list[Job]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if app:
            params["app"] = app
        data = self.request("GET", "/v1/jobs", params=params).json()
        return [Job(self, JobData.model_validate(j)) for j in data["jobs"]]


def _file_part(name: str, value: FileArg, stack: ExitStack) -> tuple[str, Any, str]:
    if isinstance(value, bytes):
        return (name, value, "application/octet-stream")
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        if not path.is_file():
            raise CsmlError(f"input {name!r}: no such file {str(path)!r}")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return (path.name, stack.enter_context(open(path, "rb")), media)
    return (name, value, "application/octet-stream")


class Job:
    """A submitted job; `refresh`, `wait`, `download` and `cancel` talk to the coordinator."""

    def __init__(self, client: Client, data: JobData) -> None:
        self._client = client
        self.data = data

    def __repr__(self) -> str:
        return f"Job({self.id[:12]} {self.data.app}.{self.data.operation} {self.state.value})"

    @property
    def id(self) -> str:
        return self.data.id

    @property
    def state(self) -> JobState:
        return self.data.state

    @property
    def done(self) -> bool:
        return self.data.state.terminal

    @property
    def result(self) -> dict[str, Any] | None:
        return self.data.result

    @property
    def error(self) -> str | None:
        return self.data.error

    @property
    def outputs(self) -> dict[str, Any]:
        return {name: f.model_dump() for name, f in self.data.outputs.items()}

    @property
    def progress(self) -> tuple[float, str]:
        return self.data.progress.fraction, self.data.progress.message

    def refresh(self, wait: float = 0.0) -> Job:
        params = {"wait": wait} if wait else None
        response = self._client.request("GET", f"/v1/jobs/{self.id}", params=params)
        self.data = JobData.model_validate(response.json())
        return self

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll: float = 1.0,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        """Block until the job ends (long-polling); `on_progress` sees each update."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            remaining = poll if deadline is None else min(poll, deadline - time.monotonic())
            if remaining <= 0:
                raise WaitTimeout(
                    f"job {self.id[:12]} still {self.state.value} after {timeout:g} s"
                )
            self.refresh(wait=remaining)
            if on_progress is not None:
                on_progress(self)
        return self

    def cancel(self) -> Job:
        response = self._client.request("DELETE", f"/v1/jobs/{self.id}")
        self.data = JobData.model_validate(response.json())
        return self

    def iter_output(self, name: str) -> Iterator[bytes]:
        path = f"/v1/jobs/{self.id}/outputs/{name}"
        with self._client._http.stream("GET", path, headers=self._client._headers()) as r:
            if r.status_code >= 400:
                r.read()
                raise_for(r)
            yield from r.iter_bytes(1 << 20)

    def download(self, name: str, path: str | os.PathLike[str]) -> Path:
        """Stream output `name` to `path` (a folder gets a file named after the output)."""
        target = Path(path)
        if target.is_dir():
            ext = mimetypes.guess_extension(self.data.outputs[name].media_type) or ""
            target = target / f"{name}{ext}"
        tmp = target.with_name(target.name + ".part")
        with open(tmp, "wb") as out:
            for chunk in self.iter_output(name):
                out.write(chunk)
        tmp.replace(target)
        return target
