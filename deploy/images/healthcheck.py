#!/opt/csml/bin/python
"""Container health check: `csml-healthcheck coordinator|worker|client`; exit 0 when healthy.

- coordinator: `GET /healthz` on this container answers 200 (the store is reachable).
- worker: the job zygote is alive and the coordinator (CSML_COORDINATOR) answers
  `/healthz`, over the same transport rules as the worker (pin, insecure HTTP).
- client: the SDK imports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _get_ok(url: str) -> bool:
    import httpx

    from csml.transport import check_url, verify_option

    insecure = os.environ.get("CSML_INSECURE_HTTP", "").lower() in ("1", "true", "yes")
    check_url(url, insecure_http=insecure)
    verify = verify_option(os.environ.get("CSML_PIN_SHA256") or None)
    response = httpx.get(f"{url.rstrip('/')}/healthz", timeout=4, verify=verify)
    return response.status_code == 200


def _zygote_alive() -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"csml.worker.zygote" in (entry / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def main(role: str) -> int:
    try:
        if role == "coordinator":
            port = os.environ.get("CSML_HEALTH_PORT", "8000")
            return 0 if _get_ok(f"http://127.0.0.1:{port}") else 1
        if role == "worker":
            if not _zygote_alive():
                print("unhealthy: the job zygote is not running", file=sys.stderr)
                return 1
            return 0 if _get_ok(os.environ["CSML_COORDINATOR"]) else 1
        if role == "client":
            import csml.client  # noqa: F401

            return 0
    except Exception as exc:
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"usage: csml-healthcheck coordinator|worker|client (got {role!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
