"""Verified results from untrusted workers (issue 13, item 3): the state machine.

Who is trusted. An operator worker (its join token has no contributor) is trusted: its
result is accepted as it is. A contributed worker is not (an attested contributed worker
counts as contributed for plain jobs). A confidential job is never replicated nor
spot-checked: it runs only on the workers its client verified and sealed it to, and
their result is accepted (the client's attestation policy is its trust).

Policies (per app, the operator's; `DEFAULT` where none is set):
- `none`: a contributed worker's result is accepted as it is (probation aside).
- `replicate:k` (2 <= k <= 5): the job runs on workers of k different parties (distinct
  contributors; the operator is one party) and is accepted when k counted runs agree;
  on disagreement more runs are made until one digest has k votes and more than any
  other, or, after `k + 2` counted runs without that, only an operator worker may run it
  (a trusted run decides).
- `spot-check:p` (0 < p <= 1): a fraction p of contributed results, drawn when the run
  completes (the worker cannot know which), is re-run on an operator worker, whose
  result decides; the others are accepted as they are.
Under a policy other than `none`, a contributed worker is given only deterministic
operations (`OperationInfo.deterministic`): only those can be compared.

Digest of a run: sha256 of the canonical JSON (sorted keys, no spaces) of {state, result,
error, outputs: sorted [name, sha256]}; the outputs' sha256 are the coordinator's own (it
hashes what it stores). Two runs agree when their digests are equal.

Reputation (per worker): agreements and disagreements with accepted results (of
succeeded runs only: a failed run, or an accepted failure, moves no reputation);
`reputation = agreements - PENALTY x disagreements`. A contributed worker is on
probation while it has fewer than `probation` agreements: every result of its is
verified whatever the policy (at least two parties agree, or an operator run; under
`spot-check` an operator run), and it is given deterministic operations only. A
disagreement that brings the reputation below 0 quarantines the worker: from then on it
claims only jobs being re-checked, its runs are recorded and compared but never count
toward acceptance, and its contributor earns nothing from it. The operator lists and
lifts quarantines (lifting starts its record afresh, on probation).

The job's states, as the claim and the completion see them (`jobs` columns):

    PLAIN      verify_runs = 0                   anyone the claim's filters allow
    CHECKING   verify_runs = n > 0, queued       operator workers; contributed workers of a
                                                 party with no run of it (quarantined too)
    TRUSTED    trusted_only = true               operator workers only
    (running)  one worker holds the lease, as for any job
    ACCEPTED   succeeded or failed: the accepted run's result, outputs and error

    completion of a run C of job J by worker W, inside the writer's transaction with J
    locked (`JobQueue._finish`), after the usual checks (lease, confidential):
      W operator, or J confidential          -> ACCEPT(C)
      W contributed, policy none, W neither on probation nor quarantined -> ACCEPT(C)
      otherwise record C as a pending run (counted unless W is quarantined), then
      `decide(policy, pending runs + C)`:
        ACCEPT    C counts and C's digest has `need` votes of distinct parties and more
                  than any other digest (need: k; none: 2; a non-deterministic operation
                  is never compared: it goes TRUSTED)
        SPOT      spot-check: with probability p (always for a worker on probation) ->
                  TRUSTED, else ACCEPT
        TRUSTED   k + 2 counted runs and no winner -> only an operator run decides
        CHECKING  otherwise: J back in the queue (`store.verification.hold`)
    ACCEPT(C): J ends with C's result (the only result ever written on J), every pending
      run is settled agreed/disagreed against C's digest, reputations change (quarantine
      decided in the same UPDATE), and the single acceptance point `accept` runs the
      credit hook for each agreeing run of a contributed, non-quarantined worker.

Race-freedom: the claim is one statement (the party check is a NOT EXISTS inside it,
`csml.store.jobs.claimable`); every decision above happens in the completion's
transaction, where J is locked and the worker's record is read afresh (the claim's view
of it comes from the 2 s worker-token cache and only filters; it never decides). A job's
result reaches its owner only through ACCEPT: a held job is `queued` with a progress
message ("verifying: ...") and no result.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Protocol

from sqlalchemy.engine import Connection, Engine

from csml import ids
from csml.coordinator.worker_tokens import CACHE as WORKER_TOKENS
from csml.refusals import Invalid, Malformed, NotFound
from csml.schemas.contributions import ContributedWorkerRecord as WorkerStanding
from csml.store import verification as store
from csml.store.jobs import Claimant
from csml.store.verification import Run, Standing, TrustCounts
from csml.store.writer import Writer


class WriteRunner(Protocol):
    """Runs a write operation in a transaction (the `Writer`, or the CLI's own)."""

    def run(self, op: Callable[[Connection], bool]) -> bool: ...


DEFAULT = "replicate:2"
"""The policy of an app whose operator set none: contributions are off by default, and
an operator who allows them gets verification unless they say otherwise."""
PENALTY = 10
"""A disagreement costs this many agreements of reputation."""
MAX_K = 5
POLICY_TTL_SECONDS = 2.0
OPERATOR = None  # the operator's party


@dataclass(frozen=True)
class Policy:
    kind: str  # "none" | "replicate" | "spot-check"
    k: int = 1
    p: float = 0.0

    def __str__(self) -> str:
        if self.kind == "replicate":
            return f"replicate:{self.k}"
        if self.kind == "spot-check":
            return f"spot-check:{self.p:g}"
        return "none"


_POLICY = re.compile(r"^(none|replicate:(\d+)|spot-check:(\d*\.?\d+))$")


def parse(text: str, field_name: str = "policy") -> Policy:
    """A policy from its text (Invalid naming `field_name` when it is none)."""
    m = _POLICY.match(text.strip())
    if m is None:
        raise Invalid(
            "invalid_policy",
            f"{field_name}: {text!r} is not a policy: none, replicate:K (2..{MAX_K}) or "
            "spot-check:P (0 < P <= 1)",
            field=field_name,
        )
    if m.group(2) is not None:
        k = int(m.group(2))
        if not 2 <= k <= MAX_K:
            raise Invalid(
                "invalid_policy",
                f"{field_name}: replicate:K needs 2 <= K <= {MAX_K}",
                field=field_name,
            )
        return Policy("replicate", k=k)
    if m.group(3) is not None:
        p = float(m.group(3))
        if not 0 < p <= 1:
            raise Invalid(
                "invalid_policy", f"{field_name}: spot-check:P needs 0 < P <= 1", field=field_name
            )
        return Policy("spot-check", p=p)
    return Policy("none")


def digest(
    state: str, result: dict[str, Any] | None, error: str | None, outputs: Sequence[tuple[str, str]]
) -> str:
    """What two runs must share to agree (see the module docstring). A failed run's digest
    is marked `failed:` (failures are compared, never held against a worker)."""
    body = {
        "state": state,
        "result": result,
        "error": error if state != "succeeded" else None,
        "outputs": sorted([name, sha] for name, sha in outputs),
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    hexdigest = hashlib.sha256(text.encode()).hexdigest()
    return hexdigest if state == "succeeded" else f"{FAILED}{hexdigest}"


FAILED = "failed:"
"""Prefix of a failed run's digest."""


def judged(accepted: str, run: str) -> bool:
    """Whether `run` counts for or against its worker's reputation, given the accepted
    digest: only when both succeeded. A failure (a time or memory limit on a smaller
    machine, a lost worker) is no lie: it never costs reputation, and an accepted failure
    judges nobody; it never earns either."""
    return not accepted.startswith(FAILED) and not run.startswith(FAILED)


class Decision(Enum):
    ACCEPT = "accept"
    CHECKING = "checking"  # back in the queue for another party's run
    TRUSTED = "trusted"  # back in the queue for an operator run


@dataclass(frozen=True)
class NewRun:
    """The run being completed: its party, digest, and the worker's standing."""

    contributor_id: str
    digest: str
    counts: bool  # False: its worker is quarantined
    probation: bool


def decide(
    policy: Policy,
    pending: Sequence[Run],
    new: NewRun,
    *,
    deterministic: bool,
    draw: Callable[[], float],
) -> Decision:
    """The state machine's step for a contributed run (see the module docstring): pure."""
    if not deterministic:
        return Decision.TRUSTED  # never compared: a trusted run decides
    if not new.counts:
        return Decision.CHECKING
    if policy.kind == "spot-check":
        if new.probation or any(r.counts for r in pending) or draw() < policy.p:
            return Decision.TRUSTED
        return Decision.ACCEPT
    need = policy.k if policy.kind == "replicate" else 2  # none: only for probation
    votes: dict[str, set[str | None]] = {}
    for r in pending:
        if r.counts:
            votes.setdefault(r.digest, set()).add(r.contributor_id)
    votes.setdefault(new.digest, set()).add(new.contributor_id)
    mine = len(votes[new.digest])
    others = max((len(v) for d, v in votes.items() if d != new.digest), default=0)
    if mine >= need and mine > others:
        return Decision.ACCEPT
    if sum(len(v) for v in votes.values()) >= need + 2:
        return Decision.TRUSTED
    return Decision.CHECKING


@dataclass(frozen=True)
class Earning:
    """A run whose contributor earns credit now (see `accept` and `close_batch`)."""

    job_seq: int
    worker_id: str
    contributor_id: str
    wall_seconds: float
    run_id: int | None = None  # None: a run taken as it is (not recorded)


@dataclass
class Batch:
    """What a completion batch carries to its end: reputation deltas to apply (in
    worker-id order, once) and the earnings decided."""

    deltas: dict[str, tuple[int, int]] = field(default_factory=dict)
    earnings: list[Earning] = field(default_factory=list)  # earned now, before quarantines
    credited: list[Earning] = field(default_factory=list)  # what `close_batch` credited

    def count(self, worker_id: str, agreed: bool) -> None:
        a, d = self.deltas.get(worker_id, (0, 0))
        self.deltas[worker_id] = (a + 1, d) if agreed else (a, d + 1)


def contributor_of(worker: Any) -> str | None:
    """The identity that contributed `worker` (None: the operator's, or unknown)."""
    value = getattr(worker, "contributor_id", None)
    return value if isinstance(value, str) else None


class Verifier:
    """The policies (cached per app for `POLICY_TTL_SECONDS` for claims; read afresh in a
    completion's transaction) and the rules above."""

    def __init__(self, engine: Engine, probation: int, draw: Callable[[], float] | None = None):
        self.engine = engine
        self.probation = probation
        self.draw = draw or (lambda: secrets.randbelow(1 << 30) / float(1 << 30))
        self._lock = threading.Lock()
        self._policies: tuple[dict[str, str], float] | None = None

    # -- policies --------------------------------------------------------------------

    def policy(self, app: str) -> Policy:
        """`app`'s policy as this coordinator saw it at most `POLICY_TTL_SECONDS` ago."""
        now = time.monotonic()
        with self._lock:
            cached = self._policies
        if cached is None or now - cached[1] >= POLICY_TTL_SECONDS:
            with self.engine.connect() as conn:
                cached = (store.policies(conn), now)
            with self._lock:
                self._policies = cached
        return parse(cached[0].get(app, DEFAULT))

    def forget_policies(self) -> None:
        with self._lock:
            self._policies = None

    # -- claims -----------------------------------------------------------------------

    def on_probation(self, agreements: int) -> bool:
        return agreements < self.probation

    def claimant(
        self, worker: Any, deterministic: Callable[[], tuple[str, ...]]
    ) -> Claimant | None:
        """The claim filter of a contributed worker (None: an operator worker, no filter).
        `deterministic` gives the app's deterministic operations."""
        contributor = contributor_of(worker)
        if contributor is None:
            return None
        agreements = int(getattr(worker, "agreements", 0))
        disagreements = int(getattr(worker, "disagreements", 0))
        quarantined = getattr(worker, "quarantined_at", None) is not None
        restricted = (
            quarantined
            or self.on_probation(agreements)
            or self.policy(str(worker.app)).kind != "none"
        )
        return Claimant(
            contributor_id=contributor,
            reputation=agreements - PENALTY * disagreements,
            quarantined=quarantined,
            operations=deterministic() if restricted else None,
        )

    # -- completions --------------------------------------------------------------------

    def judge(
        self,
        conn: Connection,
        seq: int,
        standing: Standing,
        new_digest: str,
        wall_seconds: float,
        *,
        deterministic: bool,
        now: datetime,
    ) -> tuple[Decision, list[Run]]:
        """A contributed worker's run completed: record it if it needs comparing, and say
        what becomes of the job (the caller holds the job, or accepts it with `accept`)."""
        assert standing.contributor_id is not None
        policy = parse(standing.policy or DEFAULT)
        probation = self.on_probation(standing.agreements)
        pending = store.pending_runs(conn, seq)
        if policy.kind == "none" and not probation and not standing.quarantined and not pending:
            return Decision.ACCEPT, []  # taken as it is: nothing recorded
        new = NewRun(standing.contributor_id, new_digest, not standing.quarantined, probation)
        decision = decide(policy, pending, new, deterministic=deterministic, draw=self.draw)
        run = Run(
            id=0,
            worker_id=standing.worker_id,
            contributor_id=standing.contributor_id,
            digest=new_digest,
            counts=new.counts,
            wall_seconds=wall_seconds,
        )
        if decision is Decision.ACCEPT:
            return decision, [*pending, run]
        store.add_run(conn, seq, run, now)
        return decision, pending

    def credit_of(self, agreements: int, quarantined: bool) -> str | None:
        """What an agreeing run of a succeeded job earns for its contributor: nothing from
        a quarantined worker; held while the worker is on probation (earned when it
        leaves probation, forfeit if it is quarantined first); else earned now."""
        if quarantined:
            return None
        return "held" if self.on_probation(agreements) else "earned"

    def accept(
        self,
        conn: Connection,
        seq: int,
        runs: Sequence[Run],
        accepted: Run,
        *,
        succeeded: bool,
        standing: Standing | None,
        now: datetime,
        batch: Batch,
    ) -> None:
        """THE acceptance point: job `seq` ends with `accepted`'s result (the caller writes
        it; `standing`: its worker's record, None for an operator worker). Every pending
        run of `runs` is settled against it; `accepted` is recorded when the job was
        verified; reputations move (applied once, at the batch's end, `close_batch`); and
        each agreeing run of a contributed, non-quarantined worker of a succeeded job
        earns (`credit_of`; credited in `close_batch`)."""
        others = [r for r in runs if r is not accepted]
        contributed = sorted({r.worker_id for r in others if r.contributor_id is not None})
        records = store.records_of(conn, contributed) if contributed else {}
        outcomes: list[tuple[int, str, str | None]] = []
        for r in others:
            agreed = r.digest == accepted.digest
            credit: str | None = None
            if succeeded and agreed and r.counts and r.contributor_id is not None:
                agreements, quarantined = records.get(r.worker_id, (0, True))
                credit = self.credit_of(agreements, quarantined)
                if credit == "earned":
                    batch.earnings.append(
                        Earning(seq, r.worker_id, r.contributor_id, r.wall_seconds, r.id)
                    )
            outcomes.append((r.id, "agreed" if agreed else "disagreed", credit))
            if r.contributor_id is not None and judged(accepted.digest, r.digest):
                batch.count(r.worker_id, agreed)
        store.settle(conn, outcomes)
        mine: str | None = None
        if succeeded and accepted.contributor_id is not None and standing is not None:
            mine = self.credit_of(standing.agreements, standing.quarantined)
        run_id: int | None = None
        if runs:  # a verified job: its accepting run is on record too
            run_id = store.add_run(conn, seq, accepted, now, outcome="accepted", credit=mine)
            if accepted.contributor_id is not None and judged(accepted.digest, accepted.digest):
                batch.count(accepted.worker_id, True)
        if mine == "earned":
            assert accepted.contributor_id is not None
            batch.earnings.append(
                Earning(
                    seq, accepted.worker_id, accepted.contributor_id, accepted.wall_seconds, run_id
                )
            )

    def close_batch(self, conn: Connection, batch: Batch, now: datetime) -> list[str]:
        """End of a completion batch's transaction: apply the reputation deltas (workers
        quarantined now stop counting and forfeit their held and this batch's credit;
        workers leaving probation now have their held credit released) and credit what
        was earned. Returns the workers quarantined now."""
        after = store.apply_reputation(conn, batch.deltas, now, PENALTY) if batch.deltas else {}
        caught = [w for w, r in after.items() if r.quarantined_now]
        if caught:
            store.forfeit(conn, caught, [e.run_id for e in batch.earnings if e.run_id is not None])
        earned = [
            e
            for e in batch.earnings
            if not (e.worker_id in after and after[e.worker_id].quarantined)
        ]
        for worker_id, rep in after.items():
            before = rep.agreements - batch.deltas[worker_id][0]
            if not rep.quarantined and before < self.probation <= rep.agreements:
                earned += [
                    Earning(h.job_seq, h.worker_id, h.contributor_id, h.wall_seconds, h.run_id)
                    for h in store.release_held(conn, worker_id)
                ]
        # Once for each accepted, agreeing run of a contributed, non-quarantined worker out
        # of probation: the caller credits them (`csml.store.credit.earn_runs`).
        batch.credited += earned
        return caught


# -- the operator's views ---------------------------------------------------------------


def records(engine: Engine, probation: int, *, quarantined_only: bool) -> list[WorkerStanding]:
    """Contributed workers with their record (quarantined ones only, or the live ones)."""
    with engine.connect() as conn:
        found = store.contributed_records(conn, quarantined_only=quarantined_only)
    return [
        WorkerStanding(
            id=r.id,
            app=r.app,
            agreements=r.agreements,
            disagreements=r.disagreements,
            reputation=r.agreements - PENALTY * r.disagreements,
            probation=r.agreements < probation and r.quarantined_at is None,
            quarantined_at=r.quarantined_at,
            stopped_at=r.stopped_at,
        )
        for r in found
    ]


def lift(engine: Engine, writer: Writer | WriteRunner, worker_id: str) -> str:
    """Lift a contributed worker's quarantine (by id or unique prefix); its full id. Its
    record starts afresh, on probation. NotFound: no such quarantined worker."""
    if not ids.is_id_prefix(worker_id):
        raise NotFound.of("worker", worker_id)
    with engine.connect() as conn:
        found = store.contributed_worker_ids(conn, worker_id)
    if not found:
        raise NotFound.of("worker", worker_id)
    if len(found) > 1:
        raise Malformed("ambiguous_id", f"{worker_id!r} matches several workers")
    full = found[0]
    if not writer.run(lambda conn: store.lift_quarantine(conn, full)):
        raise NotFound("not_quarantined", f"worker {ids.short(full)} is not quarantined")
    WORKER_TOKENS.forget_worker(full)  # its next claim here sees it lifted
    return full


def trust_counts(engine: Engine, live_since: datetime, probation: int) -> dict[str, TrustCounts]:
    """Per app: live workers that announced attestation, on probation, quarantined."""
    with engine.connect() as conn:
        return store.trust_counts(conn, live_since, probation)
