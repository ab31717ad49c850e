"""The cap on contributed workers holds on PostgreSQL when registrations race: each
counts the app's live contributed workers after locking the app's row, so of several
concurrent registrations past the cap exactly the ones that fit commit."""

from __future__ import annotations

import threading

from csml import ids
from csml.apps.echo import app as echo_app
from csml.coordinator import contributions
from csml.coordinator.state import Core
from csml.coordinator.tokens import NewJoinToken
from csml.refusals import Conflict
from csml.store import workers
from csml.store.db import transaction
from csml.store.tables import Worker, utcnow
from tests.integration.postgres.support import MakeCore, new_identity


def contributed_token(core: Core, identity: str) -> workers.JoinTokenRow:
    token = ids.new_secret("csmljoin")
    with transaction(core.sessions) as session:
        NewJoinToken(
            id=ids.new_id(),
            token=token,
            label="",
            apps=["echo"],
            may_publish=False,
            contributor_id=identity,
        ).store(session)
    with core.engine.connect() as conn:
        found = workers.join_token_by_hash(conn, ids.hash_secret(token))
    assert found is not None and found.contributor_id == identity
    return found


def test_racing_registrations_never_pass_the_cap(make_core: MakeCore) -> None:
    cores = [make_core(contributions=True) for _ in range(2)]
    contributions.set_rule_in(cores[0].sessions, cores[0].settings, "echo", True, True, 2)
    tokens = [contributed_token(cores[0], new_identity(cores[0])) for _ in range(6)]
    manifest = echo_app.manifest()
    start = threading.Barrier(len(tokens))
    results: list[str] = []
    lock = threading.Lock()

    def register(i: int) -> None:
        core = cores[i % 2]  # two coordinators, one database
        start.wait()
        try:
            with transaction(core.sessions) as session:
                core.catalog.register(session, manifest, tokens[i])
                now = utcnow()
                session.add(
                    Worker(
                        id=ids.new_id(),
                        token_hash=ids.hash_secret(ids.new_secret("csmlw")),
                        join_token_id=tokens[i].id,
                        app="echo",
                        app_version=manifest.version,
                        slots=1,
                        sandbox="none",
                        registered_at=now,
                        last_heartbeat=now,
                    )
                )
            outcome = "joined"
        except Conflict as exc:
            outcome = exc.code
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(tokens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["contributed_workers_full"] * 4 + ["joined"] * 2
    assert contributions.worker_counts(cores[1]) == {"echo": (0, 2)}
