"""What a photo's bytes cost the coordinator on the single-job path, in one process.

The real app (`create_app`, SQLite in a temporary folder; `--base-dir` puts it
elsewhere) is called as an ASGI app for each request of (c)'s path, the body arriving
in `--chunk`-byte messages as uvicorn hands it over: the SDK's multipart submission
(`POST /v1/jobs`, one image), the worker's claim of it (protocol 3, carrying the
previous job's completion: its output inline, base64, when within the inline bound,
else uploaded first with `PUT .../outputs/annotated`), the input's download when it
did not come inline (`GET .../inputs/image`), and the owner's download of the output
(`GET /v1/jobs/{id}/outputs/annotated`). The inputs are (c)'s images (`faces.py`,
same seed) and the outputs PNGs of their size mix (random bytes: the coordinator never
decodes them).

Reported per photo: CPU milliseconds of the whole process (every thread: the event
loop, the writer, the thread pool) split by step, ASGI messages received and sent per
photo, statements, write commits and fsyncs (counted by wrapping `os.fsync`),
and thread-pool hops (calls of anyio's `to_thread.run_sync`, wrapped: Starlette's
`run_in_threadpool` goes through it too), statements by kind, and the CPU of the
coordinator's base64 calls (`base64.b64encode`, `csml.schemas.base64_text`'s
`encode`/`decode`, wrapped, each timed in the thread that calls it; the bench's own
encoding of outputs is not counted). Several rounds; the median round's figures.
`--profile OUT` runs one more round under cProfile.

    /work/venv/bin/python bench/photo_bytes.py [--photos 100] [--rounds 3] [--profile OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio.to_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.asgi
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fsync_count
from faces import make_images
from request_cost import OPERATOR, app_with_identity, call, profile_round
from tests.asgi import http_scope

from csml.apps.opencv import app as opencv_app
from csml.schemas import base64_text
from csml.schemas.workers import INLINE_MAX_BYTES
from csml.store.db import counters

messages = {"received": 0, "sent": 0}
hops = {"thread_pool": 0}
_real_run_sync = anyio.to_thread.run_sync


async def _counted_run_sync(func: Any, *args: Any, **kwargs: Any) -> Any:
    """anyio's `to_thread.run_sync`, counted (the coordinator looks it up at each call)."""
    hops["thread_pool"] += 1
    return await _real_run_sync(func, *args, **kwargs)


anyio.to_thread.run_sync = _counted_run_sync  # type: ignore[assignment]

codec = {"cpu_s": 0.0, "inside_app": False}


def _timed(func: Any) -> Any:
    """`func`, its thread CPU added to `codec` when called while the app serves a request."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        if not codec["inside_app"]:
            return func(*args, **kwargs)
        t = time.thread_time()
        try:
            return func(*args, **kwargs)
        finally:
            codec["cpu_s"] += time.thread_time() - t

    return timed


base64.b64encode = _timed(base64.b64encode)
for _name in ("encode", "decode"):  # looked up at each call (`base64_text.decode(...)`)
    if hasattr(base64_text, _name):  # `encode`: not in older trees
        setattr(base64_text, _name, _timed(getattr(base64_text, _name)))


async def chunked(
    app: Any,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    chunk: int,
    query: str = "",
) -> tuple[int, bytes]:
    """One request whose body arrives in `chunk`-byte messages; (status, body)."""
    scope = http_scope(method, path, headers, body=body, query=query)
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    status, out = 0, []

    async def receive() -> dict[str, Any]:
        if not pieces:
            await asyncio.Event().wait()
        messages["received"] += 1
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        messages["sent"] += 1
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            out.append(message.get("body", b""))

    codec["inside_app"] = True
    try:
        await app(scope, receive, send)
    finally:
        codec["inside_app"] = False
    return status, b"".join(out)


def multipart(spec: dict[str, Any], name: str, data: bytes) -> tuple[str, bytes]:
    boundary = "csmlbenchboundary7f3a"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n'
        f"Content-Type: application/json\r\n\r\n{json.dumps(spec)}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return (
        f"multipart/form-data; boundary={boundary}",
        head + data + f"\r\n--{boundary}--\r\n".encode(),
    )


async def run(photos: int, rounds: int, chunk: int, base: Path | None, prof: str) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="csml-photo-bytes-", dir=base))
    images = [p.read_bytes() for p in make_images(root / "images", photos)]
    outputs = [os.urandom(len(b) * 3 // 2) for b in images]  # PNGs of JPEGs are larger
    app, user, _owner = await app_with_identity(root)
    op = {"Authorization": f"Bearer {OPERATOR}"}
    token_body = json.dumps({"label": "bench", "apps": ["opencv"], "publish": True}).encode()
    status, body = await call(app, "POST", "/v1/operator/join-tokens", op, token_body)
    assert status == 201, body
    join = {"Authorization": f"Bearer {json.loads(body)['token']}"}
    manifest = opencv_app.manifest().model_dump(mode="json")
    reg = json.dumps({"app": manifest, "slots": 2, "sandbox": "none", "protocol": 3}).encode()
    status, body = await call(app, "POST", "/v1/workers", join, reg)
    assert status == 201, body
    wid = json.loads(body)["worker_id"]
    # The largest output a completion carries inline (absent: an older coordinator's).
    inline_most = json.loads(body).get("inline_output_bytes", INLINE_MAX_BYTES)
    worker = {"Authorization": f"Bearer {json.loads(body)['worker_token']}"}
    spec = {"app": "opencv", "operation": "detect_faces", "params": {}}
    c = app.state.core

    async def one_round() -> dict[str, Any]:
        spent: defaultdict[str, float] = defaultdict(float)
        tally = counters(c.engine)
        commits0, fsyncs0, msgs0 = tally.write_commits, fsync_count.calls, dict(messages)
        statements0, hops0 = tally.statements, hops["thread_pool"]
        codec0 = codec["cpu_s"]
        kinds0 = dict(tally.by_kind)
        pending: dict[str, Any] | None = None
        done: list[str] = []
        downloads = 0  # inputs that did not come inline in their claim

        async def claim_with(completion: dict[str, Any] | None) -> dict[str, Any]:
            claim: dict[str, Any] = {"max_jobs": 1, "wait": 0, "running": []}
            if completion is not None:
                claim["completions"] = [completion]
            body = json.dumps(claim).encode()  # the worker's work, not the coordinator's
            t = time.process_time()
            s, b = await chunked(
                app,
                "POST",
                f"/v1/workers/{wid}/claim",
                {**worker, "content-type": "application/json"},
                body,
                chunk,
            )
            spent["claim (+ completion)"] += time.process_time() - t
            got = json.loads(b)
            assert s == 200 and all(r["status"] == 204 for r in got["results"]), b[:300]
            return got  # type: ignore[no-any-return]

        for n in range(photos):
            ctype, form = multipart(spec, "image", images[n])
            t = time.process_time()
            s, b = await chunked(
                app, "POST", "/v1/jobs", {**user, "content-type": ctype}, form, chunk
            )
            spent["submit (multipart)"] += time.process_time() - t
            assert s in (200, 201, 202), b[:300]
            got = await claim_with(pending)
            job = got["jobs"][0]
            if "image" not in job["inline_inputs"]:
                downloads += 1
                t = time.process_time()
                s, b = await chunked(
                    app,
                    "GET",
                    f"/v1/workers/{wid}/jobs/{job['id']}/inputs/image",
                    worker,
                    b"",
                    chunk,
                    query=f"lease_id={job['lease_id']}",
                )
                spent["input download"] += time.process_time() - t
                assert s == 200 and len(b) == len(images[n]), s
            else:
                assert len(job["inline_inputs"]["image"]) >= len(images[n])
            out = outputs[n]
            pending = {
                "job_id": job["id"],
                "lease_id": job["lease_id"],
                "state": "succeeded",
                "result": {"count": 0},
                "inline_outputs": [],
            }
            if len(out) <= inline_most:
                pending["inline_outputs"] = [
                    {"name": "annotated", "content": base64.b64encode(out).decode()}
                ]
            else:
                t = time.process_time()
                s, b = await chunked(
                    app,
                    "PUT",
                    f"/v1/workers/{wid}/jobs/{job['id']}/outputs/annotated",
                    {**worker, "content-type": "image/png"},
                    out,
                    chunk,
                    query=f"lease_id={job['lease_id']}",
                )
                spent["output upload"] += time.process_time() - t
                assert s == 204, b[:300]
            done.append(job["id"])
            if len(done) >= 2:  # the SDK downloads once the job's end is known
                await _download(done.pop(0))
        await claim_with(pending)
        for job_id in done:
            await _download(job_id)
        msgs = {k: (messages[k] - msgs0[k]) / photos for k in messages}
        return {
            "cpu_ms_per_photo": round(1000 * sum(spent.values()) / photos, 3),
            "cpu_ms_by_step_per_photo": {k: round(1000 * v / photos, 3) for k, v in spent.items()},
            "asgi_messages_per_photo": msgs,
            "inputs_inline_share": round(1 - downloads / photos, 2),
            "statements_per_photo": round((tally.statements - statements0) / photos, 2),
            "statements_per_photo_by_kind": {
                k: round((n - kinds0.get(k, 0)) / photos, 2)
                for k, n in sorted(tally.by_kind.items())
                if n > kinds0.get(k, 0)
            },
            "thread_pool_hops_per_photo": round((hops["thread_pool"] - hops0) / photos, 2),
            "base64_cpu_ms_per_photo": round(1000 * (codec["cpu_s"] - codec0) / photos, 3),
            "commits_per_photo": round((tally.write_commits - commits0) / photos, 2),
            "fsyncs_per_photo": round((fsync_count.calls - fsyncs0) / photos, 2),
        }

    async def _download(job_id: str) -> None:
        t = time.process_time()
        s, b = await chunked(app, "GET", f"/v1/jobs/{job_id}/outputs/annotated", user, b"", chunk)
        spent_dl.append(time.process_time() - t)
        assert s == 200, b[:300]

    spent_dl: list[float] = []
    results = []
    await one_round()  # warm-up
    for _ in range(rounds):
        spent_dl.clear()
        r = await one_round()
        r["cpu_ms_by_step_per_photo"]["output download"] = round(1000 * sum(spent_dl) / photos, 3)
        r["cpu_ms_per_photo"] = round(r["cpu_ms_per_photo"] + 1000 * sum(spent_dl) / photos, 3)
        results.append(r)
    await profile_round(prof, one_round)
    c.writer.close()
    c.engine.dispose()
    shutil.rmtree(root, ignore_errors=True)
    median = sorted(results, key=lambda r: r["cpu_ms_per_photo"])[len(results) // 2]
    return {
        "photos": photos,
        "input_bytes_mean": sum(map(len, images)) // photos,
        "outputs_inline_share": round(sum(len(b) <= inline_most for b in outputs) / photos, 2),
        "load": [round(x, 2) for x in os.getloadavg()],
        "cpu_ms_per_photo_each_round": [r["cpu_ms_per_photo"] for r in results],
        **median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=65536, help="bytes per ASGI body message")
    parser.add_argument("--base-dir", type=Path, default=None)
    parser.add_argument("--profile", default="", help="cProfile one more round into this file")
    a = parser.parse_args()
    print(
        json.dumps(asyncio.run(run(a.photos, a.rounds, a.chunk, a.base_dir, a.profile)), indent=1)
    )


if __name__ == "__main__":
    main()
