"""Credit: identities earn it with their contributed workers and spend it as priority.

The ledger and the amounts are the store's (`csml.store.credit`: the rule, `earn`,
`spend`); this module decides which claims may take a credited job ahead of plain
round-robin, and reads balances, history and totals for the routes.

Invariants:

- **The bound.** Of every `n` consecutive jobs this coordinator hands out for an app, at
  most `k` are taken by credit out of order (`CSML_CREDIT_PRIORITY_K` of
  `CSML_CREDIT_PRIORITY_N`, 1 of 2 by default; `k < n`): plain round-robin keeps at least
  (n-k)/n of them, so no identity without credit starves. A job is taken out of order
  when a job of an identity without credit waits in an earlier round (a lower fair rank)
  of the app; only those runs are debited (`jobs.credit_lease`). Kept per app in a
  window of the last n-1 hand-outs, filled greedily (`plan`): a position may go to
  credit when the n-1 before it hold fewer than k that did. Positions a claim planned
  for credit but did not use are dropped, and a credited job taken in order counts as a
  plain one: either only lowers counts, so the bound holds for what was handed out.
- **Within credit**, jobs go in fair rank order (the store's credited head).
- **Cheap when unused.** Whether any identity has a positive balance is read at most
  once per `GATE_SECONDS` per coordinator, outside the claim's transaction; with none, a
  claim is exactly the plain claim (no lock, no window, no statement more). An app whose
  credited take found nothing is left to plain claims until the next read. An earning
  that lifts a balance above zero on this coordinator makes the next claim read again.
- A claim through credit holds its app's lock (a `threading.Lock`) across its takes,
  so concurrent claims (PostgreSQL's writer lanes) see one window. The takes skip
  locked rows and never wait in the store, so the lock is never held across a wait.
- Per coordinator: several coordinators each keep the bound for what they hand out, so
  over all of them credit takes at most about k/n of an app's jobs too, but two
  coordinators' credited claims may come back to back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from csml.refusals import Invalid
from csml.store import credit as ledger
from csml.store.jobs_write import Claimed

GATE_SECONDS = 1.0
"""How long a coordinator trusts its last read of "some identity has credit"."""
MAX_HISTORY = 200
"""At most this many ledger rows per page of history."""


def plan(
    history: Sequence[bool], k: int, n: int, size: int, plain: int | None = None
) -> list[bool]:
    """Positions for a claim of at most `size` jobs after the app's `history` (oldest
    first; True: taken by credit out of order), greedily: True where credit may take the
    job (the n-1 positions before it hold fewer than k Trues). With `plain`, exactly that
    many plain positions are available and credit gets at most `size - plain`; the plan
    stops where neither fits."""
    max_credit = size if plain is None else size - plain
    max_plain = size if plain is None else plain
    recent = deque(list(history)[-(n - 1) :] if n > 1 else (), maxlen=max(n - 1, 0))
    out: list[bool] = []
    credits = plains = 0
    while len(out) < size:
        if n > 1 and sum(recent) < k and credits < max_credit:
            out.append(True)
            credits += 1
        elif plains < max_plain:
            out.append(False)
            plains += 1
        else:
            break
        if n > 1:
            recent.append(out[-1])
    return out


def realize(planned: Sequence[bool], credited: int, jumped: int) -> list[bool]:
    """What a claim handed out, in the plan's order: of its credit positions, the first
    `jumped` were taken out of order, the next `credited - jumped` in order (plain), the
    rest unused (dropped); its plain positions stay plain."""
    return [p for p, _ in _positions(planned, credited, jumped)]


def _positions(planned: Sequence[bool], credited: int, jumped: int) -> list[tuple[bool, bool]]:
    """(out of order, from the credited take) per handed-out position of the plan."""
    out: list[tuple[bool, bool]] = []
    used = 0
    for position in planned:
        if not position:
            out.append((False, False))
            continue
        if used < credited:
            out.append((used < jumped, True))
        used += 1
    return out


Take = Callable[[int, bool], list[Claimed]]
"""`take(limit, credited)`: the store's claim of at most `limit` jobs (credited: only
jobs of identities with credit), inside the claim's transaction."""


class Priority:
    """One coordinator's credit priority: the gate and a window per app (see above)."""

    def __init__(self, k: int, n: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= k < n:
            raise ValueError(f"credit priority: need 0 <= k < n, got k={k}, n={n}")
        self.k, self.n = k, n
        self._clock = clock
        self._lock = threading.Lock()
        self._apps: dict[str, tuple[threading.Lock, deque[bool]]] = {}
        self._credited = False
        self._gate_until = float("-inf")
        self._idle: set[str] = set()  # apps whose credited take found nothing

    def active(self, app: str, read: Callable[[], bool]) -> bool:
        """Whether a claim of `app` should go through credit now (`read`: whether some
        identity has a positive balance, called at most once per `GATE_SECONDS`)."""
        if self.k == 0:
            return False
        now = self._clock()
        if now >= self._gate_until:
            self._credited = read()
            self._gate_until = now + GATE_SECONDS
            self._idle.clear()
        return self._credited and app not in self._idle

    def touch(self) -> None:
        """A balance went above zero here: read the gate again at the next claim (other
        coordinators see it within `GATE_SECONDS`)."""
        self._gate_until = float("-inf")

    def window(self, app: str) -> tuple[threading.Lock, deque[bool]]:
        with self._lock:
            found = self._apps.get(app)
            if found is None:
                found = (threading.Lock(), deque(maxlen=max(self.n - 1, 1)))
                self._apps[app] = found
            return found

    def claim(self, app: str, size: int, take: Take) -> list[Claimed]:
        """Claim up to `size` jobs of `app` within the bound: the plan's plain positions
        first (the plain head), then its credit positions (the credited head), then plain
        again for what credit did not fill. Returns them in the plan's order, which is
        the order recorded in the window."""
        lock, history = self.window(app)
        with lock:
            first = plan(history, self.k, self.n, size)
            credit_slots = sum(first)
            plain = take(size - credit_slots, False) if size > credit_slots else []
            if credit_slots == 0:
                history.extend([False] * len(plain))
                return plain
            planned = plan(history, self.k, self.n, size, plain=len(plain))
            wanted = sum(planned)
            credited = take(wanted, True) if wanted else []
            if wanted and not credited:
                self._idle.add(app)
            jumped = [t for t in credited if t.by_credit]
            in_order = [t for t in credited if not t.by_credit]
            handed: list[Claimed] = []
            for out_of_order, from_credit in _positions(planned, len(credited), len(jumped)):
                source = (jumped if out_of_order else in_order) if from_credit else plain
                handed.append(source.pop(0))
            if len(credited) < wanted and len(handed) < size:
                handed += take(size - len(handed), False)
            history.extend(t.by_credit for t in handed)
            return handed


# -- what the routes show -------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """An identity's balance and a page of its ledger, newest first."""

    balance: ledger.Balance
    entries: list[ledger.Entry]
    next_before: int | None  # pass as `before` for the next (older) page; None: no more


def statement(
    sessions: sessionmaker[Session], identity_id: str, limit: int, before: int | None
) -> Statement:
    if not 1 <= limit <= MAX_HISTORY:
        raise Invalid(
            "invalid_limit", f"limit: {limit} is not between 1 and {MAX_HISTORY}", field="limit"
        )
    with sessions() as session:
        balance = ledger.balance_of(session, identity_id)
        entries = ledger.history(session, identity_id, limit=limit + 1, before=before)
    more = len(entries) > limit
    entries = entries[:limit]
    return Statement(balance, entries, entries[-1].id if more else None)


def totals(sessions: sessionmaker[Session]) -> ledger.Totals:
    with sessions() as session:
        return ledger.totals(session)


def credits(milli: int) -> float:
    """Milli-credits as credits (for display)."""
    return milli / ledger.MILLI
