"""Workers driven over HTTP by a test: they join, heartbeat or leave as the test says.

They speak the worker protocol of `csml.worker.agent` to a real coordinator (no
job is ever run), for the attacks and situations a real worker process would not
produce on its own: a worker announcing another app or a forged manifest, or one
that stops answering at a chosen moment.
"""

from __future__ import annotations

from typing import Any

import httpx
from nacl.public import PrivateKey

from csml.apps.registry import installed_apps
from csml.attestation.evidence import INSECURE_KIND, load_provider
from csml.crypto import b64e
from csml.crypto.binding import worker_key_report_data


def manifest(app: str) -> dict[str, Any]:
    """The manifest the installed `app` announces, as JSON."""
    return installed_apps()[app].manifest().model_dump(mode="json")


def registration(app_manifest: dict[str, Any], *, with_key: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"app": app_manifest, "slots": 1, "sandbox": "test (runs nothing)"}
    if with_key:
        public = bytes(PrivateKey.generate().public_key)
        evidence = load_provider(INSECURE_KIND).produce(
            worker_key_report_data(public, app_manifest["name"])
        )
        body["attestation"] = {
            "kind": INSECURE_KIND,
            "public_key": b64e(public),
            "evidence": b64e(evidence),
        }
    return body


def register(
    url: str, join_token: str, app_manifest: dict[str, Any], *, with_key: bool = False
) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/workers",
        json=registration(app_manifest, with_key=with_key),
        headers={"Authorization": f"Bearer {join_token}"},
        timeout=30,
    )


class HttpWorker:
    """A registered worker: its id and token, and the calls a worker makes."""

    def __init__(self, url: str, registered: dict[str, Any]) -> None:
        self.url = url
        self.id: str = registered["worker_id"]
        self.token: str = registered["worker_token"]

    @classmethod
    def join(
        cls, url: str, join_token: str, app: str | dict[str, Any], *, with_key: bool = False
    ) -> HttpWorker:
        r = register(
            url, join_token, manifest(app) if isinstance(app, str) else app, with_key=with_key
        )
        assert r.status_code == 201, r.text
        return cls(url, r.json())

    def call(self, method: str, suffix: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.url}/v1/workers/{self.id}{suffix}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
            **kw,
        )

    def claim(self, max_jobs: int = 8) -> httpx.Response:
        return self.call("POST", "/claim", json={"max_jobs": max_jobs, "wait": 0})

    def heartbeat(self) -> httpx.Response:
        return self.call("POST", "/heartbeat", json={"running": []})

    def leave(self) -> httpx.Response:
        return self.call("DELETE", "")
