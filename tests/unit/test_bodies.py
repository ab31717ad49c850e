"""Body limits in process: the multipart parser's checks, the spec limits and the
choice of a route's body limit (the real-process tests are in tests/security)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csml.coordinator import spec_limits
from csml.coordinator.config import Settings
from csml.coordinator.errors import status_of
from csml.coordinator.middleware import limit_for
from csml.coordinator.uploads import Accepts, FormLimits, SubmissionParser
from csml.refusals import Invalid, QuotaExceeded, Refusal

BOUNDARY = b"b0undary"


def part(name: str, data: bytes) -> bytes:
    return (
        b"--"
        + BOUNDARY
        + b'\r\nContent-Disposition: form-data; name="'
        + name.encode()
        + b'"\r\n\r\n'
        + data
        + b"\r\n"
    )


def refuse(name: str) -> Invalid:
    return Invalid("unknown_input", f"no {name}", field=name)


def parser(tmp_path: Path, names: set[str], **limits: int) -> SubmissionParser:
    base = {"file_bytes": 1000, "request_bytes": 1500, "parts": 8, "spec_bytes": 100}
    return SubmissionParser(
        BOUNDARY, tmp_path, FormLimits(**{**base, **limits}), lambda raw: Accepts(names, refuse)
    )


def test_parts_are_checked_at_their_headers(tmp_path: Path) -> None:
    p = parser(tmp_path, {"a", "b"})
    with pytest.raises(Refusal) as err:
        p.write(part("spec", b"{}") + part("a", b"x" * 10) + part("zz", b"y" * 500))
    assert err.value.code == "unknown_input" and err.value.field == "zz"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a"]  # nothing of zz


def test_file_before_spec_and_second_spec(tmp_path: Path) -> None:
    with pytest.raises(Refusal) as err:
        parser(tmp_path, {"a"}).write(part("a", b"x") + part("spec", b"{}"))
    assert err.value.code == "spec_not_first"
    with pytest.raises(Refusal) as err:
        parser(tmp_path, {"a"}).write(part("spec", b"{}") + part("spec", b"{}"))
    assert err.value.code == "duplicate_spec"


def test_part_count_and_request_total(tmp_path: Path) -> None:
    names = {f"f{i}" for i in range(10)}
    with pytest.raises(Refusal) as err:
        parser(tmp_path, names, parts=3).write(
            part("spec", b"{}") + b"".join(part(f"f{i}", b"x") for i in range(5))
        )
    assert (status_of(err.value), err.value.code) == (413, "too_many_parts")
    with pytest.raises(Refusal) as err:
        parser(tmp_path, names).write(
            part("spec", b"{}") + part("f1", b"x" * 900) + part("f2", b"x" * 900)
        )
    assert (status_of(err.value), err.value.code) == (413, "request_too_large")


def test_charge_refuses_mid_stream(tmp_path: Path) -> None:
    seen: list[int] = []

    def charge(received: int) -> None:
        seen.append(received)
        if received > 300:
            raise QuotaExceeded("storage_quota", "over")

    p = SubmissionParser(
        BOUNDARY,
        tmp_path,
        FormLimits(10_000, 10_000, 8, 100),
        lambda _: Accepts({"a"}, refuse),
        charge,
    )
    p.write(part("spec", b"{}"))
    p.write(b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="a"\r\n\r\n')
    p.write(b"x" * 200)
    with pytest.raises(Refusal) as err:
        p.write(b"x" * 200)
    assert err.value.code == "storage_quota" and seen == [200, 400]
    assert list(tmp_path.iterdir()) == []  # the partial file is gone


SETTINGS = Settings(data_dir=Path("/nonexistent"))


def test_spec_limits() -> None:
    with pytest.raises(Refusal) as err:
        spec_limits.load(b"[" * 100_000, SETTINGS)
    assert (status_of(err.value), err.value.code) == (400, "too_deeply_nested")
    with pytest.raises(Refusal) as err:
        spec_limits.load(b'{"steps": [{"params": {"t": [1, NaN]}}]}', SETTINGS)
    assert (status_of(err.value), err.value.field) == (422, "spec.steps.0.params.t.1")
    deep: object = 0
    for _ in range(SETTINGS.max_params_depth - 1):  # params itself is one level
        deep = [deep]
    spec_limits.load(json.dumps({"params": {"x": deep}}).encode(), SETTINGS)  # at the cap
    with pytest.raises(Refusal) as err:
        spec_limits.load(json.dumps({"params": {"x": [deep]}}).encode(), SETTINGS)
    assert err.value.code == "too_deeply_nested"
    assert spec_limits.kept_bytes({"params": {}}) == 0
    assert spec_limits.kept_bytes({"params": {"a": 1}}) == len(b'{"a":1}')


def test_route_limits() -> None:
    def size(method: str, path: str, ctype: str = "application/json") -> int:
        return limit_for(SETTINGS, method, path, ctype).size

    assert size("POST", "/v1/identities") == SETTINGS.max_json_bytes
    assert size("POST", "/v1/jobs") == SETTINGS.max_spec_bytes
    assert size("POST", "/v1/jobs", "multipart/form-data") > SETTINGS.max_request_bytes
    assert size("POST", "/v1/workers/{worker_id}/jobs/{job_id}/complete") == (
        SETTINGS.max_worker_json_bytes
    )
    out = "/v1/workers/{worker_id}/jobs/{job_id}/outputs/{name}"
    assert size("PUT", out, "image/png") == SETTINGS.max_output_bytes
