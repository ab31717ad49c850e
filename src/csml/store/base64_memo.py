"""The base64 text of small files just received, kept in memory for their first reader.

An inline input arrives in a batch submission as base64 text and leaves in a claim as
base64 again; an inline output arrives in a completion as base64 and leaves on the owner's
result stream as base64 again. In between the bytes are stored (in the database, or a file
when over `db_blob_max_bytes`: `csml.store.blobs`), and without this memo the second leg
reads them and encodes them once more (about 90 CPU-µs for 64 KB here). A small form
part of a single submission, kept in the database, is encoded once when its job is
accepted and put here too, so its claim reads nothing (no `SELECT` of its bytes).
`Base64Memo` keeps the text it arrived as, under the digest of the bytes it decodes to,
until the first reader takes it.

Invariants:
- An entry is keyed by the sha256 and size of the bytes its text decodes to, and is put
  only once that text has decoded to exactly those bytes (`csml.schemas.base64_text`:
  canonical standard base64, so one text per content). Whatever job asks for a file of
  that digest and size gets the text of exactly its bytes.
- Each put is handed out once: an entry counts its puts (files of equal bytes share one
  text) and `take` removes it after as many takes. A reader beyond them (a claim after a
  lost lease, a second result stream) reads the file, as every reader did before.
- Bounded: at most `max_chars` characters in all (one byte each: base64 is ASCII); the
  oldest entries are dropped first, so a text nobody takes (a cancelled job's) only waits
  to be pushed out.
- `clear()` drops everything: an identity's erasure calls it, so no erased bytes stay in
  memory past their files.
- One lock: submissions (thread pool), claims and result streams (event loop) share it.
- Nothing here is durable or needed: a miss costs the read it saves, nothing else.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

MAX_CHARS = 16 << 20  # ~16 MB of text: (c)'s photos in flight are ~64 KB each


class Base64Memo:
    """Base64 text by (sha256, size) of its bytes, each put taken once, bounded in size."""

    def __init__(self, max_chars: int = MAX_CHARS) -> None:
        self.max_chars = max_chars
        # key -> (text, how many puts not yet taken): one text for files of equal bytes
        self._texts: OrderedDict[tuple[str, int], tuple[str, int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def put(self, sha256: str, size: int, text: str) -> None:
        """Keep `text`, the canonical base64 of bytes of this digest and size, for one
        more reader."""
        if len(text) > self.max_chars:
            return
        key = (sha256, size)
        with self._lock:
            kept = self._texts.pop(key, None)
            if kept is not None:
                self._texts[key] = (kept[0], kept[1] + 1)  # now the newest
                return
            self._texts[key] = (text, 1)
            self._chars += len(text)
            while self._chars > self.max_chars:
                _, (dropped, _) = self._texts.popitem(last=False)
                self._chars -= len(dropped)

    def take(self, sha256: str, size: int) -> str | None:
        """The text kept for bytes of this digest and size, or None; forgotten once
        taken as many times as it was put."""
        key = (sha256, size)
        with self._lock:
            kept = self._texts.get(key)
            if kept is None:
                return None
            text, readers = kept
            if readers > 1:
                self._texts[key] = (text, readers - 1)
            else:
                del self._texts[key]
                self._chars -= len(text)
            return text

    def clear(self) -> None:
        with self._lock:
            self._texts.clear()
            self._chars = 0

    def __len__(self) -> int:
        return len(self._texts)
