"""The client host: an SDK `Client` driven by JSON lines on stdin, answering on stdout.

Run inside the client's network namespace (`ip netns exec NS python -m
tests.e2e.multihost.client_host URL PIN`), so every request crosses the simulated
network to the coordinator over TLS, trusting only the pinned certificate.

Requests: {"op": "apps"} | {"op": "submit", "params": {...}} |
{"op": "job", "id": ID, "wait": SECONDS}. Each answer is {"ok": ...} or {"error": "..."}.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from csml.client import Client, CsmlError


def handle(client: Client, req: dict[str, Any]) -> Any:
    op = req["op"]
    if op == "apps":
        return {a.name: a.workers for a in client.apps()}
    if op == "submit":
        return client.submit("echo", "echo", params=req.get("params", {})).id
    if op == "job":
        wait = float(req.get("wait", 0))
        r = client.request("GET", f"/v1/jobs/{req['id']}", params={"wait": wait}, timeout=wait + 30)
        return r.json()
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    url, pin = sys.argv[1], sys.argv[2]
    client = Client(url, token="", pin_sha256=pin)
    deadline = time.monotonic() + 120
    while True:  # the coordinator may still be starting
        try:
            client.create_identity()
            break
        except CsmlError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    print(json.dumps({"ok": "ready"}), flush=True)
    for line in sys.stdin:
        try:
            answer = {"ok": handle(client, json.loads(line))}
        except (CsmlError, ValueError, KeyError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
