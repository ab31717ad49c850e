"""Abuse control without identity, against real coordinators on a real store.

Proof of work for new identities, the service-wide identity rate, per-identity
rate limits and quotas (also across two coordinators sharing the store),
erasing an identity, and retention.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from csml.client import RateLimited, Unauthorized
from csml.client import pow as client_pow
from csml.coordinator import abuse
from csml.coordinator.app import build_core
from csml.coordinator.config import Settings
from csml.coordinator.errors import status_of
from csml.refusals import Refusal
from tests.cluster import Cluster, running_cluster, wait_for

# Each test starts its own cluster, some a second coordinator.
pytestmark = pytest.mark.timeout(300)

# -- helpers ----------------------------------------------------------------------


def challenge(url: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/identities/challenge")
    assert r.status_code == 200, r.text
    return dict(r.json())


def solved(url: str) -> dict[str, str]:
    c = challenge(url)
    return {"challenge": c["challenge"], "nonce": client_pow.solve(c["challenge"], c["difficulty"])}


def post_identity(url: str, body: Any = None) -> httpx.Response:
    return (
        httpx.post(f"{url}/v1/identities", json=body)
        if body is not None
        else httpx.post(f"{url}/v1/identities")
    )


def error(r: httpx.Response) -> dict[str, Any]:
    return dict(r.json()["error"])


def submit_raw(url: str, token: str, **params: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/jobs",
        json={"app": "echo", "operation": "echo", "params": params},
        headers={"Authorization": f"Bearer {token}"},
    )


def rows(cluster: Cluster, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(cluster.data_dir / "csml.db") as db:
        return db.execute(sql, args).fetchall()


def files_under(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs] + [
        Path(d) / s for d, ss, _ in os.walk(root) for s in ss
    ]


@contextmanager
def second_coordinator(cluster: Cluster) -> Iterator[Cluster]:
    """Another coordinator process on the same store (SQLite file and data directory)."""
    other = Cluster(cluster.root, {k: v for k, v in cluster.env.items() if k.startswith("CSML_")})
    try:
        other.start_coordinator()
        yield other
    finally:
        other.stop()


def check_429(r: httpx.Response, code: str, starts: str, *, most_wait: float) -> int:
    assert r.status_code == 429, r.text
    body = error(r)
    assert body["code"] == code
    assert body["message"].startswith(starts), body["message"]
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= most_wait
    assert body["details"][0]["retry_after"] == retry
    return retry


# -- proof of work ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pow_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Default difficulty, short-lived challenges, no workers."""
    settings = {"CSML_POW_CHALLENGE_SECONDS": "3"}
    with running_cluster(tmp_path_factory.mktemp("pow"), settings) as cluster:
        yield cluster


def test_a_new_identity_needs_a_solved_challenge(pow_cluster: Cluster) -> None:
    url = pow_cluster.url
    issued = challenge(url)
    assert issued["difficulty"] == Settings().pow_difficulty > 0
    assert issued["algorithm"] == "sha256-leading-zero-bits"
    expires = datetime.fromisoformat(issued["expires_at"])
    assert 0 < expires.timestamp() - time.time() <= 4

    # Missing: no body, no nonce, no challenge.
    r = post_identity(url)
    assert r.status_code == 422 and error(r)["field"] == "challenge"
    assert error(r)["code"] == "proof_of_work_required"
    assert "POST /v1/identities/challenge" in error(r)["message"]
    r = post_identity(url, {"challenge": issued["challenge"]})
    assert r.status_code == 422 and error(r)["field"] == "nonce"
    r = post_identity(url, {"nonce": "1"})
    assert r.status_code == 422 and error(r)["field"] == "challenge"

    # Wrong: a nonce that does not give the zero bits.
    wrong = next(
        str(n)
        for n in range(1000)
        if not client_pow.is_solution(issued["challenge"], str(n), issued["difficulty"])
    )
    r = post_identity(url, {"challenge": issued["challenge"], "nonce": wrong})
    assert r.status_code == 422, r.text
    assert (error(r)["code"], error(r)["field"]) == ("invalid_nonce", "nonce")
    assert f"needs {issued['difficulty']}" in error(r)["message"]

    # Forged: an easier challenge with the original signature, or a made-up one.
    parts = issued["challenge"].split(".")
    easy = ".".join([parts[0], "1", *parts[2:]])
    for forged in (easy, "v1.1.9999999999.00.00", "nonsense", f"{issued['challenge']}é"):
        r = post_identity(url, {"challenge": forged, "nonce": client_pow.solve(forged, 1)})
        assert r.status_code == 422, r.text
        assert (error(r)["code"], error(r)["field"]) == ("invalid_challenge", "challenge")

    # Right: an identity; and the challenge is spent (reuse is refused).
    body = {
        "challenge": issued["challenge"],
        "nonce": client_pow.solve(issued["challenge"], issued["difficulty"]),
    }
    r = post_identity(url, body)
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    me = httpx.get(f"{url}/v1/identities/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["id"] == r.json()["id"]
    r = post_identity(url, body)
    assert r.status_code == 409, r.text
    assert (error(r)["code"], error(r)["field"]) == ("challenge_used", "challenge")
    # The store remembers the spent challenge (by its hash only) until it expires.
    digest = hashlib.sha256(issued["challenge"].encode()).hexdigest()
    assert rows(pow_cluster, "SELECT count(*) FROM used_challenges WHERE digest = ?", digest) == [
        (1,)
    ]


def test_challenges_hold_across_coordinators(pow_cluster: Cluster) -> None:
    with second_coordinator(pow_cluster) as other:
        # Issued by one coordinator, accepted by the other: the signing key is in the store.
        body = solved(pow_cluster.url)
        assert post_identity(other.url, body).status_code == 201
        r = post_identity(pow_cluster.url, body)
        assert r.status_code == 409 and error(r)["code"] == "challenge_used"
        body = solved(other.url)
        assert post_identity(pow_cluster.url, body).status_code == 201
        assert post_identity(other.url, body).status_code == 409


def test_the_sdk_and_cli_solve_the_challenge(pow_cluster: Cluster, tmp_path: Path) -> None:
    started = time.perf_counter()
    created = pow_cluster.client().create_identity()
    print(
        f"\nSDK identity at difficulty {Settings().pow_difficulty}: "
        f"{time.perf_counter() - started:.2f} s"
    )
    assert len(created.id) == 64
    env = {**pow_cluster.env, "CSML_CONFIG": str(tmp_path / "config.toml")}
    out = pow_cluster.csml("id", "new", "--url", pow_cluster.url, env=env).stdout
    assert "identity" in out and (tmp_path / "config.toml").exists()


def test_difficulty_zero_disables_the_proof_of_work(tmp_path: Path) -> None:
    with running_cluster(tmp_path, {"CSML_POW_DIFFICULTY": "0"}) as cluster:
        assert challenge(cluster.url)["difficulty"] == 0
        r = post_identity(cluster.url)
        assert r.status_code == 201, r.text
        assert cluster.new_user().token


# -- rate limits and quotas ---------------------------------------------------------


def test_the_identity_rate_raises_the_difficulty_service_wide(tmp_path: Path) -> None:
    """No refusal: past the target rate, challenges (of every coordinator) ask for more."""
    settings = {"CSML_IDENTITY_RATE_LIMIT": "2", "CSML_POW_DIFFICULTY": "8"}
    with running_cluster(tmp_path, settings) as cluster, second_coordinator(cluster) as other:
        assert challenge(other.url)["difficulty"] == 8
        early = solved(other.url)
        assert post_identity(cluster.url, solved(cluster.url)).status_code == 201
        assert post_identity(other.url, solved(other.url)).status_code == 201
        assert challenge(other.url)["difficulty"] == 9  # 2 made: one bit more
        assert post_identity(cluster.url, early).status_code == 201  # within one bit
        for _ in range(5):
            assert post_identity(cluster.url, solved(cluster.url)).status_code == 201
        assert challenge(other.url)["difficulty"] == 11  # 8 made: 4x the target
        assert other.client().create_identity().token


def test_submissions_per_window(tmp_path: Path) -> None:
    settings = {"CSML_SUBMISSION_RATE_LIMIT": "3", "CSML_SUBMISSION_RATE_WINDOW_SECONDS": "4"}
    with running_cluster(tmp_path, settings) as cluster, second_coordinator(cluster) as other:
        user, bystander = cluster.new_user(), cluster.new_user()
        assert user.token and bystander.token
        assert submit_raw(cluster.url, user.token, i=1).status_code == 202
        assert submit_raw(other.url, user.token, i=2).status_code == 202
        assert submit_raw(cluster.url, user.token, i=3).status_code == 202
        r = submit_raw(other.url, user.token, i=4)  # the count is shared by both coordinators
        retry = check_429(
            r,
            "submission_rate_limited",
            "submission rate limit: 3 per 4 s reached; resets in ",
            most_wait=4,
        )
        with pytest.raises(RateLimited, match="submission rate limit"):
            user.submit("echo", "echo", files={"data": b"x"})
        assert submit_raw(cluster.url, bystander.token).status_code == 202  # per identity
        # Refused submissions are not counted: try until the window resets.
        wait_for(lambda: submit_raw(other.url, user.token, i=5).status_code == 202, retry + 30)
        assert len(user.jobs()) == 4


def test_concurrent_jobs(tmp_path: Path) -> None:
    with running_cluster(tmp_path, {"CSML_MAX_ACTIVE_JOBS": "2"}) as cluster:  # no workers
        user = cluster.new_user()
        assert user.token
        first = user.submit("echo", "echo")
        user.submit("echo", "echo")
        r = submit_raw(cluster.url, user.token)
        check_429(
            r,
            "active_jobs_limit",
            "concurrent job limit: 2 queued or running jobs reached; resets when one",
            most_wait=5,
        )
        assert error(r)["details"][0]["value"] == 2
        first.cancel()  # the limit resets as soon as one of them ends
        assert submit_raw(cluster.url, user.token).status_code == 202
        assert submit_raw(cluster.url, user.token).status_code == 429
        # Finished jobs do not count: with a worker the queue drains and room comes back.
        cluster.start_worker("echo", slots=2)
        wait_for(lambda: all(j.refresh().done for j in user.jobs()), timeout=30)
        assert submit_raw(cluster.url, user.token).status_code == 202


@pytest.fixture(scope="module")
def retention_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Jobs expire 3 s after they end; 1000 stored bytes per identity; an echo worker."""
    settings = {
        "CSML_MAX_STORED_BYTES": "1000",
        "CSML_RETENTION_HOURS": str(3 / 3600),
        "CSML_RETENTION_INTERVAL_SECONDS": "0.3",
    }
    root = tmp_path_factory.mktemp("retention")
    with running_cluster(root, settings, {"echo": 2}) as cluster:
        yield cluster


def test_stored_bytes_quota_resets_when_files_expire(retention_cluster: Cluster) -> None:
    cluster = retention_cluster
    user = cluster.new_user()
    assert user.token
    # Announced too big: refused before any byte is stored.
    with pytest.raises(RateLimited, match="storage quota: 1000 bytes per identity") as err:
        user.submit("echo", "echo", files={"data": b"x" * 2000})
    assert "this upload is" in err.value.message and err.value.code == "storage_quota"
    assert user.jobs() == []
    # 600 bytes in, 600 out (echo copies its file): 1200 stored, over the quota.
    job = user.submit("echo", "echo", files={"data": b"y" * 600}).wait(30)
    assert job.state.value == "succeeded"
    r = submit_raw(cluster.url, user.token)
    retry = check_429(
        r,
        "storage_quota",
        "storage quota: 1000 bytes per identity reached (1200 stored); resets in ",
        most_wait=4,
    )
    assert "when your oldest finished job expires" in error(r)["message"]
    assert error(r)["details"][0]["stored"] == 1200
    wait_for(lambda: submit_raw(cluster.url, user.token).status_code == 202, timeout=retry + 30)


def test_model_quota(tmp_path: Path) -> None:
    core = build_core(Settings(data_dir=tmp_path, max_models=2))
    try:
        with core.sessions() as session:
            count = abuse.model_count(session, "0" * 64)
        assert count == 0  # no model artifacts exist yet
        abuse.check_models(core, count)
        abuse.check_models(core, 1)
        with pytest.raises(Refusal) as err:  # quotas raise refusals (429 with Retry-After)
            abuse.check_models(core, 2)  # a third would pass the limit of 2
        assert status_of(err.value) == 429 and err.value.code == "model_quota"
        assert err.value.message.startswith("model quota: 2 models per identity reached")
        assert err.value.retry_after is not None and err.value.retry_after >= 1
        abuse.check_models(core, 1)  # one deleted: room again
    finally:
        core.engine.dispose()


# -- erasure and retention -------------------------------------------------------


def test_deleting_an_identity_erases_everything_of_it(tmp_path: Path) -> None:
    with running_cluster(tmp_path, workers={"echo": 1}) as cluster:
        user, other = cluster.new_user(), cluster.new_user()
        assert user.token
        done = user.submit("echo", "echo", files={"data": b"private bytes"}).wait(30)
        assert done.state.value == "succeeded"
        running = user.submit("echo", "echo", params={"sleep": 60}, files={"data": b"z"})
        wait_for(lambda: running.refresh().state.value == "running")
        queued = user.submit("echo", "echo", files={"data": b"q"})  # the only slot is busy
        kept = other.submit("echo", "echo", files={"data": b"kept"})
        ids = [done.id, running.id, queued.id]
        identity = rows(
            cluster,
            "SELECT id FROM identities WHERE token_hash = ?",
            hashlib.sha256(user.token.encode()).hexdigest(),
        )[0][0]
        blobs = cluster.data_dir / "blobs" / "jobs"
        # Small inputs are kept in their rows (`csml.store.blobs`), larger ones in folders.
        in_rows = {
            job_id
            for (job_id,) in rows(
                cluster,
                "SELECT j.id FROM job_files f JOIN jobs j ON j.seq = f.job_seq "
                "WHERE f.kind = 'input' AND f.content IS NOT NULL",
            )
        }
        assert all((blobs / i[:2] / i).is_dir() or i in in_rows for i in ids)
        private = "SELECT count(*) FROM job_files WHERE content = ?"
        assert rows(cluster, private, b"private bytes") == [(2,)]  # its input and output

        r = httpx.delete(
            f"{cluster.url}/v1/identities/me", headers={"Authorization": f"Bearer {user.token}"}
        )
        assert r.status_code == 204, r.text

        # The running job was stopped on its worker: the one slot serves the next job now.
        assert kept.wait(20).state.value == "succeeded"
        assert other.submit("echo", "echo").wait(20).state.value == "succeeded"
        # No row names the identity or its jobs; no file of its jobs is left.
        tables = [t for (t,) in rows(cluster, "SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in rows(cluster, f'SELECT * FROM "{table}"'):
                text = repr(row)
                assert identity not in text, (table, row)
                assert not any(i in text for i in ids), (table, row)
        assert rows(cluster, "SELECT count(*) FROM jobs WHERE owner_id = ?", identity) == [(0,)]
        assert rows(cluster, private, b"private bytes") == [(0,)]
        leftovers = [p for p in files_under(cluster.data_dir) if any(i in str(p) for i in ids)]
        assert leftovers == []
        for p in files_under(blobs):
            if p.is_file():
                assert b"private bytes" not in p.read_bytes()
        # The token no longer works; the other identity is untouched.
        with pytest.raises(Unauthorized):
            user.jobs()
        for job_id in ids:
            r = httpx.get(
                f"{cluster.url}/v1/jobs/{job_id}",
                headers={"Authorization": f"Bearer {other.token}"},
            )
            assert r.status_code == 404
        assert kept.id in {j.id for j in other.jobs()}


def test_cli_id_delete_asks_then_erases_and_forgets(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as cluster:
        config = tmp_path / "cfg" / "config.toml"
        env = {**cluster.env, "CSML_CONFIG": str(config)}
        cluster.csml("id", "new", "--url", cluster.url, env=env)
        token = config.read_text().split('token = "')[1].split('"')[0]
        headers = {"Authorization": f"Bearer {token}"}
        r = cluster.csml("id", "delete", env=env, input="n\n", check=False)
        assert r.returncode != 0 and "Erase identity" in r.stdout
        assert config.exists()
        assert httpx.get(f"{cluster.url}/v1/identities/me", headers=headers).status_code == 200
        cluster.csml("submit", "echo", "echo", env=env)
        out = cluster.csml("id", "delete", "--yes", env=env).stdout
        assert "erased" in out and not config.exists()
        assert httpx.get(f"{cluster.url}/v1/identities/me", headers=headers).status_code == 401
        assert rows(cluster, "SELECT count(*) FROM jobs") == [(0,)]
        r = cluster.csml("id", "delete", "--yes", env=env, check=False)
        assert r.returncode == 1 and "no identity saved" in r.stderr


def test_retention_purges_finished_jobs_rows_and_files(retention_cluster: Cluster) -> None:
    cluster = retention_cluster
    user = cluster.new_user()
    finished = user.submit("echo", "echo", files={"data": b"old"}).wait(30)
    assert finished.state.value == "succeeded"
    slow = user.submit("echo", "echo", params={"sleep": 8}, files={"data": b"slow"})
    folder = cluster.data_dir / "blobs" / "jobs" / finished.id[:2] / finished.id
    kept = "SELECT f.content FROM job_files f JOIN jobs j ON j.seq = f.job_seq WHERE j.id = ?"
    # A small input is kept in its row (`csml.store.blobs`), not as a file.
    assert (b"old",) in rows(cluster, kept, finished.id)
    assert not (folder / "inputs" / "data").exists()

    # Gone within the retention period plus a sweep or two: rows, files, routes.
    jobs_left = "SELECT count(*) FROM jobs WHERE id = ?"
    wait_for(lambda: rows(cluster, jobs_left, finished.id) == [(0,)], timeout=15)
    wait_for(lambda: not folder.exists(), timeout=15)
    assert rows(
        cluster,
        "SELECT count(*) FROM job_files f JOIN jobs j ON j.seq = f.job_seq WHERE j.id = ?",
        finished.id,
    ) == [(0,)]
    # The purge record goes once the folder is gone (a moment after, in its own transaction).
    wait_for(lambda: rows(cluster, "SELECT count(*) FROM pending_purges") == [(0,)], timeout=15)
    headers = {"Authorization": f"Bearer {user.token}"}
    for path in (f"/v1/jobs/{finished.id}", f"/v1/jobs/{finished.id}/outputs/data"):
        assert httpx.get(f"{cluster.url}{path}", headers=headers).status_code == 404
    # A running job is kept however old it is; it expires once it has ended.
    assert slow.refresh().state.value in ("queued", "running")
    assert slow.wait(30).state.value == "succeeded"
    slow_folder = cluster.data_dir / "blobs" / "jobs" / slow.id[:2] / slow.id
    wait_for(lambda: rows(cluster, jobs_left, slow.id) == [(0,)], timeout=15)
    wait_for(lambda: not slow_folder.exists(), timeout=15)
    assert user.jobs() == []
    assert rows(cluster, "SELECT count(*) FROM jobs WHERE id IN (?, ?)", finished.id, slow.id) == [
        (0,)
    ]
