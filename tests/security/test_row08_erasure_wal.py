"""Row 8 of issue 12: erasure leaves nothing.

On a real coordinator (SQLite in WAL mode) with a real echo worker, an identity
submits jobs whose params carry a distinctive marker (echo stores them twice:
params and result) and an upload with distinctive bytes, with one job still
running when it erases itself. Afterwards no file under the data folder (the
database, its -wal and -shm, blobs) nor the cluster's logs holds its id, its
token or token hash (hex or raw), the marker, the upload or a batch item's inline input
(kept in the database, as the echo's small outputs are: `csml.store.blobs`). Another identity's
marker is still found, so the search does find what is there.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path

from tests.cluster import running_cluster, wait_for


def files_holding(folders: list[Path], needles: dict[str, bytes]) -> dict[str, list[str]]:
    """Which needles each file holds (bytes, case as written)."""
    found: dict[str, list[str]] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            hits = [name for name, needle in needles.items() if needle in data]
            if hits:
                found[str(path)] = hits
    return found


def test_nothing_of_an_erased_identity_stays_in_any_file(tmp_path: Path) -> None:
    with running_cluster(tmp_path, {"CSML_ECHO_DIAGNOSTICS": "1"}, {"echo": 2}) as cluster:
        victim, bystander = cluster.new_user(), cluster.new_user()
        me = victim.request("GET", "/v1/identities/me").json()["id"]
        token = victim.token
        assert token is not None
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        marker = f"row08-marker-{secrets.token_hex(8)}"
        upload = b"row08-upload-" + secrets.token_hex(16).encode() + b"-end"
        kept = f"row08-kept-{secrets.token_hex(8)}"

        done = [
            victim.submit("echo", "echo", params={"marker": marker, "n": i}, files={"data": upload})
            for i in range(3)
        ]
        done.append(victim.submit("echo", "echo", params={"marker": marker, "label": marker}))
        # A batch item's small input (and the echo's output of it) kept in the database.
        inline = b"row08-inline-" + secrets.token_hex(16).encode() + b"-end"
        item = {"spec": {"app": "echo", "operation": "echo", "params": {"marker": marker}}}
        item["inputs"] = {"data": base64.b64encode(inline).decode()}
        r = victim.request("POST", "/v1/jobs/batch", json={"items": [item]})
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        done.append(victim.job(r.json()["items"][0]["job"]["id"]))
        for job in done:
            job.wait(60)
            assert job.state.value == "succeeded", job.error
        running = victim.submit("echo", "echo", params={"marker": marker, "sleep": 60})
        wait_for(lambda: running.refresh().state.value == "running", timeout=30)
        other = bystander.submit("echo", "echo", params={"marker": kept}).wait(60)
        assert other.state.value == "succeeded", other.error

        needles = {
            "identity id": me.encode(),
            "token": token.encode(),
            "token hash (hex)": token_hash.encode(),
            "token hash (raw)": bytes.fromhex(token_hash),
            "marker": marker.encode(),
            "upload": upload,
            "inline input": inline,
        }
        folders = [cluster.data_dir, cluster.log_dir]
        before = files_holding(folders, needles)
        held = {hit for hits in before.values() for hit in hits}
        wanted = {"identity id", "token hash (hex)", "marker", "upload", "inline input"}
        assert wanted <= held, before

        victim.delete_identity()

        after = files_holding(folders, {**needles, "kept": kept.encode()})
        kept_in = [path for path, hits in after.items() if "kept" in hits]
        assert kept_in, "the other identity's marker should still be in the database"
        leaks = {path: hits for path, hits in after.items() if hits != ["kept"]}
        assert leaks == {}, leaks
