"""The worker-token cache: worker token (by its SHA-256) -> the worker, for a short while.

Every worker request is authenticated; looking the token up (a join of workers and
join tokens) was one of the larger costs of a claim. The answer is kept for
`TTL_SECONDS`. The look-up itself is one statement (`csml.store.workers.worker_by_token`)
and the entries are frozen rows, safe to share between threads. Invariants:

- Only a valid answer is kept (a live worker whose join token was not revoked);
  refusals are never cached, so a new worker is accepted at once.
- Leaving (`DELETE /v1/workers/{id}`) and revoking a join token through this
  coordinator's API drop the entries at once (`forget_worker`, `forget_join_token`).
- Elsewhere (another coordinator on the same PostgreSQL, or `csml join-token revoke`
  writing to the database directly) a revoked or departed worker is refused at most
  `TTL_SECONDS` later: the staleness is bounded by the TTL. Its jobs are fenced by
  their leases either way, so a stale entry can claim no job twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from csml.store.workers import WorkerRow

TTL_SECONDS = 2.0
MAX_ENTRIES = 10_000


class WorkerTokenCache:
    def __init__(
        self, ttl: float = TTL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[WorkerRow, float]] = {}

    def get(self, token_hash: str) -> WorkerRow | None:
        with self._lock:
            entry = self._entries.get(token_hash)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._entries[token_hash]
                return None
            return entry[0]

    def put(self, token_hash: str, worker: WorkerRow) -> None:
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                now = self._clock()
                self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries.clear()
            self._entries[token_hash] = (worker, self._clock() + self.ttl)

    def forget_worker(self, worker_id: str) -> None:
        with self._lock:
            self._entries = {k: v for k, v in self._entries.items() if v[0].id != worker_id}

    def forget_join_token(self, join_token_id: str) -> None:
        with self._lock:
            self._entries = {
                k: v for k, v in self._entries.items() if v[0].join_token_id != join_token_id
            }


CACHE = WorkerTokenCache()
"""This process's cache (one coordinator per process; tests with several in-process
coordinators share it, which only makes them forget more often)."""
