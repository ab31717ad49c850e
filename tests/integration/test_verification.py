"""A lying contributed worker, for real (issue 13's acceptance): real coordinator and
worker processes serve `vcheck` (tests/verify_app.py) under `replicate:2`: an operator
worker and an honest contributor's worker run the honest copy, Mallory's contributed
worker runs a copy that returns a wrong result (and output) one time in three. Bob
submits jobs in waves until Mallory's worker is quarantined (it must be within a bounded
number of jobs); it earns nothing; then a last wave runs with it quarantined. Every
result Bob receives is checked: wrong results that reached a user must be 0, and every
accepted result is the correct one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from csml.client import Client
from csml.schemas import JobState
from csml.store import verification as store
from csml.store.db import make_engine, sqlite_url
from tests.cluster import Cluster, running_cluster, wait_for
from tests.verify_app import APP, write_app

pytestmark = pytest.mark.timeout(900)

WAVE = 30
MAX_WAVES = 8  # the bound: caught within 240 jobs (it lies on ~1/3 of its runs)


def start_contributed(
    cluster: Cluster, client: Client, site: Path, name: str
) -> tuple[subprocess.Popen[bytes], str]:
    """A contributed worker of `client`'s identity serving the copy of the app in `site`."""
    made = client.contribute(APP, label=name)
    env = {k: v for k, v in cluster.env.items() if not k.startswith("CSML_JOIN_TOKEN")}
    env["PYTHONPATH"] = with_path(site, cluster.env)
    log = open(cluster.log_dir / f"{name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "csml", *made.worker_command[1:]],
        env=env,
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    cluster.workers.append(proc)
    assert proc.stdin is not None
    proc.stdin.write(made.token.encode())
    proc.stdin.close()
    return proc, made.id


def with_path(site: Path, env: dict[str, str]) -> str:
    """PYTHONPATH with `site` first (and this checkout's csml as before)."""
    return os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])


def worker_of(client: Client) -> str:
    [mine] = client.contributions()
    [worker] = wait_for(lambda: mine.workers or client.contributions()[0].workers)
    return str(worker.id)


def records(cluster: Cluster) -> dict[str, dict[str, Any]]:
    out = cluster.csml("operator", "contributions", "workers", "--json").stdout
    quarantined = cluster.csml(
        "operator", "contributions", "workers", "--quarantined", "--json"
    ).stdout
    found = [json.loads(line) for line in (out + quarantined).splitlines() if line.strip()]
    return {w["id"]: w for w in found}


def run_wave(bob: Client, start: int, tmp: Path) -> tuple[int, int]:
    """Submit a wave of jobs and check each result Bob gets: (jobs, wrong results)."""
    jobs = [(n, bob.submit(APP, "square", params={"n": n})) for n in range(start, start + WAVE)]
    wrong = 0
    for n, job in jobs:
        done = job.wait(300)
        assert done.state == JobState.succeeded, (n, done.state, done.error)
        got = done.result
        out = done.download("square", tmp / f"sq-{n}").read_text()
        if got != {"square": n * n} or out != str(n * n):
            wrong += 1
    return len(jobs), wrong


def test_a_lying_worker_is_caught_quarantined_and_no_wrong_result_reaches_a_user(
    tmp_path: Path,
) -> None:
    honest_site = write_app(tmp_path / "honest")
    lying_site = write_app(tmp_path / "lying", lie_rate=1 / 3)
    # Probation 30: the liar is caught while on probation (its held credit is forfeit).
    settings = {"CSML_CONTRIBUTIONS": "true", "CSML_VERIFY_PROBATION": "30"}
    with running_cluster(tmp_path / "cluster", settings) as cluster:
        cluster.env["PYTHONPATH"] = with_path(honest_site, cluster.env)
        cluster.start_worker(APP)  # the operator's (it announces the app)
        cluster.wait_workers(APP, 1)
        policy = cluster.csml("operator", "contributions", "policy", APP, "replicate:2")
        assert policy.stdout.strip() == f"{APP}: verification replicate:2"
        carol, mallory, bob = cluster.new_user(), cluster.new_user(), cluster.new_user()
        start_contributed(cluster, carol, honest_site, "carol-honest")
        start_contributed(cluster, mallory, lying_site, "mallory-lying")
        cluster.wait_workers(APP, 3)
        liar, honest = worker_of(mallory), worker_of(carol)
        assert bob.app(APP).probation_workers == 2

        jobs = wrong = 0
        started = time.monotonic()
        caught_after: int | None = None
        for _wave in range(MAX_WAVES):
            n, bad = run_wave(bob, jobs, tmp_path)
            jobs, wrong = jobs + n, wrong + bad
            if records(cluster)[liar]["quarantined_at"] is not None:
                caught_after = jobs
                break
        seconds = time.monotonic() - started
        assert caught_after is not None, f"not caught in {jobs} jobs: {records(cluster)[liar]}"
        record = records(cluster)[liar]
        print(
            f"\nliar caught within {caught_after} jobs ({seconds:.1f} s): {record}; "
            f"honest contributor: {records(cluster)[honest]}"
        )
        assert record["disagreements"] >= 1 and record["reputation"] < 0
        assert bob.app(APP).quarantined_workers == 1

        # Quarantined: it only re-runs jobs being checked; nothing it returns is accepted.
        n, bad = run_wave(bob, jobs, tmp_path)
        jobs, wrong = jobs + n, wrong + bad
        print(f"wrong results that reached a user: {wrong} of {jobs} jobs")
        assert wrong == 0

        engine = make_engine(sqlite_url(cluster.data_dir))
        try:
            with engine.connect() as conn:
                runs = store.runs_of_worker(conn, liar)
                carols = store.runs_of_worker(conn, honest)
        finally:
            engine.dispose()
        # Caught at its first counted lie: before that, every counted run of it agreed.
        caught_at = _when(record["quarantined_at"])
        before = [r for r in runs if r["at"] < caught_at]
        lies = [i for i, r in enumerate(before) if r["outcome"] == "disagreed" and r["counts"]]
        print(f"liar: {len(before)} runs before it was caught, the first lie at run {lies[:1]}")
        assert lies and len(before) <= 30
        # It earns nothing: no run of it is credited (held credit forfeit when caught).
        assert runs and all(r["credit"] in (None, "forfeit") for r in runs), runs
        assert not any(r["outcome"] == "accepted" for r in runs if not r["counts"])
        # Whatever it ran after being caught counted for nothing.
        assert all(not r["counts"] for r in runs if r["at"] >= caught_at)
        # The honest contributor's agreeing runs are credited: held while it is on
        # probation, earned once it has 30 agreements; none forfeit.
        agreeing = [r for r in carols if r["outcome"] in ("agreed", "accepted")]
        assert agreeing and all(r["credit"] in ("held", "earned") for r in agreeing), carols
        print(
            f"liar: {len(runs)} runs, {sum(r['outcome'] == 'disagreed' for r in runs)} "
            f"disagreed; carol: {len(carols)} runs"
        )


def _when(stamp: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(stamp)
