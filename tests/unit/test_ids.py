from __future__ import annotations

import os
import re

import pytest

from csml import ids


def test_new_id_is_64_lowercase_hex_with_a_non_numeric_short_form() -> None:
    for _ in range(200):
        value = ids.new_id()
        assert re.fullmatch(r"[0-9a-f]{64}", value)
        assert not value[:12].isdigit()


def test_new_id_draws_again_while_the_short_form_is_numeric(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draws = iter(["123456789012" + "a" * 52, "0" * 64, "abc" + "1" * 61])
    monkeypatch.setattr(ids._DRAWS, "take", lambda: bytes.fromhex(next(draws)))
    assert ids.new_id() == "abc" + "1" * 61


def test_new_ids_come_from_one_csprng_call_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(ids, "_DRAWS", ids._Draws())
    monkeypatch.setattr(os, "urandom", urandom)
    made = {ids.new_id() for _ in range(3 * ids._Draws.BATCH)}
    assert len(made) == 3 * ids._Draws.BATCH  # every draw used once
    # A redraw (a numeric short form) is rare: at most one batch more.
    assert len(calls) in (3, 4) and set(calls) == {ids._Draws.SIZE * ids._Draws.BATCH}


def test_a_forked_child_never_repeats_its_parents_ids() -> None:
    ids.new_id()  # the parent holds undrawn bytes of its batch
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, ids.new_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child != ids.new_id()


def test_secrets_are_hashed_not_kept() -> None:
    token = ids.new_secret("csml")
    assert token.startswith("csml_") and len(token) > 40
    assert ids.hash_secret(token) != token
    assert len(ids.hash_secret(token)) == 64


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("a" * 12, True),
        ("a" * 64, True),
        ("a" * 11, False),
        ("a" * 65, False),
        ("g" * 12, False),
        ("../" + "a" * 12, False),
        ("A" * 12, False),
    ],
)
def test_id_prefix_rule(text: str, ok: bool) -> None:
    assert ids.is_id_prefix(text) is ok
