"""The SDK's httpx client loads the CA bundle only where TLS can be used: not for an
http:// coordinator reached directly (it cost ~27 CPU-ms at every CLI start)."""

from __future__ import annotations

import ssl

import pytest

from csml.client.sdk import Client


def _context(client: Client) -> ssl.SSLContext:
    context = client._http._transport._pool._ssl_context  # type: ignore[attr-defined]
    assert isinstance(context, ssl.SSLContext)
    return context


def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)


def test_an_http_coordinator_gets_no_ca_bundle_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_proxy(monkeypatch)
    with Client("http://127.0.0.1:9", "t", result_stream=False) as client:
        context = _context(client)
        assert context.cert_store_stats()["x509_ca"] == 0
        # Still a verifying context: a TLS connection through it would be refused.
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_an_https_coordinator_still_verifies_with_the_ca_bundle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_proxy(monkeypatch)
    with Client("https://127.0.0.1:9", "t", result_stream=False) as client:
        context = _context(client)
        assert context.cert_store_stats()["x509_ca"] > 0
        assert context.verify_mode == ssl.CERT_REQUIRED


def test_an_http_coordinator_through_a_proxy_keeps_the_default_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_proxy(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", "https://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "")
    with Client("http://127.0.0.1:9", "t", result_stream=False) as client:
        assert _context(client).cert_store_stats()["x509_ca"] > 0
