"""The store of user models: found only by their owner, by id or unique prefix, as
refusals (no status codes); and the catalog's refusals mapped to their statuses."""

from __future__ import annotations

from dataclasses import replace

import pytest

from csml import ids
from csml.coordinator.errors import status_of
from csml.refusals import Invalid, Malformed, NotFound
from csml.store import models
from csml.store.db import transaction
from csml.store.models import StoredModel
from csml.store.tables import Identity, utcnow
from tests.unit.conftest import MakeCoordinator


def a_model(owner_id: str, model_id: str) -> StoredModel:
    return StoredModel(
        id=model_id,
        owner_id=owner_id,
        app="echo",
        kind="table",
        format="csv",
        format_version=1,
        name="model",
        operation=None,
        job_id=None,
        size=3,
        sha256="0" * 64,
        media_type="text/csv",
        blob=f"models/{model_id[:2]}/{model_id}/model",
        metrics={"accuracy": 0.5},
        created_at=utcnow(),
    )


def test_models_are_found_by_their_owner_only(make_coordinator: MakeCoordinator) -> None:
    sessions = make_coordinator().core.sessions
    alice, bob = ids.new_id(), ids.new_id()
    first = "ab" * 6 + ids.new_id()[12:]
    second = "ab" * 6 + ids.new_id()[12:]  # shares its first 12 characters with `first`
    with transaction(sessions) as session:
        for owner in (alice, bob):
            session.add(Identity(id=owner, token_hash=owner, created_at=utcnow()))
        session.flush()
        models.add(session, a_model(alice, first))
        models.add(session, a_model(alice, second))
    with sessions() as session:
        expected = a_model(alice, first)
        mine = models.find_owned(session, alice, first)
        assert replace(mine, created_at=expected.created_at) == expected
        found = models.find_owned(session, alice, second[:20])
        assert found.id == second and found.metrics == {"accuracy": 0.5}
        assert [m.id for m in models.list_owned(session, alice)] == [second, first]
        assert models.list_owned(session, bob) == []
        with pytest.raises(NotFound) as hidden:
            models.find_owned(session, bob, first)  # another identity's: not found
        assert hidden.value.message == NotFound.of("model", first).message
        with pytest.raises(NotFound):
            models.find_owned(session, alice, "not an id")
        with pytest.raises(Malformed) as ambiguous:
            models.find_owned(session, alice, first[:12])
        assert ambiguous.value.code == "ambiguous_id"
        assert status_of(ambiguous.value) == 400
    with transaction(sessions) as session:
        with pytest.raises(NotFound):
            models.delete_owned(session, bob, first)
        assert models.delete_owned(session, alice, first[:20]).id == first
    with sessions() as session:
        assert [m.id for m in models.list_owned(session, alice)] == [second]
        assert replace(models.find_owned(session, alice, second), blob="x").blob == "x"


def test_the_catalog_refuses_with_refusals_of_their_kind(
    make_coordinator: MakeCoordinator,
) -> None:
    catalog = make_coordinator().core.catalog
    with pytest.raises(NotFound) as unknown:
        catalog.get("no-such-app")
    assert unknown.value.code == "unknown_app" and status_of(unknown.value) == 404
    with pytest.raises(Invalid) as bad:
        catalog.check_params("echo", "spin", {"seconds": "not a number"})
    assert bad.value.code == "invalid_params" and status_of(bad.value) == 422
    assert bad.value.details
