"""The worker agent: join, claim jobs, run them in the sandbox, report back.

Threads: one per slot (one more with a prefetch), taking turns; one heartbeats
(extending leases, relaying progress, aborting cancelled jobs) when no claim did.

Batched protocol: a claim asks for up to `free slots + prefetch` jobs (prefetched
ones wait for a slot under their lease; for jobs short beside a claim's round trip
the prefetch grows, up to `PREFETCH_REACH` times the configured one, to what the slots
run through in two round trips: `_reach`) and carries the heartbeat of every job
held, so the heartbeat thread speaks only when no claim did for 3/4 of an interval
(all slots and the prefetch busy; checked every half interval); inputs come inline
in the claim (up to 1 MiB per answer, the coordinator's choice); each completion
carries its outputs inline up to the bound the coordinator gave at registration
(`WorkerRegistered.inline_output_bytes`: 1 MiB, or 256 KiB from an older coordinator;
1 MiB per completion in all), larger ones are uploaded first.

Turns: a slot thread not running a job takes the first turn due (`_next_turn`): send
the completions that must go alone, run a claimed job a slot is free for, or claim
(`_claim_due`: when no claim is in flight, some capacity is free and, with a prefetch,
the jobs claimed and waiting for a slot fell to half of it, or to what the slots run
through in four claims' round trips if that is more: a refill). The thread that
claims runs the first job of the answer itself and wakes a waiting thread for each
other one; no thread claims next (none is woken for it, none awake takes it) until that
job has been `CLAIM_GRACE_SECONDS` in its child without answering, or has ended: a
thread whose job ended looks for its next turn itself, so a quick job's completion goes
in the claim it then sends (or alone, by itself). A thread is woken only for a turn
nobody else takes (`_wake_others`): thread hand-overs cost far more than the work they
hand over. At
most one claim is in flight (on the claim link), and at most one thread sends alone
(the sender link); completions that end while it sends go in its next batch. (A
second claim in flight, once half the capacity was free, measured no gain in
throughput nor in CPU per job, `bench/agent_cost.py`, and was removed.)

Completions ride claims (protocol 3, when the coordinator says at registration that
it speaks it): a handed completion frees its job's slot at once, and the next claim
carries the pending completions, ending their jobs once answered (its answer is their
receipt; the coordinator commits them, and pushes their results to their owners,
before the claim waits for work). Such a claim long-polls only when the worker holds no
other job (none running, none queued here: no completion can end meanwhile, and the
receipt comes with the next job); else it does not wait, and answers at once. So one
job at a time costs a worker one request (its completion riding the claim that waits
for the next job) instead of two (a long-poll claim sent while it runs, then its
completion alone). With a prefetch more than half full (and jobs long enough that the
rest covers four claims' round trips), a job's end sends nothing: its completion waits
for the refill claim, with those of the jobs ending after it, but never longer than
`completion_hold` (0.1 s by default: then the claim goes anyway; a waiting thread looks
again that often while jobs are held). Batch photos sent a claim after almost every
job (0.87 per photo), each bringing one job; no-op jobs, whose slots run through ~5 in
a claim's round trip, still claim at every end (held, the prefetch ran dry more
often). A completion never waits for a claim that is not coming: while a claim
long-polls for work, or once the worker stops claiming, the pending ones go alone at
once; while one that carries completions and does not wait is in flight, they wait
for the next, which follows it. Completions of a claim that failed, or whose answer
has no `results` for them (a coordinator that ignored them), go alone (a repeat of
one already kept is refused, 409: exactly one result is kept; after a failed claim
that may be its own, logged as such); with a coordinator older than protocol 3 every
completion goes alone.

Job folders (`inputs/`, `outputs/`, in the worker's own 0700 folder) are reused from
job to job: a job's thread empties its folder once the completion is built (outputs
inline in it or uploaded) and gives it back. Emptying unlinks the files the job left
by name: its inputs as written here, and its outputs as the sandbox took them back
(which leaves nothing else in `outputs/`; with a uid per job it is root's again, so a
process a job left behind cannot write in the folder the next job gets). A folder
whose content is not known (the sandbox did not take it back, a worker-side failure)
is removed instead. An owner's inputs stay in the folder (root's again, 0400) for that
owner's next job, which has its inputs written over them (`_write_input`: no new inode,
which on ext4 cost more than the write); a folder goes to another owner's job (or a
confidential one) only once they are unlinked, so no file a job may still hold open
ever receives another owner's bytes. Only with a uid per job: under the worker's uid a
job can write anywhere in its folder (and leave files there for the next job, maybe
another identity's), so each job's folder is removed when it ends, as before.

The coordinator may restart or be briefly unreachable: every
call retries with backoff, and the leases say what is still ours. Retrying ends
with `stop()`: a stopping worker finishes its jobs (or, abandoning a coordinator
gone for good, ends them) and says nothing about connections it closed itself.

Secrets: the join token is taken from the configuration once, wiped from the
process environment at start (`CSML_JOIN_TOKEN`, including the copy the kernel
shows in /proc/PID/environ) and dropped once the worker is registered; after
that the worker holds only its worker token and its X25519 key. Job processes
never receive either (they talk to the worker through `channel` frames only).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import logging
import math
import os
import platform
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
from nacl.public import PrivateKey
from pydantic import ValidationError
from pydantic_core import to_json

from csml import placement
from csml.apps.registry import load_app
from csml.attestation.evidence import INSECURE_KIND, load_provider
from csml.crypto import (
    DecryptionError,
    StreamDecryptor,
    associated_data,
    b64d,
    b64e,
    encrypt_iter,
    new_data_key,
    unwrap_key,
    worker_key_report_data,
)
from csml.crypto.envelope import JobManifest, ResultPayload, open_manifest, seal_result
from csml.link import LinkError, LinkResponse, Poster, open_link
from csml.schemas import (
    ClaimedJob,
    ClaimResponse,
    FileInfo,
    Heartbeat,
    HeartbeatResponse,
    Progress,
    RunningJob,
    WorkerAttestation,
    WorkerRegistered,
    WorkerRegistration,
    base64_text,
)
from csml.schemas.workers import (
    COMPLETIONS_RIDE_CLAIMS,
    INLINE_MAX_BYTES,
    INLINE_OUTPUT_MAX_BYTES,
    BatchedCompletion,
    CompletionBatch,
    CompletionOutcome,
    CompletionResults,
    InlineOutput,
)
from csml.transport import check_url, verify_option
from csml.worker.isolation import usable_cpus
from csml.worker.sandbox import IDLE_RSS_ALLOWANCE, MAX_IDLE, Outcome, Sandbox, SandboxJob
from csml.worker.scratch_folder import ScratchFolder

log = logging.getLogger("csml.worker")
T = TypeVar("T")
NO_PROGRESS = Progress()  # a job's until it tells (shared: a job's is replaced, never changed)
R = TypeVar("R", bound=httpx.Response | LinkResponse)
ENCRYPTED_ERROR = "the job failed; the reason is encrypted for its owner"


JOIN_TOKEN_ENV = "CSML_JOIN_TOKEN"  # noqa: S105 - a variable name


def scrub_environment(name: str) -> None:
    """Remove `name` from the environment, overwriting its value in place first: the
    process's initial environment block (what /proc/PID/environ shows) keeps a value
    that is only unset."""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_void_p
    libc.getenv.argtypes = [ctypes.c_char_p]
    value = libc.getenv(name.encode())
    if value:
        ctypes.memset(value, 0, len(ctypes.string_at(value)))
    os.environ.pop(name, None)


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
    attestation: str = INSECURE_KIND
    attestation_collateral: dict[str, str] | None = None
    pin_sha256: str | None = None
    insecure_http: bool = False
    # Jobs claimed beyond the free slots, to start at once when one frees (0: a job stays
    # queued, claimable by any worker, until a slot here is free).
    prefetch: int = 0
    # With a prefetch: how long a job's completion may wait for the claim that refills it
    # once half empty (`WorkerAgent._claim_due`; 0: a claim follows every job's end).
    completion_hold: float = 0.1
    # Placement labels announced at registration (with `automatic_labels` added under
    # them: given ones win), e.g. {"gpu": True, "gpu_memory_gb": 24}.
    labels: dict[str, Any] = field(default_factory=dict)


def automatic_labels() -> dict[str, Any]:
    """Labels every worker announces unless told otherwise: `arch` (the machine, e.g.
    x86_64), `cpus` (how many the worker's process may use)."""
    return {"arch": platform.machine() or "unknown", "cpus": usable_cpus()}


@dataclass
class _Running:
    claimed: ClaimedJob
    progress: Progress = field(default_factory=lambda: NO_PROGRESS)
    cancel: threading.Event = field(default_factory=threading.Event)
    handed: bool = False  # its completion is pending: whoever sends it ends the job
    freed: bool = False  # its slot was given back when its completion was handed
    arrived: float = 0.0  # monotonic time its claim was answered (`AgentStats.queued_s`)


@dataclass
class _Secret:
    """A confidential job as this worker opened it."""

    data_key: bytes
    nonce: bytes
    manifest: JobManifest


@dataclass
class _Completion:
    """A completion waiting to be sent (riding a claim, or alone); its job ends once sent."""

    completion: BatchedCompletion
    resent: bool = False  # a claim carrying it failed: the coordinator may have kept it
    at: float = field(default_factory=time.monotonic)  # when it was handed


@dataclass
class _ClaimTurn:
    """A slot thread's turn to claim up to `free` jobs, carrying `riding` completions;
    `poll`: it long-polls (none riding, or no other job held: see the module docstring)."""

    free: int
    riding: list[_Completion]
    poll: bool


@dataclass
class _Folder:
    """A job folder (`inputs/`, `outputs/`), reused from job to job (`_take_folder`,
    `_give_back`): made once instead of three directories made and removed per job."""

    path: str
    inputs: Path
    outputs: Path
    has_inputs: bool = False  # `inputs/` exists
    files: list[str] = field(default_factory=list)  # what the running job left in it
    known: bool = True  # `files` and `kept` are all it holds (else it is removed)
    owner: str = ""  # the owner whose job has it, or had it last ("": none, or confidential)
    kept: set[str] = field(default_factory=set)  # input files in `inputs/` kept for `owner`


@dataclass
class AgentStats:
    """What the agent did since it started (`WorkerAgent.stats()`; logged when it
    leaves). Slot-seconds are integrals over time of slots: `busy_s` of slots holding a
    job (from taking it to handing its completion), `queued_idle_s` of free slots while
    a claimed job waited in the local queue (the hand-over to a slot thread: ~0 if the
    prefetch works). A worker whose coordinator had jobs queued all along idled
    `slots x wall - busy_s` slot-seconds: the time its slots waited for claims;
    `starved_s` is the part of it spent with nothing queued here while a claim that
    answers at once was in flight (its round trip outlasting the prefetch).

    Where a job's time between its claim and its completion's receipt goes, summed over
    jobs: `queued_s`, claimed and waiting here for a slot thread (the claim's answer to
    the thread taking it); `ride_wait_s`, a completion that rode a claim waiting for
    that claim to be sent (handed to sent); `ride_flight_s`, that claim's round trip
    (sent to answered: the coordinator commits the completion within it); `alone_s`, a
    completion sent alone from handed to answered."""

    jobs: int = 0  # jobs taken by a slot thread
    claims: int = 0  # claims answered
    empty_claims: int = 0  # ... of which brought no job
    claimed: int = 0  # jobs the claims brought
    riding: int = 0  # completions that rode a claim
    alone: int = 0  # completions sent alone
    alone_batches: int = 0  # ... in this many requests
    wakes: int = 0  # slot threads woken for a turn (a thread hand-off each)
    idle_wakes: int = 0  # ... that found no turn left for them and waited again
    busy_s: float = 0.0
    queued_idle_s: float = 0.0
    starved_s: float = 0.0  # free slots, nothing queued, a claim (not a long-poll) in flight
    quick_claims: int = 0  # claims answered at once (carrying completions, or not polling)
    quick_claim_s: float = 0.0  # ... their time in flight, in all
    prefetch_peak: int = 0  # the largest prefetch held (`WorkerAgent._reach`)
    queued_s: float = 0.0  # claimed jobs' waits here for a slot thread, in all
    ride_wait_s: float = 0.0  # riding completions' waits for their claim to be sent
    ride_flight_s: float = 0.0  # ... and their claims' round trips, per completion
    alone_s: float = 0.0  # completions sent alone: handed to answered, in all


MAX_COMPLETION_BATCH = 64
CLAIM_GRACE_SECONDS = 0.005
"""How long the job a claim brought may run in its child before a thread claims next: a
job that answers sooner has its completion ride that claim (see the module docstring).
A job queued meanwhile for this worker waits at most this much longer to be claimed."""
PREFETCH_REACH = 2
"""A prefetch grows up to this many times the configured one (`WorkerAgent._reach`)."""
MAX_CLAIM_JOBS = 256  # `ClaimRequest.max_jobs`' bound: a grown prefetch stays within it
IDLE_CHECK_SECONDS = 5.0  # a waiting slot thread looks again (it is woken when due)
IDLE_PER_PLACE = 4  # idle children per place of the idle memory budget, at most
MAX_INLINE_OUTPUTS = 16
INLINE_OUTPUT_BYTES = 1 << 20
"""Inline outputs of one completion at most, decoded; the others are uploaded."""
COMPLETION_BATCH_BYTES = 2 << 20
"""A completion batch takes no more completions once its inline outputs reach this
(base64): with one job's at most 4/3 of `INLINE_OUTPUT_BYTES`, a request stays well under
the coordinator's default 4 MiB bound on a worker's JSON body."""


def _inline_size(pending: _Completion) -> int:
    """Base64 characters of a completion's inline outputs."""
    return sum(len(o.content) for o in pending.completion.inline_outputs)


class Refused(Exception):
    """A confidential job this worker will not run; the message says why (no secrets)."""


class WorkerAgent:
    def __init__(self, config: WorkerConfig) -> None:
        check_url(config.coordinator, insecure_http=config.insecure_http)
        scrub_environment(JOIN_TOKEN_ENV)  # read once (into `config`), before any thread
        self._join_token = config.join_token
        config.join_token = ""  # only this agent, until registered
        self.config = config
        self.app = load_app(config.app)
        # The key of confidential jobs: made here, kept only in this process's memory
        # (the zygote and job processes are fresh interpreters that never see it).
        self._key = PrivateKey.generate()
        self.attestation = self._attest()
        # (Sweeps the folders of workers killed before: see `scratch_folder`.)
        self._scratch = ScratchFolder("csml-worker-", config.workdir)
        self._workdir = self._scratch.path
        self._folder_names = itertools.count(1)  # job folders' names in it
        self._folders: deque[_Folder] = deque()  # job folders no job uses (`_take_folder`)
        self._folders_lock = threading.Lock()  # (slot threads take and give back folders)
        # Idle children (one per owner, see `sandbox`): the memory they may keep is what
        # max(MAX_IDLE, 2 x slots) children may each keep; within it, up to
        # IDLE_PER_PLACE times as many small ones (many owners sharing a worker would
        # otherwise get a fresh process for most of their jobs).
        places = max(MAX_IDLE, 2 * config.slots)
        self.sandbox = Sandbox(  # before any thread
            config.app,
            workdir=self._workdir,
            max_idle=IDLE_PER_PLACE * places,
            idle_bytes=places * IDLE_RSS_ALLOWANCE,
            slots=config.slots,  # each job's libraries get its share of the CPUs
        )
        self.stopping = threading.Event()  # no new claims
        self.finished = threading.Event()  # running jobs are done: stop talking
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)  # a job left `_running`
        # Capacity: the slots plus the prefetch; a claim takes what is free of it. The
        # rest of this block is guarded by `_lock` (see the module docstring: turns).
        self._prefetch = max(0, config.prefetch)  # grows for short jobs (`_reach`)
        self._capacity = config.slots + self._prefetch
        self._free = self._capacity  # capacity no job holds (< 0 after a shrink)
        self._queue: deque[ClaimedJob] = deque()  # claimed, waiting for a slot thread
        self._active = 0  # jobs a slot thread runs (at most `slots`)
        self._stats = AgentStats(prefetch_peak=self._prefetch)
        self._tallied = time.monotonic()  # when `_tally` last integrated the slots
        self._last_beat = 0.0  # monotonic time a claim last carried the heartbeat
        # Moving averages (`_refill_at`): seconds a slot thread spends on a job, and a
        # claim answered at once spends in flight (0: none measured yet).
        self._job_seconds = 0.0
        self._claim_seconds = 0.0
        # Completions handed and not yet sent, in order: the next claim carries them, or
        # they go alone when no claim will soon (see the module docstring).
        self._pending: list[_Completion] = []
        self._claiming = False  # a claim is in flight (sent by a slot thread)
        self._polling = False  # ... and long-polls (it carries no completion)
        self._sending = False  # a slot thread sends completions alone (one at a time)
        self._fold = False  # completions ride claims (the coordinator speaks protocol 3)
        self._inline_output = INLINE_MAX_BYTES  # the largest output a completion carries
        self._idle: deque[threading.Lock] = deque()  # slot threads waiting for a turn
        self._waking = 0  # slot threads woken for a turn, not yet running
        # No thread claims until the claimer's job is CLAIM_GRACE_SECONDS in its child.
        self._deferred = False
        self._failure: BaseException | None = None  # what ended the claims, unexpectedly
        self.http = httpx.Client(
            base_url=config.coordinator.rstrip("/"),
            timeout=httpx.Timeout(30.0, read=config.claim_wait + 30),
            limits=httpx.Limits(max_connections=config.slots + 4),
            verify=verify_option(config.pin_sha256),
        )
        # The per-job calls go over links (`link`: a keep-alive connection each, far
        # cheaper per call than httpx): claims long-poll on one of their own, closed by
        # stop() to end the wait; completions sent alone go on the other.
        verify = verify_option(config.pin_sha256)
        base = config.coordinator.rstrip("/")
        self.claims: Poster = open_link(base, verify, timeout=config.claim_wait + 30)
        self._sender = open_link(base, verify, timeout=30.0)
        self.registration: WorkerRegistered | None = None

    # -- HTTP with retries --------------------------------------------------

    def _call(
        self,
        what: str,
        fn: Callable[[], R],
        until: threading.Event | None = None,
    ) -> R:
        """Call, retrying transport errors and 5xx until `until` (default: shutdown) is set."""
        until = until or self.finished
        delay = 0.2
        while not until.is_set():
            try:
                response = fn()
            except (httpx.TransportError, LinkError) as exc:
                if not until.is_set():  # else: stop() closed the connection, not a fault
                    log.warning(
                        "coordinator unreachable (%s: %s); retrying", what, type(exc).__name__
                    )
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

    def _attest(self) -> WorkerAttestation:
        """Evidence binding this worker's public key (and app) from the configured provider."""
        provider = load_provider(self.config.attestation)
        public_key = bytes(self._key.public_key)
        evidence = provider.produce(worker_key_report_data(public_key, self.config.app))
        if provider.kind == INSECURE_KIND:
            log.warning(
                "attestation: none. INSECURE: whoever runs this worker can read the "
                "confidential jobs sent to it; clients refuse it unless told "
                "--insecure-allow-unattested"
            )
        else:
            log.info(
                "attestation evidence ready",
                extra={"fields": {"kind": provider.kind, "evidence_bytes": len(evidence)}},
            )
        return WorkerAttestation(
            kind=provider.kind,
            public_key=b64e(public_key),
            evidence=b64e(evidence),
            collateral=self.config.attestation_collateral,
        )

    def register(self) -> WorkerRegistered:
        body = WorkerRegistration(
            app=self.app.manifest(),
            slots=self.config.slots,
            sandbox=self.sandbox.description,
            attestation=self.attestation,
            labels={**automatic_labels(), **self.config.labels},
        )
        response = self._call(
            "register",
            until=self.stopping,
            fn=lambda: self.http.post(
                "/v1/workers",
                json=body.model_dump(mode="json"),
                headers={"Authorization": f"Bearer {self._join_token}"},
            ),
        )
        response.raise_for_status()
        self.registration = WorkerRegistered.model_validate(response.json())
        self._fold = self.registration.protocol >= COMPLETIONS_RIDE_CLAIMS
        # Larger outputs are uploaded first (`WorkerRegistered.inline_output_bytes`).
        self._inline_output = min(self.registration.inline_output_bytes, INLINE_OUTPUT_MAX_BYTES)
        self._join_token = ""  # registered: the worker token is all it needs from now on
        log.info(
            "joined the cluster",
            extra={
                "fields": {
                    "app": self.config.app,
                    "slots": self.config.slots,
                    "sandbox": self.sandbox.description,
                    "labels": body.labels,
                }
            },
        )
        return self.registration

    def run(self) -> None:
        """Serve until `stop()`; returns after running jobs finish or are handed back."""
        self.register()
        beat = threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat")
        beat.start()
        # One thread per slot, and with a prefetch one more: it claims while every slot
        # runs a job.
        count = self.config.slots + (1 if self._capacity > self.config.slots else 0)
        threads = [
            threading.Thread(target=self._turns, daemon=True, name=f"slot-{i}")
            for i in range(count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._wait_sent()
        self.finished.set()
        self._sender.close()
        self._leave()
        stats = self.stats()
        log.info(
            "left the cluster",
            extra={
                "fields": {
                    **asdict(stats),
                    "busy_s": round(stats.busy_s, 4),
                    "queued_idle_s": round(stats.queued_idle_s, 4),
                }
            },
        )
        self.sandbox.close()
        self._scratch.close()
        if self._failure is not None:
            raise self._failure

    def stop(self, abandon: bool = False) -> None:
        """No new claims; `run()` returns once running jobs are done. `abandon`: the
        coordinator is gone for good (its `csml up` died), so also end the running
        jobs and stop calling it, instead of retrying forever."""
        self.stopping.set()
        self.claims.close()
        if abandon:
            self._abort_all()
            self.finished.set()
        self._wake_all()

    def _wake_all(self) -> None:
        """Every waiting slot thread looks again (the worker stops)."""
        with self._lock:
            self._waking += len(self._idle)
            while self._idle:
                self._idle.popleft().release()

    def _leave(self) -> None:
        if self.registration is None:
            return
        with contextlib.suppress(httpx.HTTPError):
            self.http.delete(self._path(""), headers=self._auth(), timeout=5)

    # -- turns ----------------------------------------------------------------

    def _turns(self) -> None:
        """A slot thread: sends completions that must go alone, runs claimed jobs, or
        claims, whichever is due first (see `_next_turn`), until the worker stops."""
        waiter = threading.Lock()
        waiter.acquire()
        while True:
            with self._lock:
                turn = self._next_turn(waiter)
            if turn is None:
                return
            if isinstance(turn, list):
                self._send_alone(turn)
                continue
            job = self._claim_turn(turn) if isinstance(turn, _ClaimTurn) else turn
            if job is not None:
                self._execute(job)

    def _next_turn(
        self, waiter: threading.Lock
    ) -> list[_Completion] | ClaimedJob | _ClaimTurn | None:
        """(Under `_lock`.) This thread's next turn, waiting for one: a batch of
        completions to send alone (no claim will carry them soon), a claimed job to run
        (a slot is free), or a claim turn (`_claim_due`); None: the worker stops and
        nothing is left for this thread."""
        woken = False
        while True:
            turn: list[_Completion] | ClaimedJob | _ClaimTurn | None
            if not self._sending and self._alone():
                self._sending = True
                turn = self._take_batch()
            elif self._queue and self._active < self.config.slots:
                self._tally()
                self._active += 1
                self._stats.jobs += 1
                turn = self._queue.popleft()
                self._stats.queued_s += self._tallied - self._running[turn.id].arrived
            elif self.stopping.is_set():
                return None  # queued jobs left are for the threads running jobs now
            elif self._claim_due():
                self._tally()
                riding = self._take_batch() if self._fold else []
                # Riding completions: it waits for work only if no other job is held.
                self._polling = poll = not riding or (self._active == 0 and not self._queue)
                if self._active == 0 and not self._queue:  # it long-polls holding nothing:
                    self._resize(max(0, self.config.prefetch))  # a burst of long jobs
                    # is shared as configured (the next quick claim sizes it again)
                self._claiming = True
                turn = _ClaimTurn(self._free, riding, poll)
                self._free = 0
            else:
                self._stats.idle_wakes += woken
                self._idle.append(waiter)
                wait = IDLE_CHECK_SECONDS
                if self._running and self._holds():
                    # Look again when the oldest completion's hold ends (or a hold from
                    # now: nobody is woken for one handed meanwhile, `_claim_due`).
                    left = self._hold_left()
                    wait = left if left > 0 else self.config.completion_hold
                self._lock.release()
                try:
                    waiter.acquire(timeout=wait)
                finally:
                    self._lock.acquire()
                try:
                    self._idle.remove(waiter)  # not woken: timed out
                except ValueError:
                    self._waking -= 1
                    woken = True
                else:
                    woken = False
                continue
            self._wake_others()
            return turn

    def _tally(self) -> None:
        """(Under `_lock`, before `_active` or `_queue` changes.) Integrate the slots'
        use since the last change (`AgentStats`)."""
        now = time.monotonic()
        span, self._tallied = now - self._tallied, now
        self._stats.busy_s += self._active * span
        if self._queue and self._active < self.config.slots:
            self._stats.queued_idle_s += (
                min(len(self._queue), self.config.slots - self._active) * span
            )
        elif self._claiming and not self._polling and self._active < self.config.slots:
            self._stats.starved_s += (self.config.slots - self._active) * span

    def stats(self) -> AgentStats:
        """A copy of the counters so far (slot-seconds integrated up to now)."""
        with self._lock:
            self._tally()
            return replace(self._stats)

    def _claim_due(self) -> bool:
        """(Under `_lock`.) Whether a slot thread should claim now: some capacity (slots
        plus prefetch no job holds) is free, no claim is in flight (it brings only the
        jobs it asked for), the job the last claim brought is past its grace
        (`_deferred`: see `_claim_turn`), and the local prefetch needs a refill: it fell to
        `_refill_at` (`_queue`, jobs claimed and waiting for a slot, at most half the
        prefetch, or more for short jobs), or a completion has waited
        `config.completion_hold` for it. Until then a job's end sends nothing: its
        completion rides the refill, with those of the jobs after it (fewer claims, each
        of more jobs)."""
        if self._free <= 0 or self._claiming or self._deferred or self.stopping.is_set():
            return False
        if not self._holds() or len(self._queue) <= self._refill_at():
            return True
        return bool(self._pending) and self._hold_left() <= 0

    def _refill_at(self) -> int:
        """(Under `_lock`.) Jobs queued here at most when the prefetch is refilled: half
        of it, or more if the slots would run through more than that in four claims'
        round trips (two: the refill may wait for the claim in flight; twice over, as
        round trips vary). Short jobs: a claim follows every job's end, as it must to
        keep the slots fed; so it does while no job's time is known."""
        prefetch = self._prefetch
        if self._job_seconds <= 0:
            return prefetch
        during = 4 * self._claim_seconds * self.config.slots / self._job_seconds
        return max(prefetch // 2, min(prefetch, math.ceil(during)))

    def _reach(self) -> None:
        """(Under `_lock`, once a claim's or a job's time was measured.) Size the prefetch
        to the jobs: what the slots run through in two claims' round trips (a claim goes
        out as the previous answer comes, so what is held here when it is sent must last
        its round trip, twice over as round trips vary), at least the configured prefetch
        and at most `PREFETCH_REACH` times it. Long jobs keep the configured one; no-op
        jobs on a loaded machine, whose claims took 15 ms against ~2.5 ms of a slot per
        job, had their slots starved half the time with a prefetch of 8 (`starved_s`):
        16 gave (a) +35 % jobs/s at load 5-7. Shrinking leaves `_free` below zero until
        enough held jobs end. Without a configured prefetch nothing is prefetched. A claim
        that long-polls holding nothing goes with the configured one (`_next_turn`)."""
        floor = self.config.prefetch
        if floor <= 0 or self._job_seconds <= 0 or self._claim_seconds <= 0:
            return
        during = 2 * self._claim_seconds * self.config.slots / self._job_seconds
        reach = min(PREFETCH_REACH * floor, MAX_CLAIM_JOBS - self.config.slots)
        self._resize(max(floor, min(reach, math.ceil(during))))

    def _resize(self, prefetch: int) -> None:
        """(Under `_lock`.) Hold up to `prefetch` jobs beyond the slots from now on."""
        if prefetch != self._prefetch:
            self._free += prefetch - self._prefetch
            self._capacity += prefetch - self._prefetch
            self._prefetch = prefetch
            self._stats.prefetch_peak = max(self._stats.prefetch_peak, prefetch)

    def _holds(self) -> bool:
        """Whether completions may wait for a refill (a prefetch, and a hold)."""
        return self.config.prefetch > 0 and self.config.completion_hold > 0

    def _hold_left(self) -> float:
        """(Under `_lock`.) Seconds until the oldest pending completion has waited
        `config.completion_hold` (the hold if none is pending)."""
        hold = self.config.completion_hold
        return self._pending[0].at + hold - time.monotonic() if self._pending else hold

    def _wake_others(self) -> None:
        """(Under `_lock`.) Wake as many waiting slot threads as there are turns due
        that no running or woken thread takes: queued jobs a slot is free for, the
        claim turn, completions to send alone. (A thread that finishes a turn looks
        for its next one itself: no wake-up on its own account.)"""
        due = min(len(self._queue), self.config.slots - self._active)
        if self._claim_due():
            due += 1
        if not self._sending and self._alone():
            due += 1
        wake = min(due - self._waking, len(self._idle))
        if wake > 0:
            self._waking += wake
            self._stats.wakes += wake
            for _ in range(wake):
                self._idle.popleft().release()

    def _undefer(self) -> None:
        """The claimer's job has been `CLAIM_GRACE_SECONDS` in its child (or waits for
        something): wake a thread to claim next if that is due (see `_claim_turn`)."""
        if self._deferred:
            with self._lock:
                self._deferred = False
                self._wake_others()

    def _claimed(self) -> None:
        """(Under `_lock`.) The claim is no longer in flight."""
        self._claiming = False
        self._polling = False

    def _claim_turn(self, turn: _ClaimTurn) -> ClaimedJob | None:
        """Claim up to `turn.free` jobs, carrying `turn.riding` completions; queue the
        jobs and return the first for this thread to run (None: none, or the claims
        ended)."""
        free, riding = turn.free, turn.riding
        sent = time.monotonic()
        try:
            answer = self._claim(turn)
            self._abort(answer.abort)
        except BaseException as exc:
            with self._lock:
                self._claimed()
                self._free += free
            self._unsent(riding)
            if not self.stopping.is_set():
                if isinstance(exc, Revoked):
                    log.error("the coordinator refused this worker: %s", exc)
                elif isinstance(exc, Exception):
                    log.error("claims failed; stopping", exc_info=exc)
                    self._failure = exc
                else:
                    self._failure = exc
            self.stopping.set()
            self._wake_all()
            return None
        jobs = answer.jobs
        mine: ClaimedJob | None = None
        with self._lock:
            self._tally()
            self._claimed()
            self._free += free - len(jobs)
            for job in jobs:
                self._running[job.id] = _Running(job, arrived=self._tallied)
            stats = self._stats
            stats.claims += 1
            if not turn.poll:
                took = time.monotonic() - sent
                stats.quick_claims += 1
                stats.quick_claim_s += took
                self._claim_seconds = _average(self._claim_seconds, took)
                self._reach()
            stats.claimed += len(jobs)
            stats.empty_claims += not jobs
            self._queue.extend(jobs)
            if self._queue and self._active < self.config.slots:
                self._active += 1
                stats.jobs += 1
                mine = self._queue.popleft()
                # No thread claims next until this job has been CLAIM_GRACE_SECONDS in
                # its child (`_undefer`) or has ended: a quick one's completion rides
                # that claim (which would take the interpreter lock from it meanwhile).
                self._deferred = True
            self._wake_others()
        if riding:
            self._receipts(riding, answer, sent)
        return mine

    def _claim(self, turn: _ClaimTurn) -> ClaimResponse:
        """One claim of up to `turn.free` jobs, carrying the heartbeat and the riding
        completions; it long-polls only if `turn.poll` (with completions its answer is
        their receipt)."""
        done = [c.completion for c in turn.riding]

        def post() -> LinkResponse | httpx.Response:
            self._last_beat = time.monotonic()
            warm = self.sandbox.warm_models()[: placement.MAX_WARM]
            if warm:
                log.debug("claiming with %d warm models", len(warm))
            body: dict[str, Any] = {
                "max_jobs": turn.free,
                "wait": self.config.claim_wait if turn.poll else 0,
                "running": self._held_json(),
                "warm_models": warm,
            }
            if done:
                body["completions"] = done
            # (pydantic's serialiser writes the completions as they are, inline outputs
            # included, with no copy of them as dicts first.)
            content = to_json(body)
            return self.claims.post(self._path("/claim"), content, self._auth())

        response = self._call("claim", post, until=self.stopping)
        return ClaimResponse.model_validate_json(response.content)

    def _receipts(self, riding: list[_Completion], answer: ClaimResponse, sent: float) -> None:
        """The answer to completions that rode a claim (sent at `sent`): their jobs end
        here, unless the coordinator did not take them (no `results`): then they go alone."""
        if [r.job_id for r in answer.results] != [c.completion.job_id for c in riding]:
            log.warning("the coordinator did not take completions with a claim; sending alone")
            self._fold = False
            self._unsent(riding)
            return
        self._report(answer.results)
        answered = time.monotonic()
        with self._lock:
            self._stats.riding += len(riding)
            self._stats.ride_wait_s += sum(sent - c.at for c in riding)
            self._stats.ride_flight_s += (answered - sent) * len(riding)
        for c in riding:
            self._end(c.completion.job_id)

    def _unsent(self, riding: list[_Completion]) -> None:
        """Completions a claim did not deliver: back to the front, to go alone."""
        for c in riding:
            c.resent = True
        if riding:
            with self._lock:
                self._pending[:0] = riding
                self._wake_others()

    def _held(self) -> list[RunningJob]:
        """The heartbeat: every job this worker holds (running or prefetched), but for
        those whose completions are handed (see `_held_json`: one may wait in a claim's
        long-poll for its receipt, committed already)."""
        with self._lock:
            return [
                RunningJob(job_id=r.claimed.id, lease_id=r.claimed.lease_id, progress=r.progress)
                for r in self._running.values()
                if not r.handed
            ]

    def _held_json(self) -> list[dict[str, Any]]:
        """`_held()` as its JSON (built directly: a claim carries it every time), but for
        the jobs whose completions are handed: they ride this claim or a batch sent
        alone meanwhile (which may end them first: the coordinator would then say to
        abort them), or go next."""
        with self._lock:
            return [
                {
                    "job_id": r.claimed.id,
                    "lease_id": r.claimed.lease_id,
                    "progress": {"fraction": r.progress.fraction, "message": r.progress.message},
                }
                for r in self._running.values()
                if not r.handed
            ]

    def _abort(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            with self._lock:
                r = self._running.get(job_id)
            if r is not None:
                log.info("stopping job %s: cancelled or lease lost", job_id[:12])
                r.cancel.set()

    def _heartbeat_loop(self) -> None:
        assert self.registration is not None
        interval = self.registration.heartbeat_seconds
        while not self.finished.wait(interval / 2):
            if time.monotonic() - self._last_beat < interval * 0.75:
                continue  # a claim carried it (or this thread did, half an interval ago)
            running = self._held()
            if not running and not self.stopping.is_set():
                continue  # idle: the long-polling claims keep this worker live
            self._last_beat = time.monotonic()
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
            self._abort(HeartbeatResponse.model_validate(response.json()).abort)

    def _abort_all(self) -> None:
        with self._lock:
            for r in self._running.values():
                r.cancel.set()

    # -- one job ------------------------------------------------------------

    def _execute(self, job: ClaimedJob) -> None:
        """Run a job this thread took (`_active` counts it until this returns)."""
        state = self._running[job.id]
        began = time.monotonic()
        if job.confidential is not None or any(f.name not in job.inline_inputs for f in job.inputs):
            self._undefer()  # it starts after downloads: the next claim does not wait
        try:
            try:
                # A confidential job's inputs are never kept (nor given to a process it
                # shares).
                folder = self._take_folder("" if job.confidential is not None else job.owner_key)
            except OSError:  # (its worker's folder removed under it, a full disk, ...)
                # It ends here unrun: out of the heartbeat, its lease expires and the
                # coordinator queues it again; this thread and its slot go on.
                log.exception("job %s: no folder for it; its lease will expire", job.id[:12])
                self._end(job.id)
                return
            try:
                self._execute_in(job, folder)
            except Revoked:
                folder.known = False
            except Exception:
                folder.known = False
                log.exception("job %s: worker-side failure; its lease will expire", job.id[:12])
            finally:
                # Nothing of the folder is read once the job's completion is handed (its
                # outputs are inline in it or uploaded): the next job may have it.
                self._give_back(folder)
                if not state.handed:  # else whoever sends the completion ends it
                    self._end(job.id)
        finally:
            with self._lock:  # this thread looks for its next turn (a claim) itself
                self._deferred = False
                self._tally()
                self._active -= 1
                self._job_seconds = _average(self._job_seconds, time.monotonic() - began)

    def _take_folder(self, owner: str = "") -> _Folder:
        """A job folder no job uses: one given back (first one whose inputs were kept for
        `owner`), else a new one. In the worker's own folder (0700, only this process
        writes there): a name of its own is enough, no random one to look for. With a uid
        per job it is made traversable (o+x, what `isolation_files.grant_files` would add
        for each job): a job reaches its own inputs and outputs by path and lists nothing.

        Inputs kept for another owner are unlinked before the folder is handed on: a file
        a job of theirs may still hold open (or linked while it was theirs) is never
        written with this job's input; only their own next job's input is written into
        the same file (`_write_input`)."""
        folder: _Folder | None = None
        with self._folders_lock:
            if owner:
                for n in range(len(self._folders) - 1, -1, -1):  # most recent first
                    if self._folders[n].owner == owner and self._folders[n].kept:
                        folder = self._folders[n]
                        del self._folders[n]
                        break
            if folder is None and self._folders:
                folder = self._folders.pop()
        if folder is not None and folder.kept and folder.owner != owner:
            try:
                for name in folder.kept:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder.inputs, name))
            except OSError:
                shutil.rmtree(folder.path, ignore_errors=True)
                folder = None
            else:
                folder.kept = set()
        if folder is None:
            path = os.path.join(self._workdir, f"job-{next(self._folder_names)}")
            os.mkdir(path, 0o711 if self.sandbox.own_uid else 0o700)
            folder = _Folder(path, Path(path, "inputs"), Path(path, "outputs"))
            os.mkdir(folder.outputs, 0o700)
        folder.owner = owner
        return folder

    def _give_back(self, folder: _Folder) -> None:
        """A job's folder, emptied for the next: the files the job left are known by name
        (its inputs as written here, its outputs as the sandbox took them back, which
        leaves nothing else in `outputs/`); a folder whose content is not known, or that
        fails to empty, is removed instead. Inputs of an owner's job stay (root's, as the
        sandbox took them back) for that owner's next job: written over in place, a file
        made anew costs more than the write (ext4 looks for a free inode)."""
        files, folder.files = folder.files, []
        if not self.sandbox.own_uid:
            folder.known = False  # the job could write anywhere in it (module docstring)
        if folder.known:
            try:
                for path in files:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            except OSError:
                folder.known = False
        if folder.known:
            with self._folders_lock:
                self._folders.append(folder)
        else:
            shutil.rmtree(folder.path, ignore_errors=True)

    def _end(self, job_id: str) -> None:
        """The job is over here: its slot is free, it leaves the heartbeat."""
        with self._lock:
            state = self._running.pop(job_id, None)
            if state is None or not state.freed:
                self._free += 1
            self._ended.notify_all()

    def _wait_sent(self) -> None:
        """(Once no slot thread is left.) Until every job has ended here (its completion
        sent), or the worker stops talking (`finished`: abandoned)."""
        with self._lock:
            while self._running and not self.finished.is_set():
                self._ended.wait(0.5)

    def _execute_in(self, job: ClaimedJob, folder: _Folder) -> None:
        state = self._running[job.id]
        if job.inputs and not folder.has_inputs:
            os.mkdir(folder.inputs, 0o700)
            folder.has_inputs = True
        inputs_dir, outputs_dir = folder.inputs, folder.outputs
        names = [f.name for f in job.inputs]
        for name in folder.kept.difference(names):  # an earlier job's, not this one's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(inputs_dir, name))
        if folder.owner and self.sandbox.own_uid:
            folder.kept = set(names)  # written over by the owner's next job
        else:
            folder.kept = set()
            folder.files.extend(os.path.join(inputs_dir, name) for name in names)
        if job.confidential is not None:
            self._execute_confidential(job, state, folder, inputs_dir, outputs_dir)
            return
        inputs = {f.name: self._input(job, f, inputs_dir / f.name) for f in job.inputs}
        outcome = self._run(job, state, job.params, inputs, outputs_dir)
        _left(folder, outcome)
        if outcome.cancelled:
            return
        inline: list[InlineOutput] = []
        if not outcome.ok:
            self._complete(
                job,
                BatchedCompletion(
                    job_id=job.id,
                    lease_id=job.lease_id,
                    state="failed",
                    error=outcome.error,
                    inline_outputs=inline,
                ),
            )
            return
        room = INLINE_OUTPUT_BYTES
        for path in self._outputs(job, outputs_dir, outcome):
            size = path.stat().st_size
            if size <= min(self._inline_output, room) and len(inline) < MAX_INLINE_OUTPUTS:
                inline.append(
                    InlineOutput(name=path.name, content=base64_text.encode(path.read_bytes()))
                )
                room -= size
            else:
                self._upload(job, path)
        self._complete(
            job,
            BatchedCompletion(
                job_id=job.id,
                lease_id=job.lease_id,
                state="succeeded",
                result=outcome.result,
                inline_outputs=inline,
            ),
        )

    def _input(self, job: ClaimedJob, info: FileInfo, target: Path) -> Path:
        """An input: from the claim when it came inline (checked against its digest),
        else downloaded."""
        inline = job.inline_inputs.get(info.name)
        if inline is not None:
            try:  # pydantic-core's decoder: ~4x binascii's (`csml.schemas.base64_text`)
                data: bytes | None = base64_text.decode(inline)
            except ValueError:
                data = None  # not canonical base64: downloaded, as a digest mismatch is
            if (
                data is not None
                and len(data) == info.size
                and hashlib.sha256(data).hexdigest() == info.sha256
            ):
                _write_input(target, data)
                return target
            log.warning("job %s: inline input %r does not match its digest", job.id[:12], info.name)
        return self._download(job, info.name, target)

    def _run(
        self,
        job: ClaimedJob,
        state: _Running,
        params: dict[str, Any],
        inputs: dict[str, Path],
        outputs_dir: Path,
        *,
        confidential: bool = False,
    ) -> Outcome:
        sandbox_job = SandboxJob(
            operation=job.operation,
            params=params,
            inputs=inputs,
            output_dir=outputs_dir,
            timeout_seconds=job.limits.timeout_seconds,
            memory_mb=job.limits.memory_mb,
            cpu_seconds=job.limits.cpu_seconds,
            cancel=state.cancel,
        )

        def progress(fraction: float, message: str) -> None:
            # A confidential job's progress messages could tell about its data: only the
            # fraction goes to the coordinator.
            state.progress = Progress(fraction=fraction, message="" if confidential else message)

        # One owner's consecutive jobs share a sandboxed process; a confidential job gets
        # one of its own (nothing of it stays in memory for a later job to find).
        owner = "" if confidential else job.owner_key
        return self.sandbox.run(
            sandbox_job,
            progress,
            owner=owner,
            warm=self._warm_key(job, owner),
            on_started=self._undefer,
            started_grace=CLAIM_GRACE_SECONDS,
        )

    def _warm_key(self, job: ClaimedJob, owner: str) -> str:
        """What the job leaves warm in its owner's process: its model input, if its
        operation keeps models loaded (`keeps_model`)."""
        op = self.app.operations.get(job.operation)
        if not owner or op is None or not op.keeps_model:
            return ""
        spec = op.model_input()
        model = next((f for f in job.inputs if spec is not None and f.name == spec.name), None)
        return placement.warm_key(owner, model.sha256) if model is not None else ""

    def _outputs(self, job: ClaimedJob, outputs_dir: Path, outcome: Outcome) -> list[Path]:
        """The declared outputs the job wrote: regular files, as the sandbox found them
        when it took the folder back (else as listed now)."""
        declared = {o.name for o in self.app.operations[job.operation].outputs}
        if outcome.outputs is not None:
            return [outputs_dir / name for name in sorted(outcome.outputs) if name in declared]
        return [p for p in sorted(outputs_dir.iterdir()) if p.name in declared and p.is_file()]

    # -- confidential jobs --------------------------------------------------

    def _open_job(self, job: ClaimedJob) -> _Secret:
        """Unwrap the job key and open the params; check they are what the client sent."""
        conf = job.confidential
        assert conf is not None
        try:
            nonce = b64d(conf.job_nonce, "job_nonce", 32)
            data_key = unwrap_key(b64d(conf.wrapped_key, "wrapped_key"), self._key)
            manifest = open_manifest(data_key, nonce, b64d(conf.encrypted_params, "params"))
            forwarded_key = b64d(conf.result_public_key, "result_public_key", 32)
        except (DecryptionError, ValueError) as exc:
            raise Refused(str(exc)) from None
        if (manifest.app, manifest.operation) != (self.config.app, job.operation):
            raise Refused(
                f"the client encrypted this job for {manifest.app}.{manifest.operation}, "
                f"not {self.config.app}.{job.operation}"
            )
        if forwarded_key != manifest.result_public_key:
            raise Refused("the result key forwarded with the job is not the client's")
        names = sorted(f.name for f in job.inputs)
        if names != sorted(manifest.inputs):
            raise Refused(
                f"the inputs forwarded ({', '.join(names) or 'none'}) are not those the client "
                f"encrypted ({', '.join(manifest.inputs) or 'none'})"
            )
        return _Secret(data_key, nonce, manifest)

    def _execute_confidential(
        self, job: ClaimedJob, state: _Running, folder: _Folder, inputs_dir: Path, outputs_dir: Path
    ) -> None:
        try:
            secret = self._open_job(job)
        except Refused as exc:
            log.warning("job %s: confidential job refused: %s", job.id[:12], exc)
            self._complete(
                job,
                BatchedCompletion(
                    job_id=job.id,
                    lease_id=job.lease_id,
                    state="failed",
                    error=f"refused by the worker: {exc}",
                ),
            )
            return
        assert self.registration is not None
        result_key = new_data_key()
        worker_id = self.registration.worker_id

        def finish(payload: ResultPayload) -> None:
            sealed = seal_result(
                payload,
                result_key=result_key,
                worker_id=worker_id,
                worker_key=self._key,
                client_public_key=secret.manifest.result_public_key,
                job_nonce=secret.nonce,
            )
            failed = payload.state != "succeeded"
            self._complete(
                job,
                BatchedCompletion(
                    job_id=job.id,
                    lease_id=job.lease_id,
                    state="failed" if failed else "succeeded",
                    error=ENCRYPTED_ERROR if failed else None,
                    encrypted_result=sealed,
                ),
            )

        try:
            self.app.operations[job.operation].params_model.model_validate(secret.manifest.params)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            finish(ResultPayload("failed", error=f"params.{where}: {err['msg']}"))
            return
        try:
            inputs = {
                f.name: self._download(job, f.name, inputs_dir / f.name, secret) for f in job.inputs
            }
        except DecryptionError as exc:
            log.warning("job %s: an input failed to decrypt", job.id[:12])
            finish(ResultPayload("failed", error=f"refused by the worker: {exc}"))
            return
        outcome = self._run(
            job, state, secret.manifest.params, inputs, outputs_dir, confidential=True
        )
        _left(folder, outcome)
        if outcome.cancelled:
            return
        if not outcome.ok:
            finish(ResultPayload("failed", error=(outcome.error or "failed")[:4000]))
            return
        outputs: dict[str, dict[str, Any]] = {}
        for path in self._outputs(job, outputs_dir, outcome):
            outputs[path.name] = {"size": path.stat().st_size}
            self._upload(job, path, result_key, secret.nonce)
        finish(ResultPayload("succeeded", result=outcome.result, outputs=outputs))

    def _complete(self, job: ClaimedJob, completion: BatchedCompletion) -> None:
        """Hand the completion over: the next claim carries it, or it goes alone (see
        `_next_turn`), and whoever sends it ends the job once the coordinator answered
        (nothing of the job's folder is read after this: outputs are inline in the
        completion or already uploaded). Folding, its slot is free at once."""
        state = self._running[job.id]
        pending = _Completion(completion)
        state.handed = True
        with self._lock:
            self._pending.append(pending)
            if self._fold:
                state.freed = True
                self._free += 1

    def _take_batch(self) -> list[_Completion]:
        """(Under `_lock`.) The first pending completions, up to a batch's count and bytes."""
        batch: list[_Completion] = []
        size = 0
        while (
            self._pending
            and len(batch) < MAX_COMPLETION_BATCH
            and (not batch or size < COMPLETION_BATCH_BYTES)
        ):
            batch.append(self._pending.pop(0))
            size += _inline_size(batch[-1])
        return batch

    def _alone(self) -> bool:
        """(Under `_lock`.) Whether pending completions must go alone now: no claim will
        carry them soon (the one in flight long-polls, the worker stops claiming, or the
        coordinator does not take completions with claims). One in flight that carries
        completions answers at once, and the next one carries these."""
        return bool(self._pending) and (not self._fold or self._polling or self.stopping.is_set())

    def _send_alone(self, batch: list[_Completion]) -> None:
        """Send a batch taken by `_next_turn`, end its jobs, give the link back."""
        answered = 0.0
        try:
            self._send_completions(batch)
            answered = time.monotonic()
        except Revoked:
            pass  # stopping, or refused: the leases say what becomes of these jobs
        except Exception:
            for c in batch:
                log.exception(
                    "job %s: worker-side failure; its lease will expire",
                    c.completion.job_id[:12],
                )
        finally:
            with self._lock:
                self._sending = False
                self._stats.alone += len(batch)
                self._stats.alone_batches += 1
                if answered:
                    self._stats.alone_s += sum(answered - c.at for c in batch)
        for c in batch:
            self._end(c.completion.job_id)

    def _send_completions(self, batch: list[_Completion]) -> None:
        content = CompletionBatch(completions=[c.completion for c in batch]).model_dump_json()
        response = self._call(
            "complete",
            lambda: self._sender.post(self._path("/complete"), content.encode(), self._auth()),
        )
        if response.is_error:
            log.error("completions refused: %s", response.text[:200])
            return
        resent = {c.completion.job_id for c in batch if c.resent}
        self._report(CompletionResults.model_validate_json(response.content).results, resent)

    @staticmethod
    def _report(results: list[CompletionOutcome], resent: set[str] | None = None) -> None:
        """Log what the coordinator refused; `resent`: jobs whose completion rode a claim
        that failed (a 409 may say it kept that one)."""
        for outcome in results:
            if outcome.status == 409 and resent and outcome.job_id in resent:
                log.info(
                    "job %s: completion sent again after its claim failed: refused (409: "
                    "kept from that claim, or its lease was lost)",
                    outcome.job_id[:12],
                )
            elif outcome.status == 409:
                log.info(
                    "job %s: lease lost before completion; result dropped", outcome.job_id[:12]
                )
            elif outcome.status >= 300:
                log.error(
                    "job %s: completion refused: %s", outcome.job_id[:12], outcome.error[:200]
                )

    def _download(
        self, job: ClaimedJob, name: str, target: Path, secret: _Secret | None = None
    ) -> Path:
        """Fetch an input; a confidential job's is decrypted (and authenticated) as it comes."""

        def fetch() -> httpx.Response:
            with self.http.stream(
                "GET",
                self._path(f"/jobs/{job.id}/inputs/{name}"),
                params={"lease_id": job.lease_id},
                headers=self._auth(),
            ) as response:
                if response.status_code == 200:
                    decryptor = (
                        StreamDecryptor(
                            secret.data_key,
                            associated_data("input", secret.nonce, name),
                            f"input {name!r}",
                        )
                        if secret is not None
                        else None
                    )
                    with open(target, "wb") as out:
                        for chunk in response.iter_bytes(1 << 20):
                            out.write(chunk if decryptor is None else decryptor.feed(chunk))
                        if decryptor is not None:
                            out.write(decryptor.finish())
                else:
                    response.read()
                return response

        response = self._call(f"download {name}", fetch)
        response.raise_for_status()
        return target

    def _upload(
        self,
        job: ClaimedJob,
        path: Path,
        result_key: bytes | None = None,
        nonce: bytes = b"",
    ) -> None:
        """Stream an output up; with `result_key`, encrypted to the client as it goes."""
        media = next(
            o.media_type for o in self.app.operations[job.operation].outputs if o.name == path.name
        )

        def put() -> httpx.Response:
            with open(path, "rb") as body:
                content = (
                    _chunks(body)
                    if result_key is None
                    else encrypt_iter(body, result_key, associated_data("output", nonce, path.name))
                )
                return self.http.put(
                    self._path(f"/jobs/{job.id}/outputs/{path.name}"),
                    params={"lease_id": job.lease_id},
                    content=content,
                    headers={**self._auth(), "Content-Type": media},
                )

        response = self._call(f"upload {path.name}", put)
        response.raise_for_status()


def _average(mean: float, sample: float) -> float:
    """A moving average (the last ~5 samples weigh most); the first sample as it is."""
    return sample if mean <= 0 else mean + 0.2 * (sample - mean)


def _left(folder: _Folder, outcome: Outcome) -> None:
    """Note what a job run in `folder` left in its `outputs/`: what the sandbox took back
    (nothing else is left there); not known if the sandbox did not take it back."""
    if outcome.outputs is None:
        folder.known = False
    else:
        folder.files.extend(os.path.join(folder.outputs, name) for name in outcome.outputs)


def _write_input(target: Path, data: bytes) -> None:
    """Write an input file: over the one an earlier job of the same owner left (`_Folder
    .kept`: root's again, in root's 0700 `inputs/`), else a new one."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _chunks(body: Any, size: int = 1 << 20) -> Any:
    while chunk := body.read(size):
        yield chunk
