"""Confidential jobs end to end: real coordinator, real workers, real OpenCV, on loopback.

Workers here: an unattested (`none`) OpenCV worker, and an OpenCV worker whose evidence is
a synthetic SGX DCAP quote under a test root PKI (a provider injected through
CSML_ATTESTATION_PROVIDERS and PYTHONPATH; no test code in src). Other workers come and
go inside single tests.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import cv2
import httpx
import pytest
from nacl.public import PrivateKey
from synthetic_provider import MRENCLAVE

from csml.client import Client, CsmlError, InvalidRequest
from csml.client.confidential import AttestationRefused, encrypt_job
from csml.crypto import b64e
from tests.cluster import Cluster, running_cluster, wait_for
from tests.integration.confidential.conftest import HERE, write_policy

# Starts a coordinator and worker processes (30-200 s under load) with attested workers.
pytestmark = pytest.mark.timeout(300)

ATTESTATION_TESTS = HERE.parents[1] / "unit" / "attestation"
GENERIC_ERROR = "the job failed; the reason is encrypted for its owner"


class Workers:
    """Start workers with a chosen attestation, learn their ids, stop them."""

    def __init__(self, cluster: Cluster, pki: dict[str, Path]) -> None:
        self.cluster = cluster
        self.pki = pki
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def live(self, app: str) -> dict[str, dict[str, Any]]:
        r = httpx.get(f"{self.cluster.url}/v1/apps/{app}/workers")
        r.raise_for_status()
        return {w["worker_id"]: w for w in r.json()}

    def start(self, app: str, quote: dict[str, Any] | None = None, slots: int = 1) -> str:
        """A worker; with `quote`, its evidence is a synthetic SGX quote of that shape."""
        before = set(self.live(app))
        saved = dict(self.cluster.env)
        if quote is not None:
            path = os.pathsep.join([str(ATTESTATION_TESTS), str(HERE), saved.get("PYTHONPATH", "")])
            self.cluster.env.update(
                PYTHONPATH=path,
                CSML_ATTESTATION_PROVIDERS="synthetic-sgx=synthetic_provider:SyntheticSgxProvider",
                CSML_ATTESTATION="synthetic-sgx",
                CSML_ATTESTATION_COLLATERAL=str(self.pki["collateral"]),
                CSML_TEST_PKI=str(self.pki["folder"]),
                CSML_TEST_QUOTE=json.dumps(quote),
            )
        try:
            proc = self.cluster.start_worker(app, slots)
        finally:
            self.cluster.env.clear()
            self.cluster.env.update(saved)
        new = wait_for(lambda: set(self.live(app)) - before, timeout=60)
        (worker_id,) = new
        self.procs[worker_id] = proc
        return str(worker_id)

    def stop(self, worker_id: str) -> None:
        proc = self.procs.pop(worker_id)
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, test_pki: dict[str, Path]
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("confidential")
    with running_cluster(root, {"CSML_MAX_UPLOAD_BYTES": str(8 << 20)}) as cluster:
        workers = Workers(cluster, test_pki)
        none_id = workers.start("opencv", slots=2)
        sgx_id = workers.start("opencv", quote={}, slots=2)
        yield {"cluster": cluster, "workers": workers, "none": none_id, "sgx": sgx_id}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _blob(cluster: Cluster, job_id: str, kind: str, name: str) -> Path:
    with sqlite3.connect(cluster.data_dir / "csml.db") as db:
        (blob,) = db.execute(
            "SELECT f.blob FROM job_files f JOIN jobs j ON j.seq = f.job_seq "
            "WHERE j.id = ? AND f.kind = ? AND f.name = ?",
            (job_id, kind, name),
        ).fetchone()
    return cast(Path, cluster.data_dir / "blobs" / blob)


def _flip_stored(cluster: Cluster, job_id: str, kind: str, name: str, offset: int) -> None:
    """Flip one bit of a stored job file: in its row if it is kept in the database
    (`job_files.content`), else in its file."""
    with sqlite3.connect(cluster.data_dir / "csml.db") as db:
        (seq, content) = db.execute(
            "SELECT f.job_seq, f.content FROM job_files f JOIN jobs j ON j.seq = f.job_seq "
            "WHERE j.id = ? AND f.kind = ? AND f.name = ?",
            (job_id, kind, name),
        ).fetchone()
        if content is not None:
            data = bytearray(content)
            data[offset] ^= 0x01
            db.execute(
                "UPDATE job_files SET content = ? WHERE job_seq = ? AND kind = ? AND name = ?",
                (bytes(data), seq, kind, name),
            )
            return
    _flip(_blob(cluster, job_id, kind, name), offset)


def _check_face_result(job: Any, photo: Path, out: Path) -> bytes:
    assert job.state.value == "succeeded", job.error
    assert job.result["count"] == 1 and {"x", "y", "w", "h"} <= set(job.result["faces"][0])
    path = job.download("annotated", out)
    annotated, original = cv2.imread(str(path)), cv2.imread(str(photo))
    assert annotated is not None and original is not None
    assert annotated.shape == original.shape and (annotated != original).any()
    return cast(bytes, path.read_bytes())


def test_workers_publish_keys_and_evidence(env: dict[str, Any]) -> None:
    live = env["workers"].live("opencv")
    none, sgx = live[env["none"]], live[env["sgx"]]
    assert none["kind"] == "none" and none["insecure"] is True and none["evidence"] == ""
    assert sgx["kind"] == "sgx-dcap" and sgx["insecure"] is False
    assert len(base64.b64decode(sgx["public_key"])) == 32
    assert base64.b64decode(sgx["evidence"])[:2] == b"\x03\x00"  # a v3 quote
    assert set(sgx["collateral"]) >= {"tcb_info", "qe_identity", "pck_crl"}
    r = httpx.get(f"{env['cluster'].url}/v1/apps/nope/workers")
    assert r.status_code == 404


def test_unattested_face_detection_is_accepted_only_when_asked(
    env: dict[str, Any], photo: Path, tmp_path: Path
) -> None:
    client = env["cluster"].new_user()
    with pytest.raises(AttestationRefused) as refused:
        client.submit("opencv", "detect_faces", files={"image": photo}, confidential=True)
    message = str(refused.value)
    assert f"worker {env['none'][:12]} (none)" in message
    assert "check 'unattested' failed" in message and "--insecure-allow-unattested" in message
    assert "check 'dcap.root_ca' failed" in message  # the test quote is not under Intel's root
    assert client.jobs() == []

    job = client.submit(
        "opencv", "detect_faces", files={"image": photo}, confidential=True, allow_unattested=True
    )
    assert [a.worker.worker_id for a in job.recipients] == [env["none"]]
    assert job.recipients[0].worker.insecure
    job.wait(60)
    _check_face_result(job, photo, tmp_path / "annotated.png")
    assert job.data.encrypted_result is not None
    assert job.data.encrypted_result.worker_id == env["none"]
    assert job.data.result is None and job.data.params == {} and job.data.confidential


def _needles(photo: Path, result: dict[str, Any], annotated: bytes) -> dict[str, bytes]:
    """What must not appear in the store: the data, plainly or base64/hex encoded."""
    found: dict[str, bytes] = {}
    for label, data in (("input", photo.read_bytes()), ("annotated", annotated)):
        for offset in range(64, len(data) - 48, max(1, len(data) // 24)):
            window = data[offset : offset + 48]
            if len(set(window)) >= 16:  # not a run of zeros, which any file has
                found[f"{label}[{offset}:+48]"] = window
        b64, hexed = base64.b64encode(data), data.hex().encode()
        for offset in (400, len(b64) // 2, len(b64) - 200):
            found[f"{label} base64 @{offset}"] = b64[offset : offset + 64]
            found[f"{label} base64url @{offset}"] = base64.urlsafe_b64encode(data)[
                offset : offset + 64
            ]
        for offset in (400, len(hexed) // 2):
            found[f"{label} hex @{offset}"] = hexed[offset : offset + 64]
            found[f"{label} HEX @{offset}"] = hexed[offset : offset + 64].upper()
    texts = {
        "result json": json.dumps(result),
        "result json compact": json.dumps(result, separators=(",", ":")),
        "faces json": json.dumps(result["faces"]),
        "faces json compact": json.dumps(result["faces"], separators=(",", ":")),
        "first face": json.dumps(result["faces"][0]),
        "first face compact": json.dumps(result["faces"][0], separators=(",", ":")),
        "params": '"min_neighbors": 4',
        "params compact": '"min_neighbors":4',
    }
    for label, text in texts.items():
        raw = text.encode()
        found[label] = raw
        found[f"{label} base64"] = base64.b64encode(raw)[:-4] if len(raw) > 6 else raw
        found[f"{label} hex"] = raw.hex().encode()
    return found


def _everything_stored(cluster: Cluster) -> dict[str, bytes]:
    """Every byte the coordinator keeps: a full SQL dump, the raw DB files, every file."""
    stored: dict[str, bytes] = {}
    with sqlite3.connect(cluster.data_dir / "csml.db") as db:
        stored["sql dump"] = "\n".join(db.iterdump()).encode()
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert {"job_recipients", "job_confidential", "worker_keys", "jobs"} <= set(tables)
        rows = []
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):
                rows.append(repr(row))
        stored["rows"] = "\n".join(rows).encode()
    for path in cluster.data_dir.rglob("*"):
        if path.is_file():
            stored[str(path.relative_to(cluster.data_dir))] = path.read_bytes()
    return stored


def test_sgx_attested_face_detection_leaves_only_ciphertext(
    env: dict[str, Any], photo: Path, tmp_path: Path, sgx_policy: Path
) -> None:
    cluster = env["cluster"]
    client = cluster.new_user()
    assessments = client.attest("opencv", sgx_policy)
    verdicts = {a.worker.worker_id: a.accepted for a in assessments}
    assert verdicts == {env["sgx"]: True, env["none"]: False}
    job = client.submit(
        "opencv",
        "detect_faces",
        files={"image": photo},
        params={"min_neighbors": 4},
        confidential=True,
        policy=sgx_policy,
    )
    assert [a.worker.worker_id for a in job.recipients] == [env["sgx"]]
    job.wait(60)
    annotated = _check_face_result(job, photo, tmp_path / "annotated.png")
    assert job.data.encrypted_result is not None
    assert job.data.encrypted_result.worker_id == env["sgx"]  # the unattested one never ran it

    stored = _everything_stored(cluster)
    assert sum(len(v) for v in stored.values()) > photo.stat().st_size  # the ciphertexts
    needles = _needles(photo, job.result, annotated)
    leaks = [
        f"{label} in {where}"
        for label, needle in needles.items()
        for where, data in stored.items()
        if needle in data
    ]
    assert leaks == []
    logs = cluster.logs().encode()
    assert [label for label, needle in needles.items() if needle in logs] == []


def test_only_recipient_workers_can_claim(env: dict[str, Any], photo: Path) -> None:
    """Two more workers join by hand; the job is sealed to one; the other, and the real
    workers, never get it."""
    cluster = env["cluster"]
    keys = {n: PrivateKey.generate() for n in ("chosen", "other")}
    creds = {}
    for name, key in keys.items():
        r = httpx.post(
            f"{cluster.url}/v1/workers",
            headers={"Authorization": f"Bearer {cluster.join_token}"},
            json={
                "app": httpx.get(f"{cluster.url}/v1/apps/opencv").json(),
                "slots": 1,
                "attestation": {"kind": "none", "public_key": b64e(bytes(key.public_key))},
            },
        )
        assert r.status_code == 201, r.text
        creds[name] = r.json()
    try:
        chosen = env["workers"].live("opencv")[creds["chosen"]["worker_id"]]
        from csml.schemas import WorkerKeyInfo

        job_keys, spec = encrypt_job(
            "opencv", "detect_faces", {}, ["image"], [WorkerKeyInfo.model_validate(chosen)]
        )
        client = cluster.new_user()
        job = client._submit_once(
            {"app": "opencv", "operation": "detect_faces", "params": {}, "confidential": spec},
            {"image": photo},
            job_keys,
        )
        # Stay live (the reaper fails a confidential job whose recipients all expired).
        httpx.post(
            f"{cluster.url}/v1/workers/{creds['chosen']['worker_id']}/heartbeat",
            headers={"Authorization": f"Bearer {creds['chosen']['worker_token']}"},
            json={"running": []},
        ).raise_for_status()

        def claim(name: str) -> list[dict[str, Any]]:
            c = creds[name]
            r = httpx.post(
                f"{cluster.url}/v1/workers/{c['worker_id']}/claim",
                headers={"Authorization": f"Bearer {c['worker_token']}"},
                json={"max_jobs": 8, "wait": 0},
            )
            r.raise_for_status()
            return list(r.json()["jobs"])

        # The real OpenCV workers long-poll all along; a plain job submitted after it, ranked
        # behind it, is served by them: so they have looked past the sealed job.
        probe = client.submit("opencv", "detect_faces", files={"image": photo})
        assert probe.wait(60).state.value == "succeeded"
        assert client.job(job.id).state.value == "queued"
        assert claim("other") == []
        (got,) = claim("chosen")
        assert got["id"] == job.id and got["params"] == {}
        wrapped = base64.b64decode(got["confidential"]["wrapped_key"])
        from csml.crypto import unwrap_key

        assert unwrap_key(wrapped, keys["chosen"]) == job_keys.data_key != b""
    finally:
        for c in creds.values():
            httpx.delete(
                f"{cluster.url}/v1/workers/{c['worker_id']}",
                headers={"Authorization": f"Bearer {c['worker_token']}"},
            )


def test_policy_refusals_name_the_check_expected_and_actual(
    env: dict[str, Any], test_pki: dict[str, Path], tmp_path: Path
) -> None:
    workers: Workers = env["workers"]
    client = env["cluster"].new_user()
    wrong = write_policy(
        tmp_path / "wrong.toml", test_pki["root"], evidence=["sgx-dcap"], mrenclave="ab" * 32
    )
    with pytest.raises(AttestationRefused) as refused:
        client.submit(
            "opencv", "detect_faces", files={"image": b"x"}, confidential=True, policy=wrong
        )
    message = str(refused.value)
    assert f"worker {env['sgx'][:12]} (sgx-dcap): check 'mrenclave' failed" in message
    assert f"expected {'ab' * 32}, actual {MRENCLAVE}" in message

    strict = write_policy(tmp_path / "strict.toml", test_pki["root"], mrenclave=MRENCLAVE)
    outdated = workers.start("echo", quote={"pce_svn": 11})  # TCB SWHardeningNeeded
    debug = workers.start("echo", quote={"debug": True})
    try:
        with pytest.raises(AttestationRefused) as refused:
            client.submit("echo", "echo", confidential=True, policy=strict)
        message = str(refused.value)
        assert f"worker {outdated[:12]} (sgx-dcap): check 'tcb_status' failed" in message
        assert "expected UpToDate, actual SWHardeningNeeded" in message
        assert f"worker {debug[:12]} (sgx-dcap): check 'debug' failed" in message
        assert "expected not debug, actual debug" in message
        by_worker = {a.worker.worker_id: a for a in refused.value.assessments}
        assert [c.name for c in by_worker[outdated].assessment.failures] == ["tcb_status"]
        assert [c.name for c in by_worker[debug].assessment.failures] == ["debug"]
    finally:
        workers.stop(outdated)
        workers.stop(debug)
    assert client.jobs() == []


def test_tampered_input_fails_the_job_and_bad_params_come_back_encrypted(
    env: dict[str, Any],
) -> None:
    cluster, workers = env["cluster"], env["workers"]
    echo = workers.start("echo", slots=1)
    try:
        client = cluster.new_user()
        # A confidential job with bad params: the coordinator cannot see them; the worker
        # refuses them, and says why to the client only.
        bad = client.submit(
            "echo", "echo", params={"sleep": -1}, confidential=True, allow_unattested=True
        ).wait(60)
        assert bad.state.value == "failed" and bad.data.error == GENERIC_ERROR
        assert bad.error is not None and bad.error.startswith("params.sleep:")
        assert "greater than or equal to 0" in bad.error

        busy = client.submit("echo", "echo", params={"sleep": 3})
        wait_for(lambda: client.job(busy.id).state.value == "running")
        payload = os.urandom(200_000)
        job = client.submit(
            "echo", "echo", files={"data": payload}, confidential=True, allow_unattested=True
        )
        params_job = client.submit(
            "echo", "echo", params={"n": 2}, confidential=True, allow_unattested=True
        )
        assert client.job(job.id).state.value == "queued"
        _flip_stored(cluster, job.id, "input", "data", 5000)  # kept in its row: small
        with sqlite3.connect(cluster.data_dir / "csml.db") as db:
            seq = "(SELECT seq FROM jobs WHERE id = ?)"
            (sealed,) = db.execute(
                f"SELECT encrypted_params FROM job_confidential WHERE job_seq = {seq}",
                (params_job.id,),
            ).fetchone()
            raw = bytearray(base64.b64decode(sealed))
            raw[30] ^= 1
            db.execute(
                f"UPDATE job_confidential SET encrypted_params = ? WHERE job_seq = {seq}",
                (b64e(bytes(raw)), params_job.id),
            )
        job.wait(60)
        assert job.state.value == "failed" and job.data.error == GENERIC_ERROR
        assert job.error is not None
        assert "input 'data' failed authentication" in job.error, job.error
        params_job.wait(60)
        assert params_job.state.value == "failed"
        assert "refused by the worker: the encrypted params failed authentication" in (
            params_job.error or ""
        )

        fine = client.submit(
            "echo",
            "echo",
            files={"data": payload},
            params={"n": 1},
            confidential=True,
            allow_unattested=True,
        ).wait(60)
        assert fine.state.value == "succeeded", fine.error
        assert fine.result == {"params": {"sleep": 0.0, "n": 1}}
        assert b"".join(fine.iter_output("data")) == payload
    finally:
        workers.stop(echo)


def test_the_coordinator_refuses_plaintext_params_and_unknown_recipients(
    env: dict[str, Any],
) -> None:
    cluster = env["cluster"]
    client = cluster.new_user()
    worker = env["workers"].live("opencv")[env["none"]]
    from csml.schemas import WorkerKeyInfo

    _, spec = encrypt_job("opencv", "detect_faces", {}, [], [WorkerKeyInfo.model_validate(worker)])
    body = {"app": "opencv", "operation": "detect_faces", "confidential": spec}
    with pytest.raises(InvalidRequest, match=r"params must be \{\}") as err:
        client._submit_once({**body, "params": {"min_neighbors": 3}}, {"image": b"x"})
    assert err.value.field == "spec.params"
    stranger = {**spec, "recipients": [{**spec["recipients"][0], "worker_id": "f" * 64}]}
    with pytest.raises(InvalidRequest, match="is not a running opencv worker") as err:
        client._submit_once({**body, "confidential": stranger}, {"image": b"x"})
    short = {**spec, "job_nonce": b64e(b"short")}
    with pytest.raises(InvalidRequest, match="job_nonce must be 32 bytes"):
        client._submit_once({**body, "confidential": short}, {"image": b"x"})
    assert client.jobs() == []


def test_tampered_output_or_result_fails_on_the_client(
    env: dict[str, Any], photo: Path, tmp_path: Path
) -> None:
    cluster = env["cluster"]
    client = cluster.new_user()
    job = client.submit(  # the CLI's spelling of the operation works too
        "opencv", "detect-faces", files={"image": photo}, confidential=True, allow_unattested=True
    ).wait(60)
    assert job.state.value == "succeeded", job.error
    blob = _blob(cluster, job.id, "output", "annotated")
    original = blob.read_bytes()
    _flip(blob, len(original) // 2)
    target = tmp_path / "annotated.png"
    with pytest.raises(CsmlError, match=r"output 'annotated' .* failed authentication"):
        job.download("annotated", target)
    assert not target.exists() and not target.with_name("annotated.png.part").exists()
    blob.write_bytes(original[:-100])  # truncated
    with pytest.raises(CsmlError, match="output 'annotated'"):
        job.download("annotated", target)
    blob.write_bytes(original)
    job.download("annotated", target)
    assert cv2.imread(str(target)) is not None

    with sqlite3.connect(cluster.data_dir / "csml.db") as db:
        (raw,) = db.execute(
            "SELECT c.encrypted_result FROM job_confidential c JOIN jobs j ON j.seq = c.job_seq "
            "WHERE j.id = ?",
            (job.id,),
        ).fetchone()
        envelope = json.loads(raw)
        ct = bytearray(base64.b64decode(envelope["ciphertext"]))
        ct[40] ^= 1
        envelope["ciphertext"] = b64e(bytes(ct))
        db.execute(
            "UPDATE job_confidential SET encrypted_result = ? WHERE job_seq = "
            "(SELECT seq FROM jobs WHERE id = ?)",
            (json.dumps(envelope), job.id),
        )
    again = client.job(job.id)
    with pytest.raises(CsmlError, match="does not decrypt: the encrypted result failed"):
        _ = again.result
    stranger = Client(cluster.url, client.token)  # same identity, no keys
    with pytest.raises(CsmlError, match="does not hold its result key"):
        _ = stranger.job(job.id).result


def test_cli_confidential_session(
    env: dict[str, Any], photo: Path, tmp_path: Path, sgx_policy: Path
) -> None:
    cluster = env["cluster"]
    cfg = tmp_path / "cfg"
    run_env = {**cluster.env, "CSML_CONFIG": str(cfg / "config.toml")}

    def csml(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cast(subprocess.CompletedProcess[str], cluster.csml(*args, env=run_env, check=check))

    csml("id", "new", "--url", cluster.url)
    r = csml("attest", "opencv", "--policy", str(sgx_policy))
    assert "accepted" in r.stdout and "mrenclave" in r.stdout and "refused" in r.stdout
    assert env["sgx"] in r.stdout and MRENCLAVE in r.stdout and "INSECURE" in r.stdout

    r = csml("attest", "opencv", check=False)  # default policy, no insecure flag
    assert r.returncode == 1 and "check 'unattested' failed" in r.stdout

    r = csml(
        "submit",
        "opencv",
        "detect-faces",
        str(photo),
        "--confidential",
        "--policy",
        str(sgx_policy),
        "--wait",
        "-o",
        str(tmp_path / "out"),
    )
    assert "succeeded" in r.stdout and '"count": 1' in r.stdout, r.stdout + r.stderr
    job_id = r.stdout.split()[1]
    key_file = cfg / "job-keys" / f"{job_id}.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    annotated = (tmp_path / "out" / "annotated.png").read_bytes()

    r = csml("result", job_id[:12], "-o", str(tmp_path / "again"))
    assert json.loads(r.stdout.splitlines()[0])["count"] == 1
    assert (tmp_path / "again" / "annotated.png").read_bytes() == annotated
    r = csml("status", job_id[:12])
    assert '"count": 1' in r.stdout

    r = csml(
        "submit",
        "opencv",
        "detect-faces",
        str(photo),
        "--confidential",
        "--insecure-allow-unattested",
        "--wait",
    )
    assert "WARNING" in r.stderr and "has no attestation" in r.stderr
    assert env["none"][:12] in r.stderr and "succeeded" in r.stdout

    r = csml("submit", "opencv", "detect-faces", str(photo), "--confidential", check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: refusing to submit")
    assert "Traceback" not in r.stderr
