"""Transport safety shared by clients, workers and the coordinator: TLS pins, no plain HTTP.

A neutral module: it imports no layer of CSML, so the SDK, the worker and the coordinator
use it without importing each other. Its errors are `TransportError` (a `ValueError`);
the SDK turns them into its own `CsmlError`.

A coordinator started with `csml up --tls` has a self-signed certificate; its
SHA-256 fingerprint, printed at start, is what clients pin. Plain HTTP is
refused to anything but a loopback address unless explicitly allowed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit


class TransportError(ValueError):
    """A URL or pin that would make the connection unsafe, with what to do instead."""


LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def normalise_fingerprint(value: str) -> str:
    """Accept `AB:CD:…`, `abcd…` or `sha256:abcd…`; return 64 lowercase hex characters."""
    text = value.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise TransportError(
            f"{value!r} is not a SHA-256 certificate fingerprint (64 hex characters)"
        )
    return text


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, insecure_http: bool = False) -> None:
    """Refuse `http://` to a non-loopback host unless `insecure_http`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise TransportError(f"{url!r}: the coordinator URL must start with https:// or http://")
    if parts.scheme == "http" and not insecure_http and not is_loopback(parts.hostname or ""):
        raise TransportError(
            f"refusing plain HTTP to {parts.hostname}: tokens and data would cross the network "
            "unencrypted. Use https://, or pass --insecure-http (SDK: insecure_http=True) on a "
            "network you trust"
        )


class PinnedContext(ssl.SSLContext):
    """Accepts exactly the server certificate whose SHA-256 is pinned (self-signed is fine)."""

    pin: str

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        der = sock.getpeercert(binary_form=True)
        if der is None or fingerprint(der) != self.pin:
            got = fingerprint(der) if der else "none"
            sock.close()
            raise ssl.SSLError(
                f"server certificate fingerprint {got} does not match the pinned {self.pin}"
            )
        return sock


def pinned_context(pin: str) -> ssl.SSLContext:
    ctx = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # trust comes from the pin, checked after the handshake
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.pin = normalise_fingerprint(pin)
    return ctx


def verify_option(pin: str | None) -> ssl.SSLContext | bool:
    """What to pass as httpx's `verify`: a pinning context, or the system's CA store."""
    return pinned_context(pin) if pin else True


def server_fingerprint(host: str, port: int, timeout: float = 5.0) -> str:
    """Fetch a server's certificate fingerprint (for `csml` to show, never to trust blindly)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return fingerprint(der)
