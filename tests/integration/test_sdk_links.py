"""The SDK's JSON submissions over pooled keep-alive links (`csml.link`): the same
answers and errors as through httpx, connections reused, closed with the client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from csml.client import Client
from csml.client.errors import InvalidRequest, QueueFull, Unreachable
from csml.schemas import Job as JobData
from tests.integration.keepalive import Answer, KeepAliveServer, serving

JOB = JobData(
    id="j1",
    app="echo",
    operation="echo",
    params={"i": 1},
    state="queued",
    created_at=datetime.now(UTC),
    max_attempts=3,
).model_dump_json()


def _answer(srv: KeepAliveServer, path: str, body: bytes, port: int) -> Answer:
    """A queued job; operation `full`: 429 with Retry-After; `bad`: 422 naming a field."""
    sent = json.loads(body)
    if path == "/v1/jobs/batch":  # item 1 refused as full, the others accepted
        results = [
            {"index": i, "status": 202, "job": json.loads(JOB)}
            if i != 1
            else {
                "index": i,
                "status": 429,
                "error": {"code": "queue_full", "message": "full"},
                "retry_after": 3,
            }
            for i in range(len(sent["items"]))
        ]
        answer = {"items": results, "accepted": len(results) - 1, "refused": 1}
        return 200, {}, json.dumps(answer).encode()
    operation = sent["operation"]
    if operation == "full":
        return (
            429,
            {"Retry-After": "7"},
            (b'{"error":{"code":"queue_full","message":"the queue is full"}}'),
        )
    if operation == "bad":
        return 422, {}, b'{"error":{"code":"invalid_spec","message":"no","field":"spec.x"}}'
    return 201, {}, JOB.encode()


@pytest.fixture
def server() -> Iterator[KeepAliveServer]:
    with serving(_answer) as srv:
        yield srv


def _client(srv: KeepAliveServer) -> Client:
    return Client(srv.url, "tok", result_stream=False)


def test_submissions_reuse_one_connection_and_say_the_same(server: KeepAliveServer) -> None:
    client = _client(server)
    jobs = [client.submit("echo", "echo", params={"i": i}) for i in range(3)]
    assert [j.id for j in jobs] == ["j1"] * 3
    assert server.connections == 1
    assert [(p, a) for p, a, _ in server.seen] == [("/v1/jobs", "Bearer tok")] * 3
    assert json.loads(server.seen[0][2]) == {"app": "echo", "operation": "echo", "params": {"i": 0}}
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.submit("echo", "echo")


def test_refusals_keep_their_codes_fields_and_retry_after(server: KeepAliveServer) -> None:
    client = _client(server)
    with pytest.raises(QueueFull) as full:
        client.submit("echo", "full")
    assert (full.value.status, full.value.retry_after) == (429, 7.0)
    with pytest.raises(InvalidRequest) as bad:
        client.submit("echo", "bad")
    assert (bad.value.code, bad.value.field) == ("invalid_spec", "spec.x")
    client.close()


def test_nan_is_refused_before_sending_as_through_httpx(server: KeepAliveServer) -> None:
    client = _client(server)
    with pytest.raises(ValueError):
        client.submit("echo", "echo", params={"x": float("nan")})
    assert server.seen == []
    client.close()


def test_a_coordinator_that_is_gone_is_unreachable(server: KeepAliveServer) -> None:
    client = _client(server)
    server.shutdown()
    server.server_close()
    with pytest.raises(Unreachable, match="cannot reach the coordinator"):
        client.submit("echo", "echo")
    client.close()


def test_batch_submissions_share_the_links(server: KeepAliveServer) -> None:
    """`submit_many` (and so `map`, `csml batch`) posts its batches over the pooled link
    that single submissions use, and reads each item's answer from it."""
    client = _client(server)
    client.submit("echo", "echo")
    items = [{"params": {"i": i}, "files": {"data": f"input {i}".encode()}} for i in range(3)]
    answers = client.submit_many("echo", "echo", items)
    assert server.connections == 1
    assert [p for p, _, _ in server.seen] == ["/v1/jobs", "/v1/jobs/batch"]
    sent = json.loads(server.seen[1][2])["items"]
    assert [i["inputs"] for i in sent] == [
        {"data": "aW5wdXQg" + t} for t in ("MA==", "MQ==", "Mg==")
    ]
    assert [a.id for a in answers if not isinstance(a, Exception)] == ["j1", "j1"]
    assert isinstance(answers[1], QueueFull) and answers[1].retry_after == 3.0
    client.close()
