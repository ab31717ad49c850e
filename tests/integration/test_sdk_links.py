"""The SDK's JSON submissions over pooled keep-alive links (`csml.link`): the same
answers and errors as through httpx, connections reused, closed with the client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from csml.client import Client
from csml.client.errors import InvalidRequest, QueueFull, Unreachable
from csml.schemas import Job as JobData

JOB = JobData(
    id="j1",
    app="echo",
    operation="echo",
    params={"i": 1},
    state="queued",
    created_at=datetime.now(UTC),
    max_attempts=3,
).model_dump_json()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, self.headers["Authorization"], body))
        status, headers, answer = 201, {}, JOB.encode()
        if body["operation"] == "full":
            status, headers = 429, {"Retry-After": "7"}
            answer = b'{"error":{"code":"queue_full","message":"the queue is full"}}'
        elif body["operation"] == "bad":
            status = 422
            answer = b'{"error":{"code":"invalid_spec","message":"no","field":"spec.x"}}'
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, str, dict[str, object]]] = []
        self.connections = 0


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _client(srv: _Server) -> Client:
    return Client(f"http://127.0.0.1:{srv.server_address[1]}", "tok", result_stream=False)


def test_submissions_reuse_one_connection_and_say_the_same(server: _Server) -> None:
    client = _client(server)
    jobs = [client.submit("echo", "echo", params={"i": i}) for i in range(3)]
    assert [j.id for j in jobs] == ["j1"] * 3
    assert server.connections == 1
    assert [(p, a) for p, a, _ in server.seen] == [("/v1/jobs", "Bearer tok")] * 3
    assert server.seen[0][2] == {"app": "echo", "operation": "echo", "params": {"i": 0}}
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.submit("echo", "echo")


def test_refusals_keep_their_codes_fields_and_retry_after(server: _Server) -> None:
    client = _client(server)
    with pytest.raises(QueueFull) as full:
        client.submit("echo", "full")
    assert (full.value.status, full.value.retry_after) == (429, 7.0)
    with pytest.raises(InvalidRequest) as bad:
        client.submit("echo", "bad")
    assert (bad.value.code, bad.value.field) == ("invalid_spec", "spec.x")
    client.close()


def test_nan_is_refused_before_sending_as_through_httpx(server: _Server) -> None:
    client = _client(server)
    with pytest.raises(ValueError):
        client.submit("echo", "echo", params={"x": float("nan")})
    assert server.seen == []
    client.close()


def test_a_coordinator_that_is_gone_is_unreachable(server: _Server) -> None:
    client = _client(server)
    server.shutdown()
    server.server_close()
    with pytest.raises(Unreachable, match="cannot reach the coordinator"):
        client.submit("echo", "echo")
    client.close()
