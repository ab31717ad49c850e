"""What a small photo of `csml batch` costs the coordinator, in one process, without sockets.

The real app (`create_app`, SQLite in a temporary folder; `--base-dir` puts it
elsewhere) is called as an ASGI app for each request of the photo path as `csml batch`
and an `opencv` worker make it: batch submissions of `--chunk` photos with their bytes
inline (base64), then per photo a claim of one job carrying the previous job's
completion with its output inline (protocol 3), and the result stream's work for the
ended jobs (`api_events._changed` with `inline_outputs`: the view and the output's
bytes in base64, as the event sends them). The photos and outputs are random bytes of
the sizes of (c)'s (48 KB and 64 KB by default): the coordinator never decodes them.

Reported per photo: CPU milliseconds of the whole process (every thread: the event
loop, the writer, the thread pool), split by step; SQL statements by kind and write
commits (from the store's own counters, as `/metrics` has them); fsync calls (counted
by wrapping `os.fsync`). Several rounds; the median round's figures. CPU per photo is
what a loaded machine perturbs least; the counts do not depend on load at all.

    /work/venv/bin/python bench/photo_cost.py [--photos 200] [--rounds 3] [--profile OUT]

`--profile OUT` runs one more round under cProfile and writes its stats to OUT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fsync_count
from request_cost import OPERATOR, app_with_identity, call, profile_round

from csml.apps.opencv import app as opencv_app
from csml.coordinator import api_events
from csml.coordinator.inline_outputs import with_view
from csml.store.db import counters


async def run(
    photos: int, rounds: int, chunk: int, in_size: int, out_size: int, base: Path | None, prof: str
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="csml-photo-cost-", dir=base))
    app, user, owner = await app_with_identity(root)
    c = app.state.core
    op = {"Authorization": f"Bearer {OPERATOR}"}
    token_body = json.dumps({"label": "bench", "apps": ["opencv"], "publish": True}).encode()
    status, body = await call(app, "POST", "/v1/operator/join-tokens", op, token_body)
    assert status == 201, body
    join = {"Authorization": f"Bearer {json.loads(body)['token']}"}
    manifest = opencv_app.manifest().model_dump(mode="json")
    reg = json.dumps({"app": manifest, "slots": 2, "sandbox": "none", "protocol": 3}).encode()
    status, body = await call(app, "POST", "/v1/workers", join, reg)
    assert status == 201, body
    registered = json.loads(body)
    wid = registered["worker_id"]
    worker = {"Authorization": f"Bearer {registered['worker_token']}"}
    photo = base64.b64encode(os.urandom(in_size)).decode()
    output = base64.b64encode(os.urandom(out_size)).decode()
    spec = {"app": "opencv", "operation": "detect_faces", "params": {}}
    rounds_out: list[dict[str, Any]] = []

    async def one_round() -> dict[str, Any]:
        spent: defaultdict[str, float] = defaultdict(float)
        tally = counters(c.engine)
        before = (tally.statements, tally.write_commits, Counter(tally.by_kind))
        fsyncs_before = fsync_count.calls
        usage = resource.getrusage(resource.RUSAGE_SELF)
        made: list[str] = []
        pending: dict[str, Any] | None = None  # the previous job's completion

        def timed_start() -> float:
            return time.process_time()

        left = photos
        while left:
            n = min(chunk, left)
            left -= n
            items = [{"spec": spec, "inputs": {"image": photo}} for _ in range(n)]
            payload = json.dumps({"items": items}).encode()
            t = timed_start()
            s, b = await call(app, "POST", "/v1/jobs/batch", user, payload)
            spent["batch submit"] += time.process_time() - t
            answer = json.loads(b)
            assert s == 200 and answer["accepted"] == n, b[:300]
            made += [i["job"]["id"] for i in answer["items"]]
            for _ in range(n):
                claim: dict[str, Any] = {"max_jobs": 1, "wait": 0, "running": []}
                if pending is not None:
                    claim["completions"] = [pending]
                payload = json.dumps(claim).encode()
                t = timed_start()
                s, b = await call(app, "POST", f"/v1/workers/{wid}/claim", worker, payload)
                spent["claim + completion"] += time.process_time() - t
                got = json.loads(b)
                assert s == 200 and len(got["jobs"]) == 1, b[:300]
                assert all(r["status"] == 204 for r in got["results"]), got["results"]
                job = got["jobs"][0]
                assert job["inline_inputs"]["image"] == photo
                pending = {
                    "job_id": job["id"],
                    "lease_id": job["lease_id"],
                    "state": "succeeded",
                    "result": {"faces": 0},
                    "inline_outputs": [{"name": "annotated", "content": output}],
                }
        assert pending is not None
        payload = json.dumps({"max_jobs": 1, "wait": 0, "completions": [pending]}).encode()
        t = timed_start()
        s, b = await call(app, "POST", f"/v1/workers/{wid}/claim", worker, payload)
        spent["claim + completion"] += time.process_time() - t
        assert s == 200 and json.loads(b)["results"][0]["status"] == 204, b[:300]
        # The result stream's work for the ended jobs, a few per wake-up.
        for i in range(0, len(made), 4):
            extra: dict[str, dict[str, str]] = {}
            t = timed_start()
            views = api_events._changed(c, owner, set(made[i : i + 4]), False, None, 1 << 18, extra)
            for job_id, view in views.items():
                with_view(view.text, extra.get(job_id, {}))
            spent["result events"] += time.process_time() - t
            assert all(v.state == "succeeded" for v in views.values())
            assert all(extra[j]["annotated"] == output for j in views), "outputs inline"
        kinds = Counter(tally.by_kind) - before[2]
        used = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "cpu_ms_per_photo": round(1000 * sum(spent.values()) / photos, 3),
            "cpu_ms_by_step": {k: round(1000 * v / photos, 3) for k, v in spent.items()},
            "user_sys_ms_per_photo_whole_round": [
                round(1000 * (used.ru_utime - usage.ru_utime) / photos, 3),
                round(1000 * (used.ru_stime - usage.ru_stime) / photos, 3),
            ],
            "statements_per_photo": round((tally.statements - before[0]) / photos, 2),
            "commits_per_photo": round((tally.write_commits - before[1]) / photos, 2),
            "fsyncs_per_photo": round((fsync_count.calls - fsyncs_before) / photos, 2),
            "statements_by_kind_per_photo": {
                k: round(v / photos, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
            },
        }

    await one_round()  # warm-up
    for _ in range(rounds):
        rounds_out.append(await one_round())
    await profile_round(prof, one_round)
    c.writer.close()
    c.engine.dispose()
    shutil.rmtree(root, ignore_errors=True)
    median = sorted(rounds_out, key=lambda r: r["cpu_ms_per_photo"])[len(rounds_out) // 2]
    return {
        "photos": photos,
        "rounds": rounds,
        "chunk": chunk,
        "load": list(os.getloadavg()),
        "cpu_ms_per_photo_each_round": [r["cpu_ms_per_photo"] for r in rounds_out],
        **median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=8, help="photos per batch submission")
    parser.add_argument("--in-size", type=int, default=48_000)
    parser.add_argument("--out-size", type=int, default=64_000)
    parser.add_argument("--base-dir", type=Path, default=None)
    parser.add_argument("--profile", default="", help="cProfile one more round into this file")
    args = parser.parse_args()
    out = asyncio.run(
        run(
            args.photos,
            args.rounds,
            args.chunk,
            args.in_size,
            args.out_size,
            args.base_dir,
            args.profile,
        )
    )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
