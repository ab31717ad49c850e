"""Parameter schemas a worker announces: checked at registration, validated offline.

The security tests (tests/security/test_row05_worker_binding.py) drive the same
checks through a real coordinator; these name each rule on its own.
"""

from __future__ import annotations

from typing import Any

import pytest
import referencing.exceptions

from csml.coordinator.catalog import MAX_PATTERN_CHARS, params_validator, schema_problem


def obj(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "nonsense"}, "not a valid JSON schema"),
        (obj(n={"$ref": "http://127.0.0.1:1/x.json"}), "points outside the schema"),
        (obj(n={"$ref": "file:///etc/passwd"}), "points outside the schema"),
        (obj(n={"$ref": "other.json#/a"}), "points outside the schema"),
        (obj(n={"$ref": "#/$defs/missing"}), "names nothing"),
        (obj(n={"$ref": "#nowhere"}), "names nothing"),
        ({"$id": "http://example.com/s", **obj(n={"type": "integer"})}, "uses $id"),
        (obj(s={"pattern": r"(a)\1"}), "RE2"),
        (obj(s={"pattern": r"(?=a)a"}), "RE2"),
        (obj(s={"pattern": "a" * (MAX_PATTERN_CHARS + 1)}), "over"),
        ({"type": "object", "patternProperties": {r"(?<=x)y": {}}}, "RE2"),
    ],
)
def test_refused(schema: dict[str, Any], says: str) -> None:
    problem = schema_problem(schema)
    assert problem is not None and says in problem, problem


@pytest.mark.parametrize(
    "schema",
    [
        obj(n={"type": "integer", "minimum": 1}),
        {**obj(n={"$ref": "#/$defs/n"}), "$defs": {"n": {"type": "integer"}}},
        {**obj(n={"$ref": "#num"}), "$defs": {"n": {"$anchor": "num", "type": "integer"}}},
        obj(s={"type": "string", "pattern": r"^(a|a)*$"}),
        {"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
    ],
)
def test_accepted(schema: dict[str, Any]) -> None:
    assert schema_problem(schema) is None


def test_validation_fetches_nothing() -> None:
    """A schema stored before checks existed: its remote ref is unresolvable, not fetched."""
    validator = params_validator(obj(n={"$ref": "http://127.0.0.1:1/x.json"}))
    with pytest.raises(referencing.exceptions.Unresolvable):
        list(validator.iter_errors({"n": 1}))


def test_patterns_match_with_re2() -> None:
    validator = params_validator(
        {
            "type": "object",
            "properties": {"s": {"pattern": r"^(a|a)*$"}},
            "patternProperties": {"^(b|b)*$": {"type": "integer"}},
            "additionalProperties": False,
        }
    )
    # Exponential for a backtracking engine; linear under RE2.
    errors = list(validator.iter_errors({"s": "a" * 5000 + "!", "b" * 5000: "x", "c": 1}))
    messages = sorted(e.message for e in errors)
    assert len(errors) == 3, messages
    assert any("does not match" in m for m in messages)
    assert any("is not of type 'integer'" in m for m in messages)
    assert any("'c'" in m for m in messages)
    assert list(validator.iter_errors({"s": "aaaa", "bb": 2})) == []
