"""The job channel under fuzzing: 10,000 random, truncated and malformed frame sequences.

A real child process (`channel_fuzz_child`) plays 10,000 jobs, each on a fresh
socket as the zygote would hand it: it reads its start message and writes one
case of garbage. The worker's own code reads each (`sandbox.supervise` over a
`channel.JobChannel`): nothing but the documented outcomes may come out (no
exception, no hang), every malformed case is a protocol violation naming what
was wrong, and well-formed cases are answered as sent. Then a batch of the
malformed cases goes through real jobs on a real worker (echo's `write_channel`):
each job fails as a protocol violation and the worker serves the next one.
"""

from __future__ import annotations

import base64
import collections
import socket
import struct
import subprocess
import sys
from pathlib import Path

from csml.client import Client
from csml.worker.channel import JobChannel, JobLimitsMsg, JobSandboxMsg, StartMsg
from csml.worker.sandbox import SandboxJob, supervise
from tests.cluster import running_cluster
from tests.security.channel_fuzz_child import KINDS, case

SESSIONS = 10_000
SEED = 20261205
START = StartMsg(
    operation="echo",
    params={"x": 1},
    inputs={},
    output_dir="/nonexistent",
    limits=JobLimitsMsg(
        memory_mb=100, cpu_seconds=10, cpu_lifetime_seconds=10, max_file_bytes=1 << 20
    ),
    sandbox=JobSandboxMsg(uid=None, gid=None, tmp="/nonexistent", env={}),
)
JOB = SandboxJob(
    operation="echo",
    params={},
    inputs={},
    output_dir=Path("/nonexistent"),
    timeout_seconds=30,
    memory_mb=100,
    cpu_seconds=10,
)
ANSWERS_ALLOWED = {"valid", "bitflip"}  # a flipped bit may leave a valid message
SILENT_END_ALLOWED = {"truncated", "bitflip"}  # cut (or flipped) at a frame boundary


def test_ten_thousand_garbage_sessions_each_end_with_a_reason() -> None:
    ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.security.channel_fuzz_child",
            str(theirs.fileno()),
            str(SEED),
        ],
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    try:
        for n in range(SESSIONS):
            kind, _data = case(SEED, n)
            ours, job_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            socket.send_fds(ctrl, [struct.pack("!I", n)], [job_end.fileno()])
            job_end.close()
            channel = JobChannel(ours)
            try:
                channel.start(START)
                outcome = supervise(channel, JOB)
            finally:
                channel.close()
            assert ctrl.recv(16) == b"k", "the fuzzing child died"
            if outcome is None:  # ended at a frame boundary without answering
                assert kind in SILENT_END_ALLOWED, (n, kind)
                seen[kind, "ended"] += 1
            elif outcome.answered:
                assert kind in ANSWERS_ALLOWED, (n, kind, outcome)
                assert outcome.ok or outcome.error
                seen[kind, "answered"] += 1
            else:
                assert not outcome.ok and outcome.error, (n, kind, outcome)
                assert outcome.error.startswith("protocol violation by the job process: ")
                assert len(outcome.error) < 400
                if kind == "valid":
                    raise AssertionError(f"case {n}: a valid session refused: {outcome.error}")
                seen[kind, "violation"] += 1
                reasons[outcome.error.split(": ", 1)[1].split(" ")[0]] += 1
    finally:
        ctrl.close()
        child.wait(timeout=30)
    assert child.returncode == 0
    assert sum(seen.values()) == SESSIONS
    for kind in set(KINDS) - ANSWERS_ALLOWED - SILENT_END_ALLOWED:
        assert seen[kind, "violation"] == sum(v for (k, _), v in seen.items() if k == kind)
    assert seen["valid", "answered"] == SESSIONS // len(KINDS) + (SESSIONS % len(KINDS) > 1)
    assert seen["truncated", "violation"] > 0 and seen["bitflip", "violation"] > 0


MALFORMED_WHATEVER_FOLLOWS = (
    "oversized", "unknown_kind", "bad_json", "bad_utf8", "wrong_fields",
    "out_of_order", "nested", "non_finite", "pickle",
)  # fmt: skip


def test_malformed_frames_from_real_jobs_fail_them_and_the_worker_goes_on(
    tmp_path: Path,
) -> None:
    cases = [
        n for n in range(3 * len(KINDS)) if KINDS[n % len(KINDS)] in MALFORMED_WHATEVER_FOLLOWS
    ]
    with running_cluster(tmp_path, {"CSML_ECHO_DIAGNOSTICS": "1"}, {"echo": 2}) as cluster:
        user: Client = cluster.new_user()
        (worker,) = cluster.workers
        jobs = [
            (n, user.submit(
                "echo",
                "write_channel",
                params={"data": base64.b64encode(case(SEED, n)[1]).decode()},
                limits={"timeout_seconds": 30},
            ))
            for n in cases
        ]  # fmt: skip
        for n, job in jobs:
            job.wait(120)
            assert job.state.value == "failed", (n, KINDS[n % len(KINDS)], job.result)
            assert (job.error or "").startswith("protocol violation by the job process: "), (
                n,
                job.error,
            )
        assert worker.poll() is None
        last = user.submit("echo", "echo", params={"after": True}).wait(60)
        assert last.state.value == "succeeded", last.error
