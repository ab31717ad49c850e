"""Contributed workers: join tokens an identity makes for its own worker, and the
operator's per-app rules for them.

Invariants:
- A contributed token is bound to its identity (`contributor_id`) and to exactly one app
  that is in the catalog and takes contributions when the token is made; it never may
  publish. Registration checks the rules again (`csml.coordinator.catalog`): a denied
  app, a full cap or an unpinned version refuses the worker.
- An identity sees and revokes only its own contributed tokens; another's id is
  `NotFound` (as if absent). The operator may revoke any of them.
- Revoking stops the token's workers at once (in the same transaction as
  `csml.coordinator.tokens.revoke`); this coordinator forgets their cached worker tokens,
  others within the cache's TTL.
- Erasing an identity (`erase`) revokes and deletes its contributed tokens and their
  workers' rows. Who contributed a worker is never shown to other users.
- The token itself is returned once and never stored (only its hash).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from csml import ids
from csml.coordinator import tokens
from csml.coordinator import verification as verifying
from csml.coordinator.config import Settings
from csml.coordinator.state import Core
from csml.coordinator.worker_tokens import CACHE as WORKER_TOKENS
from csml.refusals import Forbidden, Invalid, Malformed, NotFound, QuotaExceeded
from csml.schemas.contributions import (
    ContributedWorkerInfo,
    ContributionCreated,
    ContributionInfo,
    ContributionSettingInfo,
    ContributionSettingRequest,
)
from csml.store import contributions
from csml.store.db import transaction
from csml.store.tables import utcnow

MAX_LIVE_TOKENS = 20
"""Contributed tokens one identity may hold unrevoked at once."""
MAX_TOKENS = 200
"""Contributed tokens one identity may have made, revoked ones included (their rows stay
for its list until the identity is erased)."""

IMAGE = "ghcr.io/csml/csml-worker-{app}:{version}"


def worker_command(url: str, app: str) -> list[str]:
    return ["csml", "worker", "--coordinator", url, "--app", app, "--join-token-file", "-"]


def container_command(url: str, app: str) -> list[str]:
    """The worker in its image, hardened as the deployments run it (deploy/compose.yaml)."""
    import csml

    version = csml.__version__.split("+")[0]
    return [
        "podman",
        "run",
        "-d",
        "--name",
        f"csml-{app}",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--user",
        "10001:10001",
        "--tmpfs",
        "/tmp:size=1g",  # noqa: S108 (a tmpfs in the container, as deploy/compose.yaml)
        "-v",
        "/work",
        "-v",
        "./csml-join-token:/run/secrets/join_token:ro,Z",
        "-e",
        f"CSML_COORDINATOR={url}",
        "-e",
        "CSML_JOIN_TOKEN_FILE=/run/secrets/join_token",
        "-e",
        "CSML_WORKDIR=/work",
        IMAGE.format(app=app, version=version),
        "--app",
        app,
    ]


def create(c: Core, identity_id: str, app: str, label: str, url: str) -> ContributionCreated:
    """A join token for the identity's worker of `app` (Forbidden where the operator does
    not take contributions; NotFound for an app not in the catalog)."""
    with transaction(c.sessions) as session:
        if app not in c.catalog.entries(session):
            known = ", ".join(sorted(c.catalog.entries(session))) or "none yet"
            raise NotFound(
                "unknown_app", f"app: no application {app!r}; known: {known}", field="app"
            )
        allowed, _ = c.catalog.contributions_allowed(session, app)
        if not allowed:
            raise Forbidden(
                "contributions_off",
                f"app: the operator does not take contributed workers for {app!r}",
                field="app",
            )
        if len(contributions.live_tokens_of(session, identity_id)) >= MAX_LIVE_TOKENS:
            raise QuotaExceeded(
                "too_many_contributions",
                f"you hold {MAX_LIVE_TOKENS} contributed join tokens already; revoke one "
                "(csml contribute revoke ID)",
            )
        if contributions.count_tokens_of(session, identity_id) >= MAX_TOKENS:
            raise QuotaExceeded(
                "too_many_contributions",
                f"you have made {MAX_TOKENS} contributed join tokens; that is the most one "
                "identity may make",
            )
        new = tokens.new_join_token(label, [app], False)
        tokens.NewJoinToken(
            id=new.id,
            token=new.token,
            label=new.label,
            apps=new.apps,
            may_publish=False,
            contributor_id=identity_id,
        ).store(session)
    return ContributionCreated(
        id=new.id,
        app=app,
        token=new.token,
        worker_command=worker_command(url, app),
        container_command=container_command(url, app),
    )


def list_of(c: Core, identity_id: str) -> list[ContributionInfo]:
    with c.sessions() as session:
        found = contributions.tokens_of(session, identity_id)
    return [
        ContributionInfo(
            id=t.id,
            app=t.app,
            label=t.label,
            created_at=t.created_at,
            revoked_at=t.revoked_at,
            workers=[ContributedWorkerInfo(**vars(w)) for w in t.workers],
        )
        for t in found
    ]


def revoke(c: Core, token_id: str, identity_id: str | None) -> str:
    """Revoke a contributed token of `identity_id` (None: anyone's, the operator);
    returns its full id."""
    if not ids.is_id_prefix(token_id):
        raise NotFound.of("contribution", token_id)
    with transaction(c.sessions) as session:
        found = contributions.token_ids_by_prefix(session, token_id, identity_id)
        if not found:
            raise NotFound.of("contribution", token_id)
        if len(found) > 1:
            raise Malformed("ambiguous_id", f"{token_id!r} matches several contributions")
        tokens.revoke(session, found[0])
    WORKER_TOKENS.forget_join_token(found[0])  # committed: its workers are refused now
    c.catalog.reload()
    return found[0]


def erase(session: Session, identity_id: str) -> list[str]:
    """In the erasure's transaction: revoke the identity's contributed tokens (their
    workers stop) and delete them with their workers' rows; returns their ids. The
    caller forgets them in the worker-token cache after committing."""
    for token_id in contributions.live_tokens_of(session, identity_id):
        tokens.revoke(session, token_id)
    return contributions.delete_contributed(session, identity_id)


def forget(token_ids: list[str]) -> None:
    for token_id in token_ids:
        WORKER_TOKENS.forget_join_token(token_id)


def worker_counts(c: Core) -> dict[str, tuple[int, int]]:
    """Per app, its live workers as (operator-run, contributed): what `GET /v1/apps`
    shows as `operator_workers` and `contributed_workers`."""
    cutoff = utcnow() - timedelta(seconds=c.settings.worker_live_seconds)
    with c.sessions() as session:
        return contributions.worker_counts(session, cutoff)


# -- the operator's settings ----------------------------------------------------


def _rule(session: Session, default: bool, app: str) -> tuple[bool, int | None]:
    found = contributions.setting(session, app)
    return (default, None) if found is None else (found.allowed, found.max_workers)


def _setting_info(session: Session, settings: Settings, app: str) -> ContributionSettingInfo:
    allowed, cap = _rule(session, settings.contributions, app)
    live = contributions.live_contributed_workers(
        session, app, utcnow() - timedelta(seconds=settings.worker_live_seconds)
    )
    found = contributions.setting(session, app)
    policy = found.verification if found is not None else None
    return ContributionSettingInfo(
        app=app,
        allowed=allowed,
        max_workers=cap,
        default=found is None,
        contributed_workers=live,
        credit_weight=found.credit_weight if found is not None else 1.0,
        verification=policy or verifying.DEFAULT,
        verification_default=policy is None,
    )


def settings_info(c: Core) -> list[ContributionSettingInfo]:
    """Every catalogued app's rule (and any app the operator ruled on)."""
    with c.sessions() as session:
        names = set(c.catalog.entries(session)) | {s.app for s in contributions.settings(session)}
        return [_setting_info(session, c.settings, app) for app in sorted(names)]


def set_rule(c: Core, app: str, body: ContributionSettingRequest) -> ContributionSettingInfo:
    """Allow or deny contributions for `app` and/or cap them; fields left out stay as they
    are (`credit_weight`: credit per wall second of a run of the app). Denying revokes every
    contributed token of the app (their workers stop now): off
    means off. A lower cap stops no running worker; it refuses new ones until below it."""
    cap_given = "max_workers" in body.model_fields_set
    info = set_rule_in(
        c.sessions,
        c.settings,
        app,
        body.allowed,
        cap_given,
        body.max_workers,
        credit_weight=body.credit_weight,
        verification=body.verification,
    )
    c.queue.verifier.forget_policies()  # here at once; other coordinators within 2 s
    c.catalog.reload()
    return info


def set_rule_in(
    sessions: sessionmaker[Session],
    settings: Settings,
    app: str,
    allowed: bool | None,
    cap_given: bool,
    cap: int | None,
    *,
    credit_weight: float | None = None,
    verification: str | None = None,
) -> ContributionSettingInfo:
    """`set_rule` on a store (also the operator's `csml apps contribution`, run where the
    coordinator's settings are; another process's worker-token cache forgets a revoked
    token within its TTL). `verification`: the app's policy (`default`: back to the
    default; None: leave it), effective for claims within the policy cache's 2 s and for
    completions at once."""
    if not tokens.APP_NAME.match(app):
        raise Invalid("invalid_app", f"{app!r} is not an app name (a-z, 0-9, _ and -)")
    if cap is not None and cap < 0:
        raise Invalid("invalid_cap", f"max_workers: {cap} is below 0", field="max_workers")
    policy_given = verification is not None
    policy: str | None = None
    if verification is not None and verification.strip() != "default":
        policy = str(verifying.parse(verification, "verification"))
    with transaction(sessions) as session:
        now_allowed, now_cap = _rule(session, settings.contributions, app)
        now_allowed = now_allowed if allowed is None else allowed
        now_cap = cap if cap_given else now_cap
        found = contributions.setting(session, app)
        if not policy_given:
            policy = found.verification if found is not None else None
        contributions.put_setting(
            session, app, now_allowed, now_cap, utcnow(), policy, credit_weight=credit_weight
        )
        revoked = [] if now_allowed else contributions.live_tokens_for_app(session, app)
        for token_id in revoked:
            tokens.revoke(session, token_id)
        info = _setting_info(session, settings, app)
    forget(revoked)
    return info
