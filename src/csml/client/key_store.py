"""The client's store of confidential jobs' keys: one 0600 JSON file per job, in a 0700
folder next to the user config.

A module of its own, light to import: every CLI command makes its `Client` with one
(`csml.cli.connection.client`), and most never run a confidential job; the keys' type
(`csml.client.confidential.JobKeys`, with the cryptography and attestation it needs) is
imported only when a job's keys are read back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from csml.client.config import config_path

if TYPE_CHECKING:
    from csml.client.confidential import JobKeys


class KeyStore:
    """One 0600 JSON file per confidential job, in a 0700 folder next to the user config."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or config_path().parent / "job-keys"

    def path(self, job_id: str) -> Path:
        if not (len(job_id) == 64 and all(c in "0123456789abcdef" for c in job_id)):
            raise ValueError("a job id is 64 hex characters")
        return self.folder / f"{job_id}.json"

    def save(self, job_id: str, keys: JobKeys) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        path = self.path(job_id)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(keys.to_json(), f)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return path

    def load(self, job_id: str) -> JobKeys | None:
        from csml.client.confidential import JobKeys

        try:
            data = json.loads(self.path(job_id).read_text())
        except (OSError, ValueError):
            return None
        try:
            return JobKeys.from_json(data)
        except (KeyError, TypeError, ValueError):
            return None
