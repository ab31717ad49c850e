from __future__ import annotations

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
    monkeypatch.setattr("csml.ids.secrets.token_hex", lambda n: next(draws))
    assert ids.new_id() == "abc" + "1" * 61


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
