"""What the web framework costs per request on the coordinator's hot routes.

In one process and one event loop, without sockets or uvicorn: the real app
(`create_app`, SQLite in a temporary folder) is called as an ASGI app for each hot
request of a no-op job (submit, claim, batched complete, GET, an empty claim, a batch
submission of 25 jobs), and the same work is then done by calling the services those
routes call (the same queue methods, views and JSON encoding; the same writer and
store; a batch's work in the thread pool, as its route does it). The difference per
request is the framework's own share: routing, dependencies and authentication
plumbing, body parsing and validation, response models, the middleware. CPU time is
the event loop thread's, per request (the writer thread's commits are the same either
way and left out), median over every request of every round: a busy machine delays a
request but charges few others' CPU to it.

    /work/venv/bin/python bench/request_cost.py [--jobs 300] [--rounds 3] [--calls]

With `--calls`, the steps also run under cProfile and the table adds the Python
function calls per request, app and framework (app minus services): a count, not a
time, so it compares two trees on a busy machine (the times do not profile).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.asgi

from starlette.concurrency import run_in_threadpool
from tests.asgi import http_scope, receive_once

from csml import ids
from csml.apps.echo import app as echo_app
from csml.client import pow
from csml.coordinator.api_batches import _submit as submit_batch
from csml.coordinator.app import create_app
from csml.coordinator.config import Settings
from csml.coordinator.views import job_views
from csml.schemas import JobSpec
from csml.schemas.workers import BatchedCompletion, ClaimResponse
from csml.store import workers as worker_store
from csml.store.db import counters, sqlite_url

OPERATOR = "bench-operator-token"
BATCH = 25  # jobs per batch submission, as Client.submit_many sends them
BATCH_ROUTE = f"batch ({BATCH} jobs)"
Headers = dict[str, str]


async def call(
    app: Any, method: str, path: str, headers: Headers, body: bytes = b"", query: str = ""
) -> tuple[int, bytes]:
    """One request through the ASGI app; (status, body)."""
    if body:
        headers = {**headers, "content-type": "application/json"}
    scope = http_scope(method, path, headers, body=body, query=query)
    receive = receive_once(body)
    status = 0
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def profile_round(path: str, step: Callable[[], Awaitable[Any]]) -> None:
    """Run `step` once more under cProfile, into `path` (nothing if `path` is empty)."""
    if not path:
        return
    profile = cProfile.Profile()
    profile.enable()
    await step()
    profile.disable()
    profile.dump_stats(path)


async def measure(n: int, step: Callable[[int], Awaitable[None]]) -> list[float]:
    """CPU microseconds of this thread (the event loop's) for each call of `step`."""
    spent = []
    for i in range(n):
        start = time.thread_time_ns()
        await step(i)
        spent.append((time.thread_time_ns() - start) / 1000)
    return spent


async def counted(
    n: int, step: Callable[[int], Awaitable[None]], calls: list[float]
) -> list[float]:
    """`measure` under cProfile; appends the Python calls per step to `calls`."""
    profile = cProfile.Profile()
    profile.enable()
    try:
        spent = await measure(n, step)
    finally:
        profile.disable()
    calls.append(pstats.Stats(profile).total_calls / n)  # type: ignore[attr-defined]
    return spent


async def app_with_identity(root: Path) -> tuple[Any, dict[str, str], str]:
    """A coordinator app on SQLite under `root` (no limits in the way, notifier bound to
    the running loop) and a new identity: (app, its Authorization header, its id)."""
    settings = Settings(
        data_dir=root / "data",
        database_url=sqlite_url(root / "data"),
        pow_difficulty=0,
        operator_token=OPERATOR,
        submission_rate_limit=0,
        max_active_jobs=0,
        identity_rate_limit=0,
    )
    app = create_app(settings)
    app.state.core.notifier.bind(asyncio.get_running_loop())
    status, body = await call(app, "POST", "/v1/identities/challenge", {})
    issued = json.loads(body)
    nonce = pow.solve(issued["challenge"], issued["difficulty"])
    proof = json.dumps({"challenge": issued["challenge"], "nonce": nonce}).encode()
    status, body = await call(app, "POST", "/v1/identities", {}, proof)
    assert status == 201, body
    return app, {"Authorization": f"Bearer {json.loads(body)['token']}"}, json.loads(body)["id"]


async def run(jobs: int, rounds: int, calls: bool = False) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="csml-request-cost-"))
    app, user, owner = await app_with_identity(root)
    c = app.state.core
    op = {"Authorization": f"Bearer {OPERATOR}"}
    status, body = await call(
        app,
        "POST",
        "/v1/operator/join-tokens",
        op,
        json.dumps({"label": "bench", "apps": ["echo"], "publish": True}).encode(),
    )
    assert status == 201, body
    join = {"Authorization": f"Bearer {json.loads(body)['token']}"}
    manifest = echo_app.manifest().model_dump(mode="json")
    reg = json.dumps({"app": manifest, "slots": 8, "sandbox": "none"}).encode()
    status, body = await call(app, "POST", "/v1/workers", join, reg)
    assert status == 201, body
    registered = json.loads(body)
    wid = registered["worker_id"]
    worker = {"Authorization": f"Bearer {registered['worker_token']}"}
    with c.engine.connect() as conn:
        found = worker_store.worker_by_token(conn, ids.hash_secret(registered["worker_token"]))
    assert found is not None
    me = found.worker
    spec_body = json.dumps({"app": "echo", "operation": "echo", "params": {"i": 1}}).encode()
    claim_body = json.dumps({"max_jobs": 1, "wait": 0}).encode()
    batch_item = {"spec": {"app": "echo", "operation": "echo", "params": {"i": 1}}}
    batch_body = json.dumps({"items": [batch_item] * BATCH}).encode()
    batches = max(20, jobs // 10)  # requests of the batch route per round and way

    results: dict[str, dict[str, list[float]]] = {}

    counts: dict[str, dict[str, list[float]]] = {}

    def note(route: str, how: str, us: list[float]) -> None:
        results.setdefault(route, {}).setdefault(how, []).extend(us)

    async def timed(
        route: str, how: str, step: Callable[[int], Awaitable[None]], n: int = jobs
    ) -> None:
        if calls and rounds_done == 0:  # an extra first round, counted and not timed
            await counted(n, step, counts.setdefault(route, {}).setdefault(how, []))
        else:
            note(route, how, await measure(n, step))

    async def drain() -> None:
        """Run the batches' jobs to their end (untimed): the next claims find none."""
        while True:
            answer = await c.queue.claim_and_beat_async(me, 8, None, wait=0.0)
            if not answer.jobs:
                return
            done = [
                BatchedCompletion(
                    job_id=j.id, lease_id=j.lease_id, state="succeeded", result={"ok": True}
                )
                for j in answer.jobs
            ]
            await c.queue.complete_many_async(me, done)

    rounds_done = 0

    async def one_round() -> None:
        # -- through the app ------------------------------------------------------
        made: list[str] = []
        claimed: list[dict[str, Any]] = []

        async def submit(_: int) -> None:
            s, b = await call(app, "POST", "/v1/jobs", user, spec_body)
            assert s == 202, b
            made.append(json.loads(b)["id"])

        async def claim(_: int) -> None:
            s, b = await call(app, "POST", f"/v1/workers/{wid}/claim", worker, claim_body)
            assert s == 200, b
            claimed.extend(json.loads(b)["jobs"])

        async def complete(i: int) -> None:
            j = claimed[i]
            done = {"job_id": j["id"], "lease_id": j["lease_id"], "state": "succeeded"}
            payload = json.dumps({"completions": [{**done, "result": {"ok": True}}]}).encode()
            s, b = await call(app, "POST", f"/v1/workers/{wid}/complete", worker, payload)
            assert s == 200 and b'"status":204' in b, b

        async def get(i: int) -> None:
            s, b = await call(app, "GET", f"/v1/jobs/{made[i]}", user)
            assert s == 200, b

        async def empty(_: int) -> None:
            s, b = await call(app, "POST", f"/v1/workers/{wid}/claim", worker, claim_body)
            assert s == 200 and b'"jobs":[]' in b, b

        for route, step in [
            ("submit", submit),
            ("claim (1 job)", claim),
            ("complete (batch of 1)", complete),
            ("get", get),
            ("claim (empty)", empty),
        ]:
            await timed(route, "app", step)

        async def batch(_: int) -> None:
            s, b = await call(app, "POST", "/v1/jobs/batch", user, batch_body)
            assert s == 200 and json.loads(b)["accepted"] == BATCH, b

        await timed(BATCH_ROUTE, "app", batch, batches)
        await drain()

        # -- the same services, called directly -----------------------------------
        made.clear()
        taken: list[Any] = []

        async def submit_d(_: int) -> None:
            spec = JobSpec.model_validate_json(spec_body)
            job = await c.queue.submit_async(owner, spec, None, {})
            view = job_views(c.queue, [job], positions=False)[0]
            json.dumps(view.model_dump(mode="json"))
            made.append(job.id)

        async def claim_d(_: int) -> None:
            answer = await c.queue.claim_and_beat_async(me, 1, None, wait=0.0)
            ClaimResponse.model_validate(answer).model_dump_json()
            taken.extend(answer.jobs)

        async def complete_d(i: int) -> None:
            j = taken[i]
            done = BatchedCompletion(
                job_id=j.id, lease_id=j.lease_id, state="succeeded", result={"ok": True}
            )
            outcomes = await c.queue.complete_many_async(me, [done])
            assert outcomes[0].refusal is None

        async def get_d(i: int) -> None:
            view = job_views(c.queue, [c.queue.get(owner, made[i])], positions=False)[0]
            json.dumps(view.model_dump(mode="json"))

        async def empty_d(_: int) -> None:
            answer = await c.queue.claim_and_beat_async(me, 1, None, wait=0.0)
            assert not answer.jobs

        for route, step in [
            ("submit", submit_d),
            ("claim (1 job)", claim_d),
            ("complete (batch of 1)", complete_d),
            ("get", get_d),
            ("claim (empty)", empty_d),
        ]:
            await timed(route, "services", step)

        async def batch_d(_: int) -> None:
            answer = await run_in_threadpool(submit_batch, c, owner, batch_body)
            assert json.loads(bytes(answer.body))["accepted"] == BATCH

        await timed(BATCH_ROUTE, "services", batch_d, batches)
        await drain()

    for done in range(rounds + (1 if calls else 0)):
        rounds_done = done
        await one_round()
    tally = counters(c.engine)
    c.writer.close()
    c.engine.dispose()
    table = {}
    for route, hows in results.items():
        a, s = statistics.median(hows["app"]), statistics.median(hows["services"])
        table[route] = {
            "app_us": round(a),
            "services_us": round(s),
            "framework_us": round(a - s),
            "framework_share": round((a - s) / a, 2),
        }
        if route in counts:
            app_calls, services_calls = counts[route]["app"][0], counts[route]["services"][0]
            table[route]["app_calls"] = round(app_calls)
            table[route]["framework_calls"] = round(app_calls - services_calls)
    return {
        "jobs": jobs,
        "rounds": rounds,
        "load": list(os.getloadavg()),
        "statements": tally.statements,
        "routes": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", action="store_true", help="also count Python calls")
    args = parser.parse_args()
    started = time.monotonic()
    out = asyncio.run(run(args.jobs, args.rounds, args.calls))
    print(f"load {out['load']}, {args.jobs} jobs x {args.rounds} rounds")
    extra = f" {'app calls':>10} {'framework calls':>16}" if args.calls else ""
    print(
        f"{'route':24} {'app µs':>8} {'services µs':>12} {'framework µs':>13} {'share':>6}{extra}"
    )
    for route, r in out["routes"].items():
        more = f" {r['app_calls']:10d} {r['framework_calls']:16d}" if args.calls else ""
        print(
            f"{route:24} {r['app_us']:8d} {r['services_us']:12d} "
            f"{r['framework_us']:13d} {r['framework_share']:6.2f}{more}"
        )
    print(f"({time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
