"""Identity tokens -> identities, remembered briefly so a request needs no query for it.

Invariants:
- Only a token that matched an identity is remembered (an unknown token is looked up
  every time and never fills the cache), at most `MAX_ENTRIES` of them, each for at
  most `TTL_SECONDS`; the hash of the token is the key, never the token.
- An erased identity stops working at once on this coordinator: `erased(id)` drops its
  entries and keeps a tombstone for `TTL_SECONDS`, so a look-up that raced the erasure
  cannot put it back.
- Other coordinators learn of the erasure through the notifier's PostgreSQL relay (key
  `erased:<id>`) within milliseconds; if the relay lost notifications (its LISTEN
  connection dropped) the whole cache is emptied. Without a relay (SQLite: one
  coordinator) or while it is down, a stale entry lives at most `TTL_SECONDS`.
- Safe from any thread (the event loop, the thread pool, the relay).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime

from csml.coordinator.notify import Notifier
from csml.store.identities import IdentityRow

TTL_SECONDS = 5.0
MAX_ENTRIES = 10_000
ERASED_PREFIX = "erased:"


@dataclass(frozen=True)
class _Entry:
    identity_id: str
    created_at: datetime
    expires: float


class IdentityCache:
    def __init__(self, notifier: Notifier | None = None, ttl: float = TTL_SECONDS) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._by_hash: dict[str, _Entry] = {}
        self._tombstones: dict[str, float] = {}  # erased identity id -> until
        self._notifier = notifier
        if notifier is not None:
            notifier.listen(ERASED_PREFIX, self._on_key)

    def get(self, token_hash: str) -> IdentityRow | None:
        """The identity of this token hash if remembered and live (a frozen row)."""
        now = time.monotonic()
        with self._lock:
            entry = self._by_hash.get(token_hash)
            if entry is None:
                return None
            if entry.expires <= now or entry.identity_id in self._tombstones:
                del self._by_hash[token_hash]
                return None
        return IdentityRow(id=entry.identity_id, token_hash=token_hash, created_at=entry.created_at)

    def put(self, identity: IdentityRow) -> None:
        now = time.monotonic()
        with self._lock:
            until = self._tombstones.get(identity.id)
            if until is not None:
                if until > now:
                    return  # erased while it was being looked up
                del self._tombstones[identity.id]
            if len(self._by_hash) >= MAX_ENTRIES:
                self._prune(now)
            self._by_hash[identity.token_hash] = _Entry(
                identity.id, identity.created_at, now + self.ttl
            )

    def erased(self, identity_id: str) -> None:
        """Forget `identity_id` here at once, and on the other coordinators (relay)."""
        self._forget(identity_id)
        if self._notifier is not None:
            self._notifier.notify(ERASED_PREFIX + identity_id)

    def clear(self) -> None:
        with self._lock:
            self._by_hash.clear()

    def __len__(self) -> int:
        return len(self._by_hash)

    def _forget(self, identity_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._tombstones[identity_id] = now + self.ttl
            for h in [h for h, e in self._by_hash.items() if e.identity_id == identity_id]:
                del self._by_hash[h]
            if len(self._tombstones) > MAX_ENTRIES:
                self._tombstones = {i: t for i, t in self._tombstones.items() if t > now}

    def _on_key(self, key: str | None) -> None:
        if key is None:
            self.clear()  # notifications may have been lost
        else:
            self._forget(key.removeprefix(ERASED_PREFIX))

    def _prune(self, now: float) -> None:
        """Drop expired entries; if still full, the oldest half (caller holds the lock)."""
        self._by_hash = {h: e for h, e in self._by_hash.items() if e.expires > now}
        if len(self._by_hash) >= MAX_ENTRIES:
            keep = list(self._by_hash.items())[len(self._by_hash) // 2 :]
            self._by_hash = dict(keep)
