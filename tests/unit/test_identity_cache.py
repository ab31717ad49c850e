"""Cheap requests: the identity token is remembered briefly (no query per request), an
erasure ends it at once (here, and when relayed from another coordinator), a job is
loaded once per GET, and queue positions are computed only when asked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from csml.coordinator.identity_cache import ERASED_PREFIX
from csml.coordinator.state import Core
from tests.unit.inproc import InProcessCoordinator


def core_of(coordinator: InProcessCoordinator) -> Core:
    c: Core = coordinator.app.state.core
    return c


@contextmanager
def statements(coordinator: InProcessCoordinator) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(str(args[2]))

    engine = core_of(coordinator).engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_known_token_needs_no_query(coordinator: InProcessCoordinator) -> None:
    user = coordinator.new_user()
    assert user.token
    assert coordinator.http.get("/v1/identities/me", headers=auth(user.token)).status_code == 200
    with statements(coordinator) as seen:
        r = coordinator.http.get("/v1/identities/me", headers=auth(user.token))
    assert r.status_code == 200 and seen == []


def test_an_erased_identity_is_refused_at_once(coordinator: InProcessCoordinator) -> None:
    user = coordinator.new_user()
    assert user.token
    assert coordinator.http.get("/v1/identities/me", headers=auth(user.token)).status_code == 200
    assert coordinator.http.delete("/v1/identities/me", headers=auth(user.token)).status_code == 204
    r = coordinator.http.get("/v1/identities/me", headers=auth(user.token))
    assert r.status_code == 401


def test_an_erasure_relayed_from_another_coordinator_forgets_the_token(
    coordinator: InProcessCoordinator,
) -> None:
    user = coordinator.new_user()
    assert user.token
    me = coordinator.http.get("/v1/identities/me", headers=auth(user.token)).json()
    c = core_of(coordinator)
    assert len(c.identities) == 1

    async def relayed() -> None:  # what PgRelay hands the notifier on the event loop
        c.notifier._deliver(ERASED_PREFIX + me["id"])

    coordinator.portal.call(relayed)
    assert len(c.identities) == 0


def test_a_get_loads_the_job_once_and_positions_only_when_asked(
    coordinator: InProcessCoordinator,
) -> None:
    user = coordinator.new_user()
    assert user.token
    r = coordinator.http.post(
        "/v1/jobs",
        json={"app": "echo", "operation": "echo", "params": {"word": "hi"}},
        headers=auth(user.token),
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with statements(coordinator) as seen:
        plain = coordinator.http.get(f"/v1/jobs/{job_id}", headers=auth(user.token)).json()
    assert plain["state"] == "queued" and plain["queue_position"] is None
    job_selects = [s for s in seen if s.lstrip().upper().startswith("SELECT") and "FROM jobs" in s]
    assert len(job_selects) == 1, seen
    asked = coordinator.http.get(
        f"/v1/jobs/{job_id}", params={"positions": "true"}, headers=auth(user.token)
    ).json()
    assert asked["queue_position"] == 1
    listed = coordinator.http.get(
        "/v1/jobs", params={"positions": "true"}, headers=auth(user.token)
    ).json()
    assert listed["jobs"][0]["queue_position"] == 1
