"""Send many requests to a coordinator at the same moment (one thread and connection each)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx


def at_once(
    url: str, n: int, send: Callable[[httpx.Client, int], httpx.Response]
) -> list[httpx.Response]:
    """Run `send(client, i)` for i in 0..n-1 in n threads released together; the responses."""
    responses: list[httpx.Response | None] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            barrier.wait()
            try:
                responses[i] = send(http, i)
            except BaseException as exc:  # reported below, not lost in the thread
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for r in responses if r is not None]
