"""Abuse control without identity.

The service knows no one (no names, no addresses, no IPs), so abuse is made
expensive or bounded instead:

- **Proof of work for new identities.** `issue_challenge` signs a random challenge
  with a key kept in the store (so every coordinator of the store accepts it) and
  writes nothing; `create_identity` needs a nonce such that SHA-256(challenge ||
  nonce) has `pow_difficulty` leading zero bits, and spends the challenge (kept in
  `used_challenges` until it expires, so it is refused everywhere afterwards).
- **Difficulty that rises with the recent rate of new identities** (never a refusal):
  with `n` new identities in the last window (a sliding estimate over two fixed
  windows kept in the store, so it holds across coordinators), the target `T`
  (`identity_rate_limit` per `identity_rate_window_seconds`), the base `b`
  (`pow_difficulty`) and the cap `M` (`pow_max_extra_bits`), a challenge asks for
  `b` bits while `n < T`, else `b + min(M, floor(log2(n / T)) + 1)`: each doubling
  of the rate doubles the work per identity. A solved challenge is accepted while
  its difficulty is at most `SLACK_BITS` below what the service needs now, so a
  newcomer's puzzle survives the usual drift, and once the difficulty is at the
  cap any challenge issued at the cap is accepted: a patient newcomer always gets
  in after at most about 2**(b+M) hashes, whatever a flood does.
- **Per-identity limits**, counted from the store so they hold across coordinators:
  submissions per window, queued + running jobs, stored bytes, model artifacts. They
  are checked here early (before a body is read) and again, race-free, in the
  transaction that lands the rows (`csml.coordinator.quotas`, whose helpers this module
  re-exports). A single job's submission is counted in its window by its own write
  (`precheck_submission` early, a read); a pipeline's, or a submission refused before
  its write, by `check_submission` (its own transaction), as all were before.

Every refusal of a limit is a `csml.refusals` kind that passes with time (429 with
`Retry-After` over HTTP) and names the limit, its value and when it resets; the rows
are `csml.store.abuse`'s and `csml.store.identities`'.

`delete_identity` erases an identity with all its jobs and files, and on SQLite then
empties the write-ahead log (`csml.store.db.scrub_wal`), so no file under the data
folder keeps a trace of it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from csml import ids
from csml.coordinator import contributions, quotas
from csml.coordinator.artifacts import remove_files as remove_model_files
from csml.coordinator.notify import job_key
from csml.coordinator.queue import QUEUED, RUNNING
from csml.coordinator.quotas import check_models as check_models
from csml.coordinator.quotas import check_storage as check_storage
from csml.coordinator.quotas import model_count as model_count
from csml.coordinator.quotas import rate_limited as rate_limited
from csml.coordinator.quotas import stored_bytes as stored_bytes
from csml.coordinator.quotas import submit_key as submit_key
from csml.coordinator.quotas import too_many as too_many
from csml.coordinator.retention import delete_job_rows, remove_job_files
from csml.coordinator.state import Core
from csml.refusals import Conflict, Invalid
from csml.schemas import JobState
from csml.schemas.identities import IdentityChallenge, IdentityCreated, IdentityProof
from csml.store import abuse as store
from csml.store import credit as ledger
from csml.store import identities
from csml.store.db import scrub_wal, transaction
from csml.store.tables import utcnow

CHALLENGE_VERSION = "v1"
SIGNING_ROW = "pow-challenge-hmac"
IDENTITIES_KEY = "identities"
PREVIOUS_IDENTITIES_KEY = "identities:previous"
SLACK_BITS = 1
GET_CHALLENGE = "get one from POST /v1/identities/challenge"

_keys: dict[str, bytes] = {}
_keys_lock = threading.Lock()


# -- proof of work ------------------------------------------------------------


def leading_zero_bits(digest: bytes) -> int:
    return len(digest) * 8 - int.from_bytes(digest, "big").bit_length()


def challenge_key(core: Core) -> bytes:
    """The store's challenge-signing key, made by whichever coordinator needs it first."""
    url = core.engine.url.render_as_string(hide_password=True)
    with _keys_lock:
        key = _keys.get(url)
    if key is not None:
        return key
    with core.sessions() as session:
        value = store.server_secret(session, SIGNING_ROW)
    if value is None:
        with transaction(core.sessions) as session:
            value = store.make_server_secret(session, SIGNING_ROW, secrets.token_hex(32), utcnow())
    key = bytes.fromhex(value)
    with _keys_lock:
        _keys[url] = key
    return key


def _sign(key: bytes, body: str) -> str:
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def difficulty_for(core: Core, recent: float) -> int:
    """Bits of work a new identity needs when `recent` identities were made in the
    last window: the base while under the target rate, then one more bit per
    doubling of the rate past it, at most `pow_max_extra_bits` more."""
    s = core.settings
    if s.pow_difficulty == 0:
        return 0
    target = s.identity_rate_limit
    if not target or recent < target:
        return s.pow_difficulty
    extra = math.floor(math.log2(recent / target)) + 1
    return min(s.pow_difficulty + min(extra, s.pow_max_extra_bits), 256)


def _recent_identities(session: Session, core: Core, *, lock: bool) -> float:
    """New identities in the last window (sliding estimate from the current and the
    previous fixed window); with `lock`, both windows' rows are made if missing, locked
    (current, then previous), and rolled over when the current window ended."""
    window = core.settings.identity_rate_window_seconds
    now = utcnow()
    current: store.Window | None
    previous: store.Window | None
    if lock:  # one upsert each (made if missing, and locked), current first
        current = store.hold_window(session, IDENTITIES_KEY, now)
        previous = store.hold_window(session, PREVIOUS_IDENTITIES_KEY, now)
    else:  # one read of both
        found = store.windows(session, [IDENTITIES_KEY, PREVIOUS_IDENTITIES_KEY])
        current, previous = found.get(IDENTITIES_KEY), found.get(PREVIOUS_IDENTITIES_KEY)
    cur_start, cur_count = (current.start, current.count) if current else (now, 0)
    prev_start, prev_count = (previous.start, previous.count) if previous else (now, 0)
    span = timedelta(seconds=window)
    if cur_start + span <= now:  # the current window ended: it becomes the previous one
        prev_start, prev_count = cur_start, cur_count if now < cur_start + 2 * span else 0
        cur_start, cur_count = now, 0
        if lock:
            store.set_window(session, PREVIOUS_IDENTITIES_KEY, prev_start, prev_count)
            store.set_window(session, IDENTITIES_KEY, cur_start, cur_count)
    # The part of the previous window that lies in the last `window` seconds.
    overlap = (prev_start + 2 * span - now).total_seconds() / window
    return cur_count + prev_count * min(1.0, max(0.0, overlap))


def current_difficulty(core: Core) -> int:
    """The difficulty a challenge issued now asks for (read only; nothing is locked)."""
    if core.settings.pow_difficulty == 0:
        return 0
    with core.sessions() as session:
        recent = _recent_identities(session, core, lock=False)
    return difficulty_for(core, recent)


def issue_challenge(core: Core) -> IdentityChallenge:
    """A fresh signed challenge at the current difficulty; nothing is written."""
    s = core.settings
    difficulty = current_difficulty(core)
    expires = math.ceil(utcnow().timestamp() + s.pow_challenge_seconds)
    body = f"{CHALLENGE_VERSION}.{difficulty}.{expires}.{secrets.token_hex(16)}"
    return IdentityChallenge(
        challenge=f"{body}.{_sign(challenge_key(core), body)}",
        difficulty=difficulty,
        expires_at=datetime.fromtimestamp(expires, UTC),
    )


def _bad_challenge(code: str, message: str) -> Invalid:
    return Invalid(code, message, field="challenge")


def check_proof(
    core: Core, proof: IdentityProof | None, needed: int | None = None
) -> datetime | None:
    """Check a solution against `needed` bits (default: the base difficulty); returns
    when its challenge expires (None when no work is needed)."""
    if core.settings.pow_difficulty == 0:
        return None
    if needed is None:
        needed = core.settings.pow_difficulty
    if proof is None:
        raise _bad_challenge(
            "proof_of_work_required",
            "challenge: a new identity needs a solved proof-of-work challenge "
            f'{{"challenge": ..., "nonce": ...}}; {GET_CHALLENGE}',
        )
    parts = proof.challenge.split(".")
    body, _, mac = proof.challenge.rpartition(".")
    valid = (
        len(parts) == 5
        and parts[0] == CHALLENGE_VERSION
        and parts[1].isdigit()
        and parts[2].isdigit()
        and hmac.compare_digest(_sign(challenge_key(core), body).encode(), mac.encode())
    )
    if not valid:
        raise _bad_challenge(
            "invalid_challenge",
            f"challenge: not one this service issued, or altered; {GET_CHALLENGE}",
        )
    difficulty, expires = int(parts[1]), datetime.fromtimestamp(int(parts[2]), UTC)
    late = (utcnow() - expires).total_seconds()
    if late >= 0:
        raise _bad_challenge(
            "challenge_expired", f"challenge: expired {late:.0f} s ago; {GET_CHALLENGE}"
        )
    if difficulty < needed - SLACK_BITS:
        raise _bad_challenge(
            "challenge_too_easy",
            f"challenge: asks for {difficulty} bits but this service now needs {needed} "
            f"(many identities were made lately); {GET_CHALLENGE}",
        )
    digest = hashlib.sha256(proof.challenge.encode() + proof.nonce.encode()).digest()
    zeros = leading_zero_bits(digest)
    if zeros < difficulty:
        raise Invalid(
            "invalid_nonce",
            f"nonce: SHA-256(challenge || nonce) starts with {zeros} zero bits; "
            f"the challenge needs {difficulty}",
            field="nonce",
        )
    return expires


def create_identity(core: Core, proof: IdentityProof | None) -> IdentityCreated:
    """Check the proof of work (cheap checks first, then against the difficulty the
    recent rate asks for, under the rate row's lock), count the identity, spend the
    challenge and store the identity: one transaction, so a refusal spends nothing.
    There is no rate refusal: a flood only raises the difficulty."""
    expires = check_proof(core, proof)
    token = ids.new_secret("csml")
    identity_id, created_at = ids.new_id(), utcnow()
    with transaction(core.sessions) as session:
        recent = _recent_identities(session, core, lock=True)
        expires = check_proof(core, proof, difficulty_for(core, recent))
        store.add_to_window(session, IDENTITIES_KEY)
        if proof is not None and expires is not None:
            digest = hashlib.sha256(proof.challenge.encode()).hexdigest()
            if not store.spend_challenge(session, digest, expires):
                raise Conflict(
                    "challenge_used",
                    f"challenge: already used; each challenge creates one identity; "
                    f"{GET_CHALLENGE}",
                    field="challenge",
                )
        identities.add_identity(session, identity_id, ids.hash_secret(token), created_at)
    return IdentityCreated(id=identity_id, token=token)


# -- rate windows and quotas --------------------------------------------------


def count_in_window(session: Session, key: str, limit: int, window: float) -> float | None:
    """Count one event in `key`'s fixed window, unless `limit` is reached: then return
    the seconds until the window resets (and count nothing). The row is locked, so
    counts are exact across coordinators; the caller's transaction commits it."""
    return store.count_in_window(session, key, limit, window, utcnow())


def check_submission(core: Core, identity_id: str, upload_bytes: int = 0) -> None:
    """Refuse (`RateLimited`, or the quota's refusal) a submission past any per-identity
    limit, before its body is read; else count it in the identity's submission window.

    An early refusal only: the limits are checked again, race-free, in the transaction
    that creates the job (`csml.coordinator.quotas`). Checks queued + running jobs,
    stored bytes (plus `upload_bytes` announced by the request) and submissions in the
    current window. The identity is locked first (and must still exist, so an erased
    identity leaves no window row behind). A refused submission is not counted.
    """
    s = core.settings
    if not (s.submission_rate_limit or s.max_active_jobs or s.max_stored_bytes):
        return
    with transaction(core.sessions) as session:
        quotas.require_identity(session, identity_id)
        quotas.count_submission(core, session, identity_id)
        quotas.check_active_jobs(core, session, identity_id)
        if s.max_stored_bytes:
            check_storage(core, session, identity_id, upload_bytes)


def precheck_submission(core: Core, identity_id: str, upload_bytes: int = 0) -> int | None:
    """`check_submission`'s refusals, in its order, from a read: writes and counts
    nothing, takes no write lock and no commit. For a submission whose own write counts
    it in the window (`JobQueue.submit_async(count_window=True)`, which keeps the count
    exact and race-free): this only refuses early (before a body is read) what that
    write would refuse, so a submission racing others to the window's last place may
    still be refused there, after its body. Answers the identity's stored bytes when it
    read them (a storage quota is set), for the upload's `StorageBudget`."""
    s = core.settings
    if not (s.submission_rate_limit or s.max_active_jobs or s.max_stored_bytes):
        return None
    with core.sessions() as session:
        used: int | None = None
        if s.max_stored_bytes:  # whether it exists and what it stores: one read
            used = quotas.require_identity_stored(session, identity_id)
        else:
            quotas.require_identity(session, identity_id, lock=False)
        if s.submission_rate_limit:
            limit, window = s.submission_rate_limit, s.submission_rate_window_seconds
            key = submit_key(identity_id)
            held = store.windows(session, [key]).get(key)
            now = utcnow()
            ends = held.start + timedelta(seconds=window) if held is not None else now
            if held is not None and ends > now and held.count >= limit:
                wait = (ends - now).total_seconds()
                raise rate_limited(
                    "submission rate limit", limit, window, wait, "submission_rate_limited"
                )
        quotas.check_active_jobs(core, session, identity_id)
        if s.max_stored_bytes:
            check_storage(core, session, identity_id, upload_bytes, used)
    return used


def announced_upload(headers: Mapping[str, str]) -> int:
    """Bytes a multipart submission announces (Content-Length); 0 for JSON or unknown."""
    if not headers.get("content-type", "").startswith("multipart/"):
        return 0
    length = headers.get("content-length", "")
    return int(length) if length.isdigit() else 0


def check_model_quota(core: Core, identity_id: str, makes_models: int) -> None:
    """Refuse (429, or 422 if it could never fit) a job that would keep `makes_models`
    models (a bool counts as 0 or 1) past the identity's model quota, counting the
    models kept and those its queued and running jobs will keep. An early refusal:
    the transaction that creates the job checks again."""
    if not makes_models or not core.settings.max_models:
        return
    with core.sessions() as session:
        quotas.check_new_models(core, session, core.catalog, identity_id, int(makes_models))


# -- erasure ------------------------------------------------------------------


def delete_identity(core: Core, identity_id: str) -> int:
    """Erase an identity: cancel its live jobs (their workers are told to stop on their
    next heartbeat), then delete its jobs, files and every row that names it, and (SQLite)
    checkpoint and truncate the write-ahead log that still held those rows.
    Its contributed join tokens are revoked and deleted with their workers' rows
    (`csml.coordinator.contributions.erase`), its credit ledger and balance with them.
    Returns how many jobs were erased.

    A submission or model import still streaming meanwhile finds the identity gone
    in the transaction that would create its rows (`quotas.require_identity`): it
    is refused as unauthenticated and removes its own files; one that got there first is
    erased here with the rest (`csml.store.identities.lock_for_erasure`)."""
    now = utcnow()
    with transaction(core.sessions) as session:
        live = identities.cancel_live_jobs(
            session, identity_id, [QUEUED, RUNNING], JobState.cancelled.value, now
        )
    for job_id in live:
        core.notifier.notify(job_key(job_id))
    with transaction(core.sessions) as session:
        jobs = identities.lock_for_erasure(session, identity_id)
        delete_job_rows(session, jobs, now)
        contributed = contributions.erase(session, identity_id)
        ledger.erase(session, identity_id)  # its credit ledger and balance
        models = identities.delete_identity(session, identity_id, submit_key(identity_id))
    contributions.forget(contributed)  # its contributed workers are refused now
    remove_job_files(core, [job_id for _, job_id in jobs])
    remove_model_files(core.blobs, models)
    core.blobs.base64.clear()  # no erased bytes kept in memory either
    if core.engine.dialect.name == "sqlite" and not scrub_wal(core.engine):
        logging.getLogger("csml.coordinator.abuse").warning(
            "erasure: a long reader kept the write-ahead log; it empties at a later checkpoint"
        )
    return len(jobs)
