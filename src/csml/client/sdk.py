"""`Client` and `Job`: submit, wait, fetch results.

client = Client("http://127.0.0.1:8600")
client.create_identity()
job = client.submit("opencv", "detect_faces", files={"image": "photo.jpg"})
job.wait(timeout=60)
print(job.result)
job.download("annotated", "faces.png")

Names from the coordinator (outputs, models) become local file names only through
`csml.client.filenames.check_file_name`: never a path, a hidden file or control
characters, so a hostile coordinator cannot make the client write outside the folder
the user chose.

A submission's files of at most `LINK_UPLOAD_BYTES` together (paths or bytes, not a
confidential job's) go as one multipart body over a keep-alive link (`csml.link`, as
JSON submissions do), built in memory: the same form httpx sends (a `spec` part, then
one part per file with its name, file name and guessed type), under a boundary drawn
once per client and checked to occur in none of the bytes; anything else (larger
files, file objects, a name that would need escaping, a custom transport) streams
through httpx as before. Downloads (`Job.download`, `iter_output`) follow the
answer over a link too (`Client._stream`), given back to the pool once the body ended.

Requests through httpx (`Client.request`): a GET or HEAD that fails on its connection
before an answer came (the coordinator closed a kept-alive connection as the request
went out, or httpcore's pool closed a connection it had just handed to this thread:
encode/httpcore#1110, with many threads on one client) is sent once more, on a fresh
connection; any other method is never resent (it may have been applied). The pool keeps
as many idle connections as it may open (no "surplus" to close under a thread, the
trigger of that httpcore race) and lets them go after `KEEPALIVE_SECONDS`, before the
coordinator's own 5 s (uvicorn's default), so a kept connection is rarely reused just as
the coordinator drops it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import mimetypes
import os
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx

from csml.client.config import UserConfig
from csml.client.errors import CsmlError, QueueFull, Unreachable, WaitTimeout, raise_for
from csml.client.filenames import check_file_name
from csml.client.results import LOST, RECHECK, SAFETY_SECONDS, Mark, ResultStream
from csml.link import Link, LinkError, LinkResponse, Poster, open_link, proxied
from csml.schemas import AppInfo, IdentityCreated, JobState, StepSpec, WorkerKeyInfo, base64_text
from csml.schemas import Job as JobData
from csml.schemas.contributions import ContributionCreated, ContributionInfo, ContributionList
from csml.schemas.credit import CreditInfo
from csml.schemas.models import ModelInfo
from csml.transport import TransportError, check_url, verify_option

if TYPE_CHECKING:
    from csml.attestation.policy import Policy
    from csml.client.batch import Batch, BatchItem, Entry
    from csml.client.confidential import JobKeys, WorkerAssessment
    from csml.client.key_store import KeyStore
    from csml.crypto.envelope import ResultPayload

FileArg = str | os.PathLike[str] | bytes | IO[bytes]
ProgressCallback = Callable[["Job"], None]
KEEPALIVE_SECONDS = 4.0  # an idle httpx connection is closed after this (the server: 5 s)
HTTPX_CONNECTIONS = 100  # httpx connections per Client (its default bound), all kept while idle
RESENT_METHODS = frozenset({"GET", "HEAD"})  # sent once more after a broken connection
BROKEN_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
IDLE_LINKS = 16  # keep-alive links a Client keeps for its JSON submissions, at most
LINK_UPLOAD_BYTES = 8 << 20
"""A submission's files at most this large together go over a link, built in memory."""


class Client:
    recipients_ttl = 30.0
    """Seconds a confidential submission may reuse the verdict on an app's workers."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        key_store: KeyStore | None = None,
        pin_sha256: str | None = None,
        insecure_http: bool = False,
        result_stream: bool = True,
    ) -> None:
        """`pin_sha256`: trust exactly this server certificate (e.g. `csml up --tls`).
        Plain `http://` to a non-loopback host is refused unless `insecure_http`.
        `result_stream`: `Job.wait` follows one shared event stream of this identity's
        jobs (see `csml.client.results`) instead of a long-poll per job; off, it
        long-polls (a transport that buffers whole responses needs it off)."""
        # Result keys of the confidential jobs submitted here (and, with a key store, saved).
        self._job_keys: dict[str, JobKeys] = {}
        self.key_store = key_store
        self._accepted: dict[tuple[str, str], tuple[float, list[WorkerAssessment]]] = {}
        saved = UserConfig.load() if url is None or token is None else None
        self.url = (url or os.environ.get("CSML_URL") or (saved.url if saved else "")).rstrip("/")
        self.token = token or os.environ.get("CSML_TOKEN") or (saved.token if saved else None)
        pin = pin_sha256 or os.environ.get("CSML_PIN_SHA256") or None
        insecure_http = insecure_http or os.environ.get("CSML_INSECURE_HTTP", "") == "1"
        try:
            check_url(self.url, insecure_http=insecure_http)
            verify = verify_option(pin)
        except TransportError as exc:
            raise CsmlError(str(exc)) from None
        http_verify = verify
        if verify is True and urlsplit(self.url).scheme == "http" and not proxied(self.url):
            # Nothing of an http:// coordinator reached directly goes over TLS (the client
            # asks only its base URL and follows no redirect), but httpx loads the CA
            # bundle for `verify=True` anyway: ~27 CPU-ms at every start of the CLI. A
            # context that verifies and trusts no CA stands in (any TLS use would fail).
            http_verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        limits = httpx.Limits(
            max_connections=HTTPX_CONNECTIONS,
            max_keepalive_connections=HTTPX_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_SECONDS,
        )
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            transport=transport,
            verify=http_verify,
            limits=limits,
        )
        # JSON job submissions go over keep-alive links (`csml.link`: far less CPU per
        # call than httpx), one borrowed per call from a small pool; not with a custom
        # transport (in-process tests and apps); through a proxy, over httpx (open_link).
        self._link_options = None if transport is not None else (verify, timeout)
        self._boundary = secrets.token_hex(16)  # of the multipart bodies sent over links
        self._idle_links: list[Poster] = []
        self._links_lock = threading.Lock()
        self._closed = False
        self._results = ResultStream(self) if result_stream else None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._results is not None:
            self._results.close()
        with self._links_lock:
            self._closed = True
            links, self._idle_links = self._idle_links, []
        for link in links:
            link.close()
        self._http.close()

    # -- plumbing -----------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {**self._headers(), **kw.pop("headers", {})}
        resend = method.upper() in RESENT_METHODS
        while True:
            try:
                response = self._http.request(method, path, headers=headers, **kw)
                break
            except BROKEN_CONNECTION as exc:
                if not resend:
                    raise self._unreachable(exc) from exc
                resend = False  # once: a second failure is the coordinator's
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc
        raise_for(response)
        return response

    def _unreachable(self, exc: Exception) -> Unreachable:
        return Unreachable(
            f"cannot reach the coordinator at {self.url} ({type(exc).__name__}); "
            "is it running? (`csml up`)"
        )

    def _post_json(self, path: str, body: dict[str, Any]) -> httpx.Response | LinkResponse:
        """POST a JSON body, as `request` does (same errors), over a pooled link."""
        if self._link_options is None:
            return self.request("POST", path, json=body)
        # As httpx encodes `json=` (NaN refused with ValueError, UTF-8 kept).
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return self._post_body(path, content.encode())

    def _post_body(
        self, path: str, content: bytes, content_type: str = "application/json"
    ) -> httpx.Response | LinkResponse:
        """POST `content` (JSON, already encoded, unless `content_type` says otherwise), as
        `_post_json` does."""
        if self._link_options is None:
            headers = {"Content-Type": content_type}
            return self.request("POST", path, content=content, headers=headers)
        link = self._borrow_link()
        kept = False
        try:
            answer = link.post(path, content, self._headers(), content_type)
            kept = True
        except (LinkError, httpx.TransportError) as exc:
            raise self._unreachable(exc) from exc
        finally:
            self._return_link(link, kept)
        raise_for(answer)
        return answer

    def _borrow_link(self) -> Poster:
        assert self._link_options is not None
        with self._links_lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            if self._idle_links:
                return self._idle_links.pop()
        verify, timeout = self._link_options
        return open_link(self.url, verify, timeout)

    def _return_link(self, link: Poster, usable: bool) -> None:
        with self._links_lock:
            if usable and not self._closed and len(self._idle_links) < IDLE_LINKS:
                self._idle_links.append(link)
                return
        link.close()

    # -- identities and apps ------------------------------------------------

    def create_identity(self) -> IdentityCreated:
        """Create an anonymous identity and use its token from now on.

        Solves the service's proof-of-work challenge first (`csml.client.pow`); a
        challenge that expired, was spent, or became too easy while the service was
        flooded (its difficulty rises with the rate of new identities, up to a cap)
        is replaced, four times at most.
        """
        from csml.client import pow
        from csml.client.errors import Conflict, InvalidRequest
        from csml.schemas.identities import IdentityChallenge

        attempts = 5
        for attempt in range(attempts):
            issued = self.request("POST", "/v1/identities/challenge")
            challenge = IdentityChallenge.model_validate(issued.json())
            nonce = pow.solve(challenge.challenge, challenge.difficulty)
            body = {"challenge": challenge.challenge, "nonce": nonce}
            try:
                response = self.request("POST", "/v1/identities", json=body)
            except (InvalidRequest, Conflict) as exc:
                stale = exc.code in ("challenge_expired", "challenge_used", "challenge_too_easy")
                if stale and attempt < attempts - 1:
                    continue
                raise
            created = IdentityCreated.model_validate(response.json())
            self.token = created.token
            self._new_result_stream()  # a stream follows one identity
            return created
        raise AssertionError("unreachable")  # pragma: no cover

    def delete_identity(self) -> None:
        """Erase this identity with all its jobs, files and records; the token stops working."""
        self.request("DELETE", "/v1/identities/me")
        self.token = None
        self._new_result_stream()

    def contribute(self, app: str, label: str = "") -> ContributionCreated:
        """A join token for your own worker of `app` (shown once), with its commands."""
        r = self.request("POST", "/v1/contributions", json={"app": app, "label": label})
        return ContributionCreated.model_validate(r.json())

    def contributions(self) -> list[ContributionInfo]:
        """Your contributed join tokens with their workers (never the tokens)."""
        r = self.request("GET", "/v1/contributions")
        return ContributionList.model_validate(r.json()).contributions

    def revoke_contribution(self, token_id: str) -> None:
        """Revoke one of your contributed join tokens: its workers stop getting jobs."""
        self.request("DELETE", f"/v1/contributions/{quote(token_id, safe='')}")

    def credit(self, limit: int = 50, before: int | None = None) -> CreditInfo:
        """Your credit: the balance (milli-credits; above zero, your queued jobs may be served
        ahead of round-robin within the coordinator's bound) and up to `limit` ledger
        entries, newest first; `before=info.next_before` gives the next (older) page."""
        params: dict[str, int] = {"limit": limit}
        if before is not None:
            params["before"] = before
        return CreditInfo.model_validate(self.request("GET", "/v1/credit", params=params).json())

    def _new_result_stream(self) -> None:
        """A fresh stream for a new identity, asking what the old one was asked (inline
        outputs, every change)."""
        if self._results is not None:
            old = self._results
            old.close()
            self._results = ResultStream(self)
            if old.inline_outputs:
                self._results.want_inline(old.inline_outputs)
            if old.progress:
                self._results.want_progress()

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
        confidential: bool = False,
        policy: Policy | str | os.PathLike[str] | None = None,
        allow_unattested: bool = False,
        requires: Mapping[str, Any] | None = None,
        trusted_only: bool = False,
        min_reputation: int | None = None,
    ) -> Job:
        """Submit a job; files stream from disk. With `retry_queue_full`, wait up to that
        many seconds for room in a full queue. `requires`: labels the worker must have
        besides the operation's own (`{"gpu": True, "gpu_memory_gb": {"min": 16}}`: a
        value is equality, `{"min": n}` a numeric minimum; see docs/user-guide/placement.md).
        `trusted_only`: run it only on the operator's workers; `min_reputation`: only on
        operator workers or contributed workers with at least this reputation (see
        docs/operator-guide/verification.md).

        With `confidential`, the job is end-to-end encrypted to the app's workers whose
        attestation passes `policy` (a `Policy`, a TOML path, or by default the app's file
        under the user config); it refuses, naming the failed checks, if none does.
        Unattested (`none`) workers are refused unless `allow_unattested` (INSECURE)."""
        spec: dict[str, Any] = {"app": app, "operation": operation, "params": params or {}}
        if limits:
            spec["limits"] = limits
        if requires:
            spec["requires"] = dict(requires)
        if trusted_only:
            spec["trusted_only"] = True
        if min_reputation is not None:
            spec["min_reputation"] = min_reputation
        keys: JobKeys | None = None
        accepted: list[WorkerAssessment] = []

        def encrypt(cached: bool) -> JobKeys:
            from csml.client.confidential import encrypt_job

            nonlocal accepted
            accepted = self.accepted_workers(app, policy, allow_unattested, cached=cached)
            new_keys, spec["confidential"] = encrypt_job(
                app, operation, params or {}, sorted(files or {}), [a.worker for a in accepted]
            )
            spec["params"] = {}
            return new_keys

        if confidential:
            keys = encrypt(cached=True)
        deadline = time.monotonic() + retry_queue_full
        rechecked = False
        try:
            while True:
                try:
                    job = self._submit_once(spec, files or {}, keys)
                    break
                except QueueFull as exc:
                    if time.monotonic() + exc.retry_after > deadline:
                        raise
                    time.sleep(exc.retry_after)
                except CsmlError as exc:
                    if keys is None or exc.code != "unknown_recipient" or rechecked:
                        raise
                    # A worker judged a moment ago has left: judge the live ones again.
                    rechecked = True
                    keys = encrypt(cached=False)
        finally:
            if keys is not None:
                keys.data_key = b""  # only the workers need it from now on
        if keys is not None:
            self._job_keys[job.id] = keys
            if self.key_store is not None:
                self.key_store.save(job.id, keys)
            job.recipients = accepted
        return job

    def submit_pipeline(
        self,
        steps: Sequence[StepSpec | Mapping[str, Any]],
        *,
        files: dict[str, FileArg] | None = None,
        limits: dict[str, float] | None = None,
        retry_queue_full: float = 0.0,
    ) -> Job:
        """Submit a chain of steps as one job. Each step is `{"name", "app", "operation",
        "params", "inputs"}`, its inputs wired to `"upload:<key of files>"` or to
        `"<earlier step>.<output>"`. The job's outputs are `<step>.<output>`; its result
        is `{"steps": {name: result}}`; `job.data.steps` shows each step's state."""
        spec: dict[str, Any] = {
            "steps": [
                s.model_dump(mode="json") if isinstance(s, StepSpec) else dict(s) for s in steps
            ]
        }  # checked by the coordinator: errors name the field (spec.steps.1.inputs.image)
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

    def map(
        self,
        app: str,
        operation: str,
        files: Sequence[FileArg],
        *,
        input: str | None = None,
        labels: Sequence[str] | None = None,
        params: dict[str, Any] | None = None,
        concurrency: int = 4,
        timeout: float = 3600.0,
        on_done: Callable[[BatchItem], None] | None = None,
        batch_items: int | None = None,
        inline_outputs: int = 0,
    ) -> Batch:
        """Run `operation` once per file (a batch; each item an ordinary job) and return
        the items in input order. Failed items are recorded, never raised; `on_done` sees
        each item as it ends. `input` names the operation's file input (default: its only
        required one). At most `concurrency` items are in flight; small files go up to
        `batch_items` per request (`POST /v1/jobs/batch`; default `BATCH_ITEMS`, 0: one
        request per item), larger ones one per request (see `csml.client.batch`).
        `inline_outputs` (bytes, at most `INLINE_MAX_BYTES`): outputs up to this size come
        with each item's result on the result stream, and its `Job.download` needs no
        request (they are held with the job until downloaded); 0: none."""
        from csml.client.batch import BATCH_ITEMS, run_batch, single_file_input

        if input is None:
            op = next((o for o in self.app(app).operations if o.name == operation), None)
            if op is None:
                raise CsmlError(f"application {app!r} has no operation {operation!r}")
            input = single_file_input(((i.name, i.required) for i in op.inputs), None)
        names = list(labels) if labels is not None else [_label(f, n) for n, f in enumerate(files)]
        if len(names) != len(files):
            raise CsmlError("labels must name every file")
        return run_batch(
            self,
            app,
            operation,
            list(zip(names, files, strict=True)),
            input_name=input,
            params=params,
            concurrency=concurrency,
            timeout=timeout,
            on_done=on_done,
            batch_items=BATCH_ITEMS if batch_items is None else batch_items,
            inline_outputs=inline_outputs,
        )

    def submit_many(
        self,
        app: str,
        operation: str,
        items: Sequence[Mapping[str, Any]],
    ) -> list[Job | CsmlError]:
        """Submit many jobs of one operation in few requests; per item, in order, its
        `Job` or the `CsmlError` that refused it (one item's refusal never raises).

        Each item is a mapping with optional `params`, `files` ({input name: file}),
        `limits` and `requires`. Items whose files are all small (at most
        `INLINE_MAX_BYTES` each) travel inline through `POST /v1/jobs/batch`, up to
        `BATCH_ITEMS` per request; an item with a larger file is submitted alone
        (multipart, streamed), as is every item on a coordinator without the batch
        route. Errors that concern every item (an unreachable coordinator, bad
        credentials) raise."""
        from csml.client.batch import (
            BATCH_BYTES,
            BATCH_ITEMS,
            NO_BATCH_STATUSES,
            batch_entry,
            inline_bytes,
            post_batch,
        )
        from csml.client.errors import TooManyRequests

        results: list[Job | CsmlError | None] = [None] * len(items)
        alone: list[int] = []
        groups: list[list[tuple[int, Entry]]] = [[]]
        size = 0
        for i, item in enumerate(items):
            files: Mapping[str, FileArg] = item.get("files") or {}
            data = {name: inline_bytes(f) for name, f in files.items()}
            small = {name: b for name, b in data.items() if b is not None}
            if len(small) != len(data):
                alone.append(i)
                continue
            entry = batch_entry(
                app,
                operation,
                item.get("params"),
                small,
                item.get("limits"),
                item.get("requires"),
            )
            grows = entry.size
            if groups[-1] and (len(groups[-1]) >= BATCH_ITEMS or size + grows > BATCH_BYTES):
                groups.append([])
                size = 0
            groups[-1].append((i, entry))
            size += grows
        for group in groups:
            if not group:
                continue
            try:
                answers: list[Job | CsmlError] = post_batch(self, [e for _, e in group])
            except TooManyRequests as exc:
                answers = [exc] * len(group)
            except CsmlError as exc:
                if exc.status not in NO_BATCH_STATUSES:
                    raise
                alone.extend(i for i, _ in group)
                continue
            for (i, _), answer in zip(group, answers, strict=True):
                results[i] = answer
        for i in sorted(alone):
            item = items[i]
            try:
                results[i] = self.submit(
                    app,
                    operation,
                    files=dict(item.get("files") or {}),
                    params=item.get("params"),
                    limits=item.get("limits"),
                    requires=item.get("requires"),
                )
            except CsmlError as exc:
                if exc.status is None or exc.status in (401, 403):
                    raise
                results[i] = exc
        return [r for r in results if r is not None]

    def workers(self, app: str) -> list[WorkerKeyInfo]:
        """The app's live workers with their public keys and attestation evidence."""
        data = self.request("GET", f"/v1/apps/{app}/workers").json()
        return [WorkerKeyInfo.model_validate(w) for w in data]

    def attest(
        self,
        app: str,
        policy: Policy | str | os.PathLike[str] | None = None,
        allow_unattested: bool = False,
    ) -> list[WorkerAssessment]:
        """Verify every live worker of `app` under `policy`: each check and its outcome."""
        from csml.client.confidential import assess_workers, resolve_policy

        chosen = resolve_policy(app, policy).unattested(allow_unattested)
        return assess_workers(self.workers(app), chosen)

    def accepted_workers(
        self,
        app: str,
        policy: Policy | str | os.PathLike[str] | None = None,
        allow_unattested: bool = False,
        *,
        cached: bool = False,
    ) -> list[WorkerAssessment]:
        """The workers a confidential job would be encrypted to; raises if there are none.

        With `cached`, a verdict on the same app and policy from the last
        `recipients_ttl` seconds is reused (submitting many jobs need not list and
        verify the workers each time)."""
        from csml.client.confidential import assess_workers, choose_recipients, resolve_policy

        chosen = resolve_policy(app, policy).unattested(allow_unattested)
        key = (app, repr(chosen))
        hit = self._accepted.get(key)
        if cached and hit is not None and time.monotonic() - hit[0] < self.recipients_ttl:
            return hit[1]
        accepted = choose_recipients(assess_workers(self.workers(app), chosen), app, chosen)
        self._accepted[key] = (time.monotonic(), accepted)
        return accepted

    def job_keys(self, job_id: str) -> JobKeys | None:
        """The client-side keys of a confidential job submitted here (or in the key store)."""
        found = self._job_keys.get(job_id)
        if found is None and self.key_store is not None:
            found = self.key_store.load(job_id)
            if found is not None:
                self._job_keys[job_id] = found
        return found

    def _submit_once(
        self, spec: dict[str, Any], files: dict[str, FileArg], keys: JobKeys | None = None
    ) -> Job:
        mark = self._results.mark() if self._results is not None else None  # before the POST
        if not files:
            response = self._post_json("/v1/jobs", spec)
            return Job(self, JobData.model_validate_json(response.content), mark)
        form = self._form_in_memory(spec, files) if keys is None else None
        if form is not None:
            response = self._post_body("/v1/jobs", form[0], form[1])
            return Job(self, JobData.model_validate_json(response.content), mark)
        with ExitStack() as stack:
            parts: list[tuple[str, Any]] = [("spec", (None, json.dumps(spec), "application/json"))]
            for name, value in files.items():
                part = _file_part(name, value, stack)
                if keys is not None:
                    part = _encrypted_part(name, part[1], keys)
                parts.append((name, part))
            response = self.request("POST", "/v1/jobs", files=parts)
        return Job(self, JobData.model_validate(response.json()), mark)

    def _form_in_memory(
        self, spec: dict[str, Any], files: dict[str, FileArg]
    ) -> tuple[bytes, str] | None:
        """The multipart body (and its content type) httpx would send for `spec` and
        `files`, built in memory for a link; None when it is not for a link (see the
        module docstring): no link, a file object, files over `LINK_UPLOAD_BYTES`
        together, a name or file name that would need escaping, or bytes that hold the
        boundary."""
        if self._link_options is None:
            return None
        parts: list[tuple[str, str, str, bytes]] = []
        total = 0
        for name, value in files.items():
            if isinstance(value, bytes):
                filename, media, data = name, "application/octet-stream", value
            elif isinstance(value, str | os.PathLike):
                path = Path(value)
                try:
                    size = path.stat().st_size
                except OSError:
                    return None  # httpx's path says what is wrong, as before
                if total + size > LINK_UPLOAD_BYTES or not path.is_file():
                    return None
                filename = path.name
                media = mimetypes.guess_type(filename)[0] or "application/octet-stream"
                data = path.read_bytes()
            else:
                return None
            total += len(data)
            if total > LINK_UPLOAD_BYTES or not (_plain(name) and _plain(filename)):
                return None
            parts.append((name, filename, media, data))
        dashed = b"--" + self._boundary.encode()
        encoded = json.dumps(spec).encode()
        if dashed in encoded or any(dashed in data for *_, data in parts):
            return None
        pieces = [
            dashed,
            b'\r\nContent-Disposition: form-data; name="spec"\r\n'
            b"Content-Type: application/json\r\n\r\n",
            encoded,
        ]
        for name, filename, media, data in parts:
            pieces += [
                b"\r\n",
                dashed,
                f'\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {media}\r\n\r\n".encode(),
                data,
            ]
        pieces += [b"\r\n", dashed, b"--\r\n"]
        return b"".join(pieces), f"multipart/form-data; boundary={self._boundary}"

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

    # -- models -------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Your models (trained by your jobs or imported), newest first."""
        data = self.request("GET", "/v1/models").json()
        return [ModelInfo.model_validate(m) for m in data["models"]]

    def model(self, model_id: str) -> ModelInfo:
        return ModelInfo.model_validate(self.request("GET", f"/v1/models/{model_id}/info").json())

    def download_model(self, model_id: str, path: str | os.PathLike[str]) -> Path:
        """Save a model's file to `path` (a folder gets a file named after the model; a name
        that is not a plain file name is refused)."""
        target = Path(path)
        if target.is_dir():
            info = self.model(model_id)
            ext = mimetypes.guess_extension(info.media_type) or ""
            name = f"{info.app}-{info.kind}-{info.id[:12]}{ext}"
            target = target / check_file_name(name, "model file")
        return _save_stream(self._stream(f"/v1/models/{quote(model_id, safe='')}"), target)

    def delete_model(self, model_id: str) -> None:
        self.request("DELETE", f"/v1/models/{model_id}")

    def import_model(
        self,
        app: str,
        format: str,
        file: FileArg,
        *,
        format_version: int | None = None,
        name: str = "model",
    ) -> ModelInfo:
        """Keep a model file (e.g. one downloaded earlier) as one of your models."""
        spec: dict[str, Any] = {"app": app, "format": format, "name": name}
        if format_version is not None:
            spec["format_version"] = format_version
        with ExitStack() as stack:
            parts: list[tuple[str, Any]] = [
                ("spec", (None, json.dumps(spec), "application/json")),
                ("model", _file_part("model", file, stack)),
            ]
            response = self.request("POST", "/v1/models", files=parts)
        return ModelInfo.model_validate(response.json())

    def _stream(self, path: str) -> Iterator[bytes]:
        """The body of a GET of `path` as it comes (a download): over a keep-alive link
        when the client has them (`csml.link`: a few calls per read where httpx's layers
        took dozens), else, or through a proxy, over httpx."""
        link = self._borrow_link() if self._link_options is not None else None
        if isinstance(link, Link):
            yield from self._stream_link(link, path)
            return
        if link is not None:
            self._return_link(link, True)  # an HttpxLink (a proxy): httpx, proxy and all
        with self._http.stream("GET", path, headers=self._headers()) as r:
            if r.status_code >= 400:
                r.read()
                raise_for(r)
            yield from r.iter_bytes(1 << 20)

    def _stream_link(self, link: Link, path: str) -> Iterator[bytes]:
        """`_stream` over `link`, given back to the pool once the body ended (a stream
        left early drops its connection, not the link: `Link.stream`)."""
        try:
            status, chunks = link.stream(path, self._headers(), accept="*/*")
            with contextlib.closing(chunks):
                if status >= 400:
                    body = b"".join(itertools.islice(chunks, 16))[: 1 << 16]
                    raise_for(LinkResponse(status, body))
                yield from chunks
        except LinkError as exc:
            self._return_link(link, False)
            raise self._unreachable(exc) from exc
        except BaseException:
            self._return_link(link, True)
            raise
        self._return_link(link, True)


def _label(value: FileArg, index: int) -> str:
    return str(value) if isinstance(value, str | os.PathLike) else f"item-{index}"


def _plain(text: str) -> bool:
    """Whether `text` goes in a quoted multipart header as it is (printable ASCII, no
    quote or backslash): httpx would escape nothing in it."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


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


def _encrypted_part(name: str, body: Any, keys: JobKeys) -> tuple[str, Any, str]:
    """The input streamed through secretstream; neither its file name nor its type is sent."""
    import io

    from csml.crypto import EncryptingReader, associated_data

    source = io.BytesIO(body) if isinstance(body, bytes) else body
    ad = associated_data("input", keys.job_nonce, name)
    return (name, EncryptingReader(source, keys.data_key, ad), "application/octet-stream")


class Job:
    """A submitted job; `refresh`, `wait`, `download` and `cancel` talk to the coordinator."""

    def __init__(self, client: Client, data: JobData, mark: Mark | None = None) -> None:
        self._client = client
        self.data = data
        self._mark = mark  # where the client's result stream was when it was submitted
        # Confidential jobs: the workers it was encrypted to (set by `submit`) and the
        # decrypted result, with the key of its outputs, for the current encrypted result.
        self.recipients: list[WorkerAssessment] = []
        self._opened: tuple[Any, ResultPayload, bytes] | None = None
        # Outputs that came with the result stream's view (base64 by name), until used.
        self._inline: dict[str, str] = {}

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
        """The result (a confidential job's is decrypted here, with its client-side key)."""
        if self.data.confidential:
            opened = self._open()
            return opened[0].result if opened is not None else None
        return self.data.result

    @property
    def error(self) -> str | None:
        if self.data.confidential:
            opened = self._open()
            if opened is not None and opened[0].error:
                return opened[0].error
        return self.data.error

    @property
    def confidential(self) -> bool:
        return self.data.confidential

    def _open(self) -> tuple[ResultPayload, bytes] | None:
        """Decrypt the encrypted result (cached): the payload and the outputs' key."""
        encrypted = self.data.encrypted_result
        if encrypted is None:
            return None
        if self._opened is not None and self._opened[0] == encrypted:
            return self._opened[1], self._opened[2]
        from csml.client.confidential import open_job_result

        keys = self._client.job_keys(self.id)
        if keys is None:
            where = (
                f" (looked in {self._client.key_store.folder})"
                if self._client.key_store is not None
                else ""
            )
            raise CsmlError(
                f"job {self.id[:12]} is confidential and this client does not hold its "
                f"result key{where}: only the client that submitted it can read its result"
            )
        payload, key = open_job_result(self.id, keys, encrypted)
        self._opened = (encrypted, payload, key)
        return payload, key

    @property
    def outputs(self) -> dict[str, Any]:
        return {name: f.model_dump() for name, f in self.data.outputs.items()}

    @property
    def models(self) -> dict[str, str]:
        """Outputs kept as your models: output name -> model id (use as params.model)."""
        return dict(self.data.models)

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
        """Block until the job ends; `on_progress` sees each update.

        Follows the client's shared result stream (opened by the first wait); long-polls
        when there is none or it drops."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self._client._results
        if (
            self.done
            or stream is None
            or (on_progress is not None and not stream.want_progress())  # it sends ends only
            or not stream.open()
        ):
            return self._long_poll(deadline, timeout, poll, on_progress)
        inbox, latest, covered = stream.register(self.id, self._mark)
        try:
            if latest is not None:
                self._take_view(latest)
            elif not covered:
                self.refresh()  # what the stream may have missed before we registered
            while not self.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WaitTimeout(
                        f"job {self.id[:12]} still {self.state.value} after {timeout:g} s"
                    )
                item = stream.take(inbox, min(remaining or SAFETY_SECONDS, SAFETY_SECONDS))
                if item is None:
                    item = RECHECK  # heard nothing for a while: look
                if item == LOST:
                    return self._long_poll(deadline, timeout, poll, on_progress)
                if item == RECHECK:
                    self.refresh()
                elif isinstance(item, dict):
                    self._take_view(item)
                if on_progress is not None:
                    on_progress(self)
        finally:
            stream.unregister(self.id, inbox)
        return self

    def _take_view(self, view: dict[str, Any]) -> None:
        """A view from the result stream, with the outputs it carries inline, if any."""
        self.data = JobData.model_validate(view)
        inline = view.get("inline_outputs")
        if isinstance(inline, dict) and not self.data.confidential:
            self._inline = {k: v for k, v in inline.items() if isinstance(v, str)}

    def _inline_output(self, name: str) -> bytes | None:
        """Output `name` as it came inline (once: the bytes are then let go), if its size
        and sha256 are those of the job's view; None otherwise (it is downloaded)."""
        encoded = self._inline.pop(name, None)
        info = self.data.outputs.get(name)
        if encoded is None or info is None or self.data.confidential:
            return None
        try:
            data = base64_text.decode(encoded)  # pydantic-core's: ~4x binascii's
        except ValueError:
            return None
        if len(data) != info.size or hashlib.sha256(data).hexdigest() != info.sha256:
            return None
        return data

    def _long_poll(
        self,
        deadline: float | None,
        timeout: float | None,
        poll: float,
        on_progress: ProgressCallback | None,
    ) -> Job:
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
        """The bytes of output `name`; a confidential job's are decrypted as they stream
        (an altered or truncated output raises `CsmlError` at the chunk at fault)."""
        if self.data.confidential:
            yield from self._iter_decrypted(name)
            return
        yield from self._iter_stored(name)

    def _iter_stored(self, name: str) -> Iterator[bytes]:
        check_file_name(name)
        path = f"/v1/jobs/{quote(self.id, safe='')}/outputs/{quote(name, safe='')}"
        yield from self._client._stream(path)

    def _iter_decrypted(self, name: str) -> Iterator[bytes]:
        from csml.crypto import DecryptionError, StreamDecryptor, associated_data

        opened = self._open()
        keys = self._client.job_keys(self.id)
        if opened is None or keys is None:
            raise CsmlError(f"job {self.id[:12]} has no encrypted result yet ({self.state.value})")
        ad = associated_data("output", keys.job_nonce, name)
        decryptor = StreamDecryptor(opened[1], ad, f"output {name!r} of job {self.id[:12]}")
        try:
            for chunk in self._iter_stored(name):
                plain = decryptor.feed(chunk)
                if plain:
                    yield plain
            last = decryptor.finish()
        except DecryptionError as exc:
            raise CsmlError(f"cannot decrypt: {exc}") from None
        if last:
            yield last

    def download(self, name: str, path: str | os.PathLike[str]) -> Path:
        """Stream output `name` to `path` (a folder gets a file named after the output).

        Written to `path.part` and renamed at the end, so a failed download (or a
        confidential output that fails decryption) leaves no file behind. A name that is
        not a plain file name (a path, `..`, a hidden file, control characters) is
        refused with `CsmlError` before anything is written."""
        check_file_name(name)
        target = Path(path)
        if target.is_dir():
            info = self.data.outputs.get(name)
            ext = (mimetypes.guess_extension(info.media_type) if info else None) or ""
            target = target / check_file_name(f"{name}{ext}")
        data = self._inline_output(name)
        if data is not None:
            return _save_stream(iter((data,)), target)
        return _save_stream(self.iter_output(name), target)

    def download_all(self, folder: str | os.PathLike[str]) -> list[Path]:
        """Save every output into `folder` (made if missing). Every name is checked first,
        so a coordinator that sends one unsafe name gets nothing written."""
        names = [check_file_name(name) for name in self.data.outputs]
        target = Path(folder)
        if names:
            target.mkdir(parents=True, exist_ok=True)
        return [self.download(name, target) for name in names]


def _save_stream(chunks: Iterator[bytes], target: Path) -> Path:
    """Write to `target.part`, renamed at the end, so a failed download leaves no file."""
    tmp = target.with_name(target.name + ".part")
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(target)
    return target
