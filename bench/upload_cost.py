"""What a multipart submission of one small file costs, coordinator in this process.

The real app (`tests.unit.inproc.InProcessCoordinator`: SQLite in a temporary folder, the
SDK calling it through an in-process transport) takes `--jobs` submissions of an echo
job with one `--size`-byte file (48 KB: bench (c)'s average small photo), `--rounds`
times; per round the process's CPU per submission (every thread: SDK, event loop,
writer, thread pool). The counts that do not depend on the load come from running it
under `strace -f -c` (file creations, folders, thread hand-offs per submission):

    /work/venv/bin/python bench/upload_cost.py [--jobs 300] [--rounds 3] [--size 48000]
    strace -f -c -e trace=openat,unlink,mkdir,rmdir,futex \
        /work/venv/bin/python bench/upload_cost.py --jobs 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.unit.inproc

from tests.clock import SetClock
from tests.unit.inproc import InProcessCoordinator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=48_000)
    args = parser.parse_args()
    data = os.urandom(args.size)
    with tempfile.TemporaryDirectory(prefix="csml-upload-cost-") as tmp, ExitStack() as stack:
        coordinator = InProcessCoordinator(
            Path(tmp),
            stack,
            SetClock(),
            queue_capacity=10 * args.jobs * args.rounds + 100,
            max_active_jobs=0,
            submission_rate_limit=0,
            max_stored_bytes=0,
        )
        user = coordinator.new_user()
        for _ in range(20):  # warm-up
            user.submit("echo", "echo", files={"data": data})
        per_round = []
        for _ in range(args.rounds):
            start = time.process_time()
            for _ in range(args.jobs):
                user.submit("echo", "echo", files={"data": data})
            per_round.append((time.process_time() - start) / args.jobs * 1000)
    print(
        f"{args.jobs} submissions of {args.size} bytes x {args.rounds} rounds; CPU-ms per "
        f"submission (whole process): {[round(x, 3) for x in per_round]}, "
        f"median {statistics.median(per_round):.3f}; load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
