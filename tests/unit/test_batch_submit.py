"""Batch submission (`POST /v1/jobs/batch`, `Client.submit_many`, `Client.map`) against
the coordinator in this process: per-item results, quotas counted per item, the
whole-request refusals, authentication before the body, and `map` using the route."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from csml.apps.echo import app as echo_app
from csml.client import Client, CsmlError, InvalidRequest, NotFound, RateLimited
from csml.client.batch import BATCH_ITEMS
from csml.schemas.batches import MAX_BATCH_ITEMS
from csml.schemas.workers import INLINE_MAX_BYTES
from tests.asgi import http_scope
from tests.unit.conftest import MakeCoordinator
from tests.unit.inproc import BASE_URL, HttpWorker, InProcessCoordinator, error_of

ROUTE = "/v1/jobs/batch"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def echo_item(params: dict[str, Any] | None = None, **inputs: bytes) -> dict[str, Any]:
    spec = {"app": "echo", "operation": "echo", "params": params or {}}
    return {"spec": spec, "inputs": {name: b64(data) for name, data in inputs.items()}}


def post(coordinator: InProcessCoordinator, user: Client, body: Any) -> httpx.Response:
    return coordinator.http.post(
        ROUTE, json=body, headers={"Authorization": f"Bearer {user.token}"}
    )


def run_all(worker: HttpWorker, tmp_path: Path) -> int:
    ran = 0
    while claimed := worker.claim(8):
        for job in claimed:
            assert worker.run(job, tmp_path / "work").status_code == 204
            ran += 1
    return ran


@contextmanager
def serving(worker: HttpWorker, tmp_path: Path) -> Iterator[None]:
    """`worker` runs whatever is queued, in a thread, until the block ends."""
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not run_all(worker, tmp_path):
                stop.wait(0.01)

    thread = threading.Thread(target=serve, name="echo-worker")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_mixed_items_get_their_own_results_and_the_jobs_run(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    user = coordinator.new_user()
    items = [
        echo_item({"n": 0}, data=b"first file"),
        echo_item({"sleep": -1}),  # params out of the schema
        echo_item({}, bogus=b"x"),  # an input the operation does not take
        {"spec": {"app": "echo", "operation": "echo"}, "inputs": {"data": "not base64!"}},
        {"spec": {"app": "echo"}},  # no operation
        echo_item({"n": 5}),
        {"spec": {"app": "nope", "operation": "echo"}},
        {"spec": {"steps": []}},
    ]
    r = post(coordinator, user, {"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["items"]
    assert [x["index"] for x in results] == list(range(len(items)))
    assert (body["accepted"], body["refused"]) == (2, 6)
    ok0, bad_params, bad_input, bad_b64, no_op, ok5, no_app, pipeline = results
    for ok in (ok0, ok5):
        assert ok["status"] == 202 and ok["error"] is None
        assert ok["job"]["state"] == "queued" and ok["job"]["app"] == "echo"
    assert ok0["job"]["inputs"]["data"]["size"] == len(b"first file")
    assert ok0["job"]["params"] == {"n": 0}

    def refused(result: dict[str, Any], status: int, code: str, field: str) -> None:
        assert result["job"] is None and result["status"] == status, result
        assert result["error"]["code"] == code, result
        assert result["error"]["field"] == field, result

    refused(bad_params, 422, "invalid_params", "items.1.spec.params.sleep")
    refused(bad_input, 422, "unknown_input", "items.2.inputs.bogus")
    refused(bad_b64, 422, "invalid_input", "items.3.inputs.data")
    refused(no_op, 422, "invalid_spec", "items.4.spec.operation")
    refused(no_app, 404, "unknown_app", "items.6.spec.app")
    refused(pipeline, 422, "invalid_spec", "items.7.spec.steps")
    # The same item alone is refused the same way.
    alone = coordinator.http.post(
        "/v1/jobs",
        json=items[1]["spec"],
        headers={"Authorization": f"Bearer {user.token}"},
    )
    assert alone.status_code == 422
    assert error_of(alone)["code"] == "invalid_params"
    assert error_of(alone)["field"] == "params.sleep"  # named from the spec

    # The accepted ones are ordinary jobs: they run and their results come back.
    assert run_all(echo_worker, tmp_path) == 2
    first = user.job(ok0["job"]["id"]).wait(timeout=10)
    assert first.state.value == "succeeded" and first.result == {"params": {"sleep": 0.0, "n": 0}}
    assert b"".join(first.iter_output("data")) == b"first file"
    assert user.job(ok5["job"]["id"]).wait(timeout=10).result == {"params": {"sleep": 0.0, "n": 5}}
    assert {j.id for j in user.jobs()} == {ok0["job"]["id"], ok5["job"]["id"]}


def test_a_quota_hit_mid_batch_refuses_only_the_items_over_it(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    coordinator = make_coordinator(max_active_jobs=3)
    worker = coordinator.worker(echo_app)
    user, other = coordinator.new_user(), coordinator.new_user()
    r = post(coordinator, user, {"items": [echo_item({"n": i}) for i in range(5)]})
    assert r.status_code == 200, r.text
    results = r.json()["items"]
    assert [x["status"] for x in results] == [202, 202, 202, 429, 429]
    for over in results[3:]:
        assert over["error"]["code"] == "active_jobs_limit"
        assert over["retry_after"] == coordinator.settings.retry_after_seconds
        assert over["error"]["field"] == f"items.{over['index']}"
    assert len(user.jobs()) == 3
    # Per identity, as for single submissions.
    assert post(coordinator, other, {"items": [echo_item()]}).json()["accepted"] == 1
    # Through the SDK: the refused items are errors in their places, not raised.
    answers = user.submit_many("echo", "echo", [{"params": {"n": 9}}, {}])
    assert all(isinstance(a, RateLimited) for a in answers)
    assert isinstance(answers[0], RateLimited) and answers[0].code == "active_jobs_limit"
    assert run_all(worker, tmp_path) == 4  # 3 of the user's, 1 of the other's
    [job] = user.submit_many("echo", "echo", [{"params": {"n": 9}}])
    assert not isinstance(job, CsmlError) and job.data.params == {"n": 9}


def test_whole_request_refusals_name_the_field_and_submit_nothing(
    coordinator: InProcessCoordinator,
) -> None:
    user = coordinator.new_user()
    too_many = {"items": [echo_item() for _ in range(MAX_BATCH_ITEMS + 1)]}
    r = post(coordinator, user, too_many)
    assert r.status_code == 413, r.text
    assert (error_of(r)["code"], error_of(r)["field"]) == ("too_many_items", "items")

    big = b"x" * (INLINE_MAX_BYTES + 1)
    r = post(coordinator, user, {"items": [echo_item(), echo_item(data=big)]})
    assert r.status_code == 413, r.text
    assert error_of(r)["code"] == "inline_input_too_large"
    assert error_of(r)["field"] == "items.1.inputs.data"
    assert str(INLINE_MAX_BYTES) in error_of(r)["message"]

    for body, field in (({"items": []}, "items"), ({"items": 3}, "items"), ([1], "body")):
        r = post(coordinator, user, body)
        assert r.status_code == 422, r.text
        assert error_of(r)["field"] == field
    r = coordinator.http.post(
        ROUTE,
        content=b'{"items": [',
        headers={"Authorization": f"Bearer {user.token}", "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and error_of(r)["field"] == "body", r.text
    assert user.jobs() == []  # nothing of any refused request was submitted

    at_most = {"items": [echo_item(data=b"y" * INLINE_MAX_BYTES)]}  # the bound itself fits
    assert post(coordinator, user, at_most).json()["accepted"] == 1


def test_the_body_bound_applies_to_the_route(make_coordinator: MakeCoordinator) -> None:
    coordinator = make_coordinator(max_request_bytes=200_000)
    user = coordinator.new_user()
    items = [echo_item(data=b"z" * 60_000) for _ in range(4)]
    r = post(coordinator, user, {"items": items})
    assert r.status_code == 413, r.text
    assert error_of(r)["code"] == "body_too_large"
    assert "CSML_MAX_REQUEST_BYTES" in error_of(r)["message"]
    assert user.jobs() == []


def test_authentication_comes_before_the_body(coordinator: InProcessCoordinator) -> None:
    """Without a valid token the route answers 401 without reading a byte of the body."""
    received: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []
    body = b"x" * 100_000

    async def call(token: str | None) -> None:
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        scope = http_scope("POST", ROUTE, headers, body=body)

        async def receive() -> dict[str, Any]:
            message = {"type": "http.request", "body": body, "more_body": False}
            received.append(message)
            return message

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        await coordinator.app(scope, receive, send)
        await asyncio.sleep(0)

    for token in (None, "not-a-token"):
        received.clear()
        sent.clear()
        coordinator.portal.call(call, token)
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 401
        assert received == [], "the body was read before the caller was authenticated"
    user = coordinator.new_user()
    sent.clear()
    coordinator.portal.call(call, user.token)
    assert received and sent[0]["status"] == 422  # with a token, the (bad) body is read


def test_map_goes_through_the_batch_route(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    """Small files go many per request; a large one alone; order and results kept."""
    counted: list[str] = []

    class Counting(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                counted.append(request.url.path)
            return coordinator.transport.handle_request(request)

    user = Client(BASE_URL, "", transport=Counting(), result_stream=False)
    try:
        user.create_identity()
        files = []
        for i in range(30):
            path = tmp_path / f"in{i:02d}.bin"
            big = INLINE_MAX_BYTES // 6 + 1  # "item 7" x big: over the inline bound
            path.write_bytes(f"item {i}".encode() * (big if i == 7 else 1))
            files.append(path)
        counted.clear()
        with serving(echo_worker, tmp_path):
            batch = user.map("echo", "echo", files, concurrency=40, timeout=30)
    finally:
        user.close()
    assert [i.state for i in batch.items] == ["succeeded"] * 30, [i.error for i in batch.items]
    assert [i.source for i in batch.items] == [str(f) for f in files]
    for i, item in enumerate(batch.items):
        assert item.job is not None and item.job.data.inputs["data"].size == files[i].stat().st_size
    batches = counted.count(ROUTE)
    alone = counted.count("/v1/jobs")
    assert alone == 1, counted  # the file over the inline bound
    assert batches == 1, counted  # the 29 small files in one request (40 may be in flight)
    assert BATCH_ITEMS >= 100


def test_map_keeps_at_most_concurrency_items_in_flight(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    """With the identity's limit at 5 active jobs, `map(concurrency=5)` is never refused
    for it: a batch request carries at most as many items as there are free places."""
    coordinator = make_coordinator(max_active_jobs=5)
    worker = coordinator.worker(echo_app)
    sizes: list[int] = []
    statuses: list[int] = []

    class Inspecting(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = coordinator.transport.handle_request(request)
            if request.url.path == ROUTE:
                sizes.append(len(json.loads(request.content)["items"]))
                statuses.extend(item["status"] for item in response.json()["items"])
            return response

    user = Client(BASE_URL, "", transport=Inspecting(), result_stream=False)
    try:
        user.create_identity()
        with serving(worker, tmp_path):
            batch = user.map("echo", "echo", [b"%d" % i for i in range(20)], concurrency=5)
    finally:
        user.close()
    assert [i.state for i in batch.items] == ["succeeded"] * 20
    assert sum(sizes) == 20 and max(sizes) <= 5, sizes
    assert statuses == [202] * 20  # never over the limit, so never refused


def test_map_falls_back_when_the_coordinator_has_no_batch_route(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    counted: list[str] = []

    class NoBatch(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                counted.append(request.url.path)
            if request.url.path == ROUTE:
                body = b'{"error": {"code": "method_not_allowed", "message": "Method Not Allowed"}}'
                return httpx.Response(405, content=body)
            return coordinator.transport.handle_request(request)

    user = Client(BASE_URL, "", transport=NoBatch(), result_stream=False)
    try:
        user.create_identity()
        counted.clear()
        files = [f"{i}".encode() for i in range(6)]
        jobs = user.submit_many("echo", "echo", [{"files": {"data": f}} for f in files])
        assert all(not isinstance(j, CsmlError) for j in jobs)
        assert counted == [ROUTE] + ["/v1/jobs"] * 6
        assert run_all(echo_worker, tmp_path) == 6
        counted.clear()
        with serving(echo_worker, tmp_path):
            batch = user.map("echo", "echo", files, concurrency=3, timeout=30)
        # One try of the route (405), then every item alone.
        assert counted == [ROUTE] + ["/v1/jobs"] * 6
    finally:
        user.close()
    assert [i.state for i in batch.items] == ["succeeded"] * 6
    assert [i.job.result for i in batch.items if i.job] == [
        {"params": {"sleep": 0.0}} for _ in range(6)
    ]


def test_refused_items_are_errors_in_their_places(
    coordinator: InProcessCoordinator, echo_worker: HttpWorker, tmp_path: Path
) -> None:
    user = coordinator.new_user()
    answers = user.submit_many(
        "echo", "echo", [{"params": {"sleep": -1}}, {"files": {"data": b"ok"}}]
    )
    assert isinstance(answers[0], InvalidRequest)
    assert answers[0].field == "items.0.spec.params.sleep" and answers[0].status == 422
    assert not isinstance(answers[1], CsmlError)
    [gone] = user.submit_many("nope", "echo", [{}])
    assert isinstance(gone, NotFound) and gone.code == "unknown_app"
    # map: an item refused at submission is recorded, the others run.
    with serving(echo_worker, tmp_path):
        batch = user.map("echo", "echo", [b"a", b"b"], params={"sleep": -1}, timeout=30)
    assert [i.state for i in batch.items] == ["refused", "refused"]
    assert all("sleep" in (i.error or "") for i in batch.items)
    with serving(echo_worker, tmp_path):
        batch = user.map("echo", "echo", [b"a", b"b", b"c"], concurrency=2, timeout=30)
    assert [i.state for i in batch.items] == ["succeeded"] * 3


def test_the_spliced_batch_body_is_the_json_of_its_items() -> None:
    """`batch_body` splices each entry's spec JSON and base64 into the body: it must be
    exactly what `json.dumps` makes of the same items (compact, UTF-8 kept), whatever
    the params and input names hold (quotes, backslashes, non-ASCII, controls)."""
    from csml.client.batch import batch_body, batch_entry

    entries = [
        batch_entry("echo", "echo", {"n": 0, "s": 'a "quoted" \\ é ☃ \n'}, {"data": b"first"}),
        batch_entry("echo", "echo", None, {}),
        batch_entry(
            "echo",
            "echo",
            {"x": [1.5, None, True]},
            {'we"ird\\ é': bytes(range(256)), "b": b""},
            limits={"timeout_s": 3},
            requires={"gpu": True},
        ),
    ]
    body = batch_body(entries)
    items = [e.as_json() for e in entries]
    expected = json.dumps({"items": items}, ensure_ascii=False, separators=(",", ":"))
    assert body == expected.encode()
    assert json.loads(body)["items"][2]["inputs"]['we"ird\\ é'] == b64(bytes(range(256)))


def test_batch_entries_carry_standard_base64_of_every_length() -> None:
    """`batch_entry` encodes inputs with pybase64 (`base64_text.encode`), not the
    standard library: its text must be exactly standard padded base64 (what the route's
    strict decoder accepts) for every length modulo 3, a photo-sized input included."""
    import os

    from csml.client.batch import batch_entry

    for size in (0, 1, 2, 3, 4, 5, 57, 58, 59, 48_700, INLINE_MAX_BYTES):
        data = os.urandom(size)
        entry = batch_entry("echo", "echo", None, {"data": data})
        assert entry.inputs == (("data", base64.b64encode(data)),)


def test_items_with_one_spec_are_checked_once_and_stay_jobs_of_their_own(
    coordinator: InProcessCoordinator, monkeypatch: Any
) -> None:
    """The items of a `map` batch share one spec: it is parsed and checked once per
    request (the old route parsed it again for each item), and each item is still a job
    of its own with its own input; an item with the same spec but another input name is
    checked (and refused) on its own."""
    from csml.coordinator import spec_limits

    loads: list[bytes] = []
    real = spec_limits.load_kept

    def counted(raw: bytes, settings: Any) -> Any:
        loads.append(raw)
        return real(raw, settings)

    monkeypatch.setattr(spec_limits, "load_kept", counted)
    user = coordinator.new_user()
    items = [echo_item({"n": 1}, data=f"file {i}".encode()) for i in range(6)]
    items.insert(3, echo_item({"n": 1}, bogus=b"x"))
    r = post(coordinator, user, {"items": items})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    results = r.json()["items"]
    assert [x["status"] for x in results] == [202, 202, 202, 422, 202, 202, 202]
    assert results[3]["error"]["field"] == "items.3.inputs.bogus"
    jobs = [x["job"] for x in results if x["job"] is not None]
    assert len({j["id"] for j in jobs}) == 6
    assert [j["inputs"]["data"]["size"] for j in jobs] == [len(f"file {i}") for i in range(6)]
    assert all(j["params"] == {"n": 1} for j in jobs)
    assert len(loads) == 2  # the spec with `data`, and again with `bogus` (refused)


def test_items_of_an_unusual_shape_are_refused_as_the_model_refuses_them(
    coordinator: InProcessCoordinator,
) -> None:
    user = coordinator.new_user()
    spec = {"app": "echo", "operation": "echo"}
    items: list[Any] = [
        {"spec": spec, "inputs": {"data": 5}},
        {"spec": spec, "extra": 1},
        {"spec": [1]},
        {"inputs": {}},
        [spec],
        {"spec": spec, "inputs": {"data": b64(b"fine")}},
    ]
    r = post(coordinator, user, {"items": items})
    assert r.status_code == 200, r.text
    results = r.json()["items"]
    assert [x["status"] for x in results] == [422, 422, 422, 422, 422, 202]
    assert all(x["error"]["code"] == "invalid_item" for x in results[:5])
    fields = [x["error"]["field"] for x in results[:5]]
    assert fields == [
        "items.0.inputs.data",
        "items.1.extra",
        "items.2.spec",
        "items.3.spec",
        "items.4",
    ]


def test_inline_bytes_reads_a_path_whole_within_the_bound(tmp_path: Path) -> None:
    from csml.client.batch import inline_bytes

    cases = {"empty": b"", "small": b"photo", "bound": b"x" * INLINE_MAX_BYTES}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert inline_bytes(tmp_path / name) == data
        assert inline_bytes(str(tmp_path / name)) == data
    (tmp_path / "over").write_bytes(b"x" * (INLINE_MAX_BYTES + 1))
    assert inline_bytes(tmp_path / "over") is None  # submitted alone
    assert inline_bytes(tmp_path) is None  # a folder: submitted alone, which refuses it
    assert inline_bytes(tmp_path / "missing") is None
