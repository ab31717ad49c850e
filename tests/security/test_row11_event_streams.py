"""Row 11 of the hardening review: the per-identity cap on event streams is counted
atomically. 30 opens sent at the same moment to a real coordinator get exactly
`MAX_STREAMS_PER_IDENTITY` (4) streams; the rest are 429; a closed stream gives
its slot back."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import httpx

from csml.coordinator.api_events import MAX_STREAMS_PER_IDENTITY
from tests.cluster import running_cluster, wait_for

OPENS = 30


def test_thirty_concurrent_opens_get_exactly_four_streams(tmp_path: Path) -> None:
    with running_cluster(tmp_path, {"CSML_POW_DIFFICULTY": "0"}) as c:
        user = c.new_user()
        headers = {"Authorization": f"Bearer {user.token}"}
        statuses: list[int] = []
        errors: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(OPENS)
        answered = threading.Barrier(OPENS)  # streams stay open until every open is answered

        def open_stream() -> None:
            with httpx.Client(base_url=c.url, timeout=60) as http:
                start.wait()
                with http.stream("GET", "/v1/jobs/events", headers=headers) as r:
                    with lock:
                        statuses.append(r.status_code)
                        if r.status_code == 429:
                            errors.append(r.read().decode())
                    answered.wait()

        threads = [threading.Thread(target=open_stream) for _ in range(OPENS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert Counter(statuses) == {200: MAX_STREAMS_PER_IDENTITY, 429: OPENS - 4}
        assert all("too_many_streams" in e for e in errors)

        def opens() -> bool:  # the closed streams' slots come back
            with (
                httpx.Client(base_url=c.url, timeout=60) as http,
                http.stream("GET", "/v1/jobs/events", headers=headers) as r,
            ):
                return r.status_code == 200

        wait_for(opens)
