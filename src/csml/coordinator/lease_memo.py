"""The leases this coordinator granted, extended or read, so that a heartbeat riding on a
claim needs no read of them when it is not due (`JobQueue._beat_due`).

Every claim of a busy worker carries the heartbeat of the jobs it holds; deciding whether
that heartbeat must be written (a lease near its end, a progress change) and whether a
job is gone (ended, cancelled, lost: the worker must abort it) took a read of the leases
per claim. Most of those leases were granted or extended by this coordinator moments
before, so it remembers them here and reads only what it does not know.

Invariants:
- An entry (job id -> worker, lease id, expiry, progress as stored) comes from a
  committed write of this coordinator (a claim's take, a heartbeat's extension) or from
  a read of the store, and is recorded only if no change of that job was announced since
  before that write or read began (`epoch()`, taken before it; `record(..., since)`). So
  an entry never predates a change that this coordinator heard of.
- Every change that ends or moves a lease (completion, cancel, reap, requeue, pipeline
  cancel, erasure) is announced with the key `job:<id>` after its commit, here and,
  through the PostgreSQL relay, on the other coordinators, except a completion's, which
  the relay carries only to the coordinators following the job's owner (see
  `csml.coordinator.notify`): a completion comes from the lease's holder, which beats
  that job no more, so another coordinator's entry for it is never asked for again (it
  stays until the bound below, a hint nobody reads). The notifier calls this memo
  at once, in the announcing thread (`Notifier.watch`), and the job's entry goes. When
  notifications may have been lost (the relay's None) every entry goes, and while the
  relay is not listening the memo answers nothing (`Notifier.reliable`).
- An entry is a hint, as the read it replaces was (the heartbeat's write checks the
  lease again): a stale one can only delay an abort to the worker's next due heartbeat
  (its completion is then refused, 409: exactly one result is kept). Another
  coordinator's extension makes an entry's expiry older than the stored one: a
  heartbeat is then written sooner than needed, never later.
- Bounded: past `MAX_ENTRIES` jobs, or `MAX_DROPPED` remembered drops, it forgets
  everything (and refuses records begun before that).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

from csml.coordinator.notify import Notifier, job_key

MAX_ENTRIES = 50_000
MAX_DROPPED = 50_000
JOB_PREFIX = job_key("")


@dataclass(frozen=True, slots=True)
class Known:
    """A lease as this coordinator last knew it stored."""

    worker_id: str
    lease_id: str
    expires_at: datetime
    progress_fraction: float
    progress_message: str


class LeaseMemo:
    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._lock = threading.Lock()
        self._known: dict[str, Known] = {}
        self._epoch = 0  # one more per drop
        self._dropped: dict[str, int] = {}  # job id -> epoch of its last drop
        self._floor = 0  # records begun before this epoch are refused (all dropped then)
        notifier.watch(JOB_PREFIX, self._drop)

    def epoch(self) -> int:
        """Take before the write or read whose leases will be recorded."""
        return self._epoch

    def get(self, job_id: str) -> Known | None:
        if not self._notifier.reliable:
            return None
        return self._known.get(job_id)

    def record(self, job_id: str, known: Known, since: int) -> None:
        """Remember `job_id`'s lease, as committed or read by an operation begun at epoch
        `since`, unless the job changed (or everything was dropped) since then."""
        with self._lock:
            if since < self._floor or self._dropped.get(job_id, -1) >= since:
                return
            if len(self._known) >= MAX_ENTRIES:
                self._forget_all()
                return
            self._known[job_id] = known

    def _drop(self, key: str | None) -> None:
        with self._lock:
            if key is None:
                self._forget_all()
                return
            job_id = key[len(JOB_PREFIX) :]
            self._dropped[job_id] = self._epoch
            self._epoch += 1
            self._known.pop(job_id, None)
            if len(self._dropped) > MAX_DROPPED:
                self._forget_all()

    def _forget_all(self) -> None:
        self._known.clear()
        self._dropped.clear()
        self._epoch += 1
        self._floor = self._epoch
