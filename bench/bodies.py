"""Coordinator memory under hostile request bodies (issue 12, row 1).

Starts a coordinator (no workers) and sends, to each body-taking route, a body of
`--size` bytes streamed from a generator, announced by Content-Length and chunked,
with no token and with a valid one; prints the answer, how much the client could
send before it, and the coordinator's resident memory before and at its peak.

    PYTHONPATH=$PWD/src /work/venv/bin/python bench/bodies.py             # 1 GiB bodies
    PYTHONPATH=$PWD/src /work/venv/bin/python bench/bodies.py --size 200  # MiB

Run it against an older tree (PYTHONPATH=<old>/src) to compare; there the bodies are
read whole, so pick a size the machine's memory can take.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster import running_cluster
from tests.security.raw_http import MiB, PeakRss, padding, send

OPERATOR = "bench-operator-token"
ROUTES = [
    ("/v1/identities", None),
    ("/v1/workers", "join"),
    ("/v1/operator/join-tokens", "operator"),
    ("/v1/jobs", "identity"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="body size in MiB")
    args = parser.parse_args()
    size = args.size * MiB
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"CSML_OPERATOR_TOKEN": OPERATOR, "CSML_POW_DIFFICULTY": "0"}
        with running_cluster(Path(tmp), settings) as cluster:
            assert cluster.coordinator is not None
            tokens = {
                "identity": cluster.new_user().token or "",
                "join": cluster.join_token,
                "operator": OPERATOR,
            }
            print(f"body {args.size} MiB; coordinator pid {cluster.coordinator.pid}")
            print(
                f"{'route':28} {'token':6} {'framing':8} {'status':>6} "
                f"{'sent MiB':>9} {'RSS MiB':>8} {'peak':>8} {'grew':>7}"
            )
            for path, kind in ROUTES:
                for auth in ("none", "valid") if kind else ("none",):
                    for chunked in (False, True):
                        headers = {"Content-Type": "application/json"}
                        if kind and auth == "valid":
                            headers["Authorization"] = f"Bearer {tokens[kind]}"
                        with PeakRss(cluster.coordinator.pid) as rss:
                            before = rss.process.memory_info().rss
                            try:
                                answer = send(
                                    cluster.url,
                                    "POST",
                                    path,
                                    padding(size),
                                    length=None if chunked else size,
                                    headers=headers,
                                    timeout=600,
                                )
                                status, sent = str(answer.status), answer.sent
                            except AssertionError as exc:
                                status, sent = f"({str(exc)[:20]})", size
                        print(
                            f"{path:28} {auth:6} {'chunked' if chunked else 'length':8} "
                            f"{status:>6} {sent / MiB:9.1f} {before / MiB:8.1f} "
                            f"{rss.peak / MiB:8.1f} {(rss.peak - before) / MiB:+7.1f}",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
