"""Issue 12, row 5: workers are bound to their apps; the catalog cannot be hijacked.

Against a real coordinator (its installed apps echo and opencv pin their versions
at start): a join token made for opencv cannot register an echo worker (403) and
its opencv worker never claims echo jobs; a second manifest under a pinned version
is refused (409) and the catalog is unchanged; a new version needs a token made
with --publish, and revoking that token withdraws the version; a parameter schema
with a `$ref` to a local HTTP server (or file://) is refused with a 4xx and the
server sees no request; a catastrophic-backtracking pattern is refused or matched
in bounded time (RE2). Before the fix: 201 for every registration, the manifest
replaced, the URL fetched on every submission, 3 s+ per validation.
"""

from __future__ import annotations

import copy
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cluster import Cluster, running_cluster, wait_for
from tests.security.workers import HttpWorker, manifest, register

OPERATOR_TOKEN = "csmlop_row05_" + "x" * 32


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    settings = {"CSML_OPERATOR_TOKEN": OPERATOR_TOKEN}
    with running_cluster(tmp_path_factory.mktemp("row05"), settings) as cluster:
        yield cluster


def join_token(cluster: Cluster, *args: str) -> str:
    return cluster.csml("join-token", "create", *args).stdout.strip()


def catalog(cluster: Cluster, app: str) -> dict[str, Any]:
    r = httpx.get(f"{cluster.url}/v1/apps/{app}", timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def manifest_of(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("name", "version", "description", "operations")}


def hostile(base: dict[str, Any], version: str | None = None, **schema: Any) -> dict[str, Any]:
    """`base` with another parameter schema for its first operation (and `version`)."""
    forged = copy.deepcopy(base)
    if version is not None:
        forged["version"] = version
    forged["operations"][0]["params_schema"] = {"type": "object", **schema}
    return forged


class CountingServer:
    """A local HTTP server that counts the requests it gets (it should get none)."""

    def __init__(self) -> None:
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                body = b'{"type": "string"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/x.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_token_for_opencv_cannot_serve_echo(cluster: Cluster) -> None:
    token = join_token(cluster, "--app", "opencv", "--label", "opencv only")
    r = register(cluster.url, token, manifest("echo"))
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "app_not_allowed"
    assert "--app echo" in r.json()["error"]["message"]
    # Its opencv worker joins, and claims only opencv jobs: never the queued echo job.
    worker = HttpWorker.join(cluster.url, token, "opencv")
    user = cluster.new_user()
    job = user.submit("echo", "echo", params={"n": 1})
    r = worker.claim()
    assert r.status_code == 200 and r.json()["jobs"] == []
    assert user.job(job.id).state.value == "queued"
    user.job(job.id).cancel()
    # The operator's API binds tokens the same way, and refuses a token naming no app.
    op = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    api = f"{cluster.url}/v1/operator/join-tokens"
    assert httpx.post(api, json={"label": "x"}, headers=op).status_code == 422
    created = httpx.post(api, json={"apps": ["opencv"]}, headers=op)
    assert created.status_code == 201, created.text
    r = register(cluster.url, created.json()["token"], manifest("echo"))
    assert r.status_code == 403, r.text
    rows = {t["id"]: t for t in httpx.get(api, headers=op).json()["tokens"]}
    assert rows[created.json()["id"]]["apps"] == ["opencv"]
    assert [t for t in rows.values() if t["apps"] is None]  # the tests' --any-app token


def test_a_pinned_version_cannot_be_replaced(cluster: Cluster) -> None:
    token = join_token(cluster, "--app", "echo", "--publish")  # even a publishing token
    before = catalog(cluster, "echo")
    forged = hostile(manifest("echo"), properties={"n": {"type": "string"}})
    r = register(cluster.url, token, forged)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "manifest_conflict"
    assert manifest_of(catalog(cluster, "echo")) == manifest_of(before)
    # The same manifest joins fine.
    HttpWorker.join(cluster.url, token, "echo")


def test_a_new_version_needs_a_publishing_token_and_leaves_with_it(cluster: Cluster) -> None:
    before = catalog(cluster, "echo")
    plain = join_token(cluster, "--app", "echo")
    newer = hostile(manifest("echo"), version="99.0", properties={"n": {"type": "integer"}})
    r = register(cluster.url, plain, newer)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "version_not_approved"
    assert "--publish" in r.json()["error"]["message"]
    assert manifest_of(catalog(cluster, "echo")) == manifest_of(before)

    publisher = join_token(cluster, "--app", "echo", "--publish", "--label", "publisher")
    HttpWorker.join(cluster.url, publisher, newer)
    assert catalog(cluster, "echo")["version"] == "99.0"
    # Revoking the token withdraws what only it registered: back to the pinned 1.x.
    token_id = next(
        line.split()[0]
        for line in cluster.csml("join-token", "list").stdout.splitlines()
        if line.rstrip().endswith("publisher")
    )
    cluster.csml("join-token", "revoke", token_id)
    # The CLI writes the store; a coordinator re-reads its catalog within seconds.
    wait_for(lambda: catalog(cluster, "echo")["version"] == before["version"], timeout=30)
    assert manifest_of(catalog(cluster, "echo")) == manifest_of(before)


@pytest.mark.parametrize("scheme", ["http", "file"])
def test_a_remote_ref_is_refused_and_never_fetched(cluster: Cluster, scheme: str) -> None:
    server = CountingServer()
    try:
        ref = server.url if scheme == "http" else "file:///etc/passwd"
        app = f"ref{scheme}"
        token = join_token(cluster, "--app", app, "--publish")
        base = manifest("echo")
        base["name"] = app
        forged = hostile(base, properties={"n": {"$ref": ref}})
        r = register(cluster.url, token, forged)
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["code"] == "invalid_manifest"
        assert "$ref" in r.json()["error"]["message"]
        assert httpx.get(f"{cluster.url}/v1/apps/{app}").status_code == 404
        # A $ref inside the document is fine.
        local = hostile(base, properties={"n": {"$ref": "#/$defs/n"}})
        local["operations"][0]["params_schema"]["$defs"] = {"n": {"type": "integer"}}
        HttpWorker.join(cluster.url, token, local)
        user = cluster.new_user()
        r = httpx.post(
            f"{cluster.url}/v1/jobs",
            json={
                "app": app,
                "operation": base["operations"][0]["name"],
                "params": {"n": "x"},
            },
            headers={"Authorization": f"Bearer {user.token}"},
        )
        assert r.status_code == 422 and r.json()["error"]["field"] == "params.n", r.text
        assert server.requests == 0
    finally:
        server.close()


def test_a_catastrophic_pattern_is_refused_or_bounded(cluster: Cluster) -> None:
    token = join_token(cluster, "--app", "regexapp")
    base = manifest("echo")
    base["name"] = "regexapp"
    # A backreference or lookaround cannot be matched in linear time: refused.
    r = register(cluster.url, token, hostile(base, properties={"s": {"pattern": r"^(a)\1$"}}))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_manifest", r.text
    # Nested quantifiers are matched by RE2 in linear time.
    HttpWorker.join(cluster.url, token, hostile(base, properties={"s": {"pattern": r"^(a|a)*$"}}))
    user = cluster.new_user()
    op = base["operations"][0]["name"]
    # Python's re takes minutes on this (2**40 paths); here it is one quick refusal.
    r = httpx.post(
        f"{cluster.url}/v1/jobs",
        json={"app": "regexapp", "operation": op, "params": {"s": "a" * 40 + "!"}},
        headers={"Authorization": f"Bearer {user.token}"},
        timeout=60,
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "params.s"
