"""Staged inputs: uploaded files waiting in a staging folder to become a job's inputs.

A submission (single, batch, multipart or pipeline) stages each input in a private
staging folder (`BlobStore.new_staging`), hashed and size-checked as it arrives, and
fsyncs them before the job's row is written. `adopt_input_rows` then moves the folder
under the job (`BlobStore.adopt`) and gives the rows that describe its inputs. A batch
submission stages the inputs of all its items in one folder (one folder to fsync, not
one per item) and passes no folder of the job's own (`staging=None`): each of the job's
files is then moved alone (`BlobStore.adopt_files`). A staging folder whose job was
never written is discarded by its caller, or swept at the next start
(`BlobStore.sweep_staging`).

A small input (at most `Settings.db_blob_max_bytes`) is staged in memory instead
(`StagedFile.content`, no `path`): a batch item's inline input never is a file, nor is a
form part of that size (held in memory while it is parsed, `uploads.MemoryFirst`; a
submission's staging folder is made only by a part that goes to disk); its row carries
its bytes into the database
(`csml.store.blobs`, "Small blobs in the database"), in the transaction that writes the
job. A staging folder left with no file of the job's is not moved: its caller discards
it, as it discards one whose job was refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from csml.store.blobs import BlobStore
from csml.store.jobs import FileRow
from csml.store.tables import JobFile


@dataclass
class StagedFile:
    """One input as staged: its name, where it is (a file at `path`, or its bytes in
    `content`, to be kept in the database), and what it holds."""

    name: str
    path: Path | None
    size: int
    sha256: str
    media_type: str
    content: bytes | None = None


def adopt_input_rows(
    blobs: BlobStore, staging: Path | None, job_id: str, files: dict[str, StagedFile]
) -> list[FileRow]:
    """Move the staged uploads to be job `job_id`'s inputs; their rows. `staging`: the
    folder holding exactly these files, moved whole; None: they are in a folder shared
    with other jobs' files, and each is moved alone. An input staged in memory moves
    nothing: its row names it as kept in the database and carries its bytes."""
    if not files:
        return []
    on_disk = {f.name: f.path for f in files.values() if f.path is not None}
    moved: Path | None = None
    if staging is None:
        if on_disk:
            moved = blobs.adopt_files(on_disk, job_id, "inputs")
    elif on_disk:  # else the folder holds nothing of theirs: its caller discards it
        moved = blobs.adopt(staging, job_id, "inputs")
    rows: list[FileRow] = []
    for f in files.values():
        if f.path is None:
            blob = blobs.in_db_name(blobs.job_dir(job_id) / "inputs" / f.name)
        else:
            assert moved is not None
            blob = blobs.relative(moved / f.name)
        rows.append(
            FileRow("input", f.name, f.size, f.sha256, f.media_type, blob, content=f.content)
        )
    return rows


def adopt_inputs(
    blobs: BlobStore, staging: Path | None, job_id: str, files: dict[str, StagedFile]
) -> list[JobFile]:
    """`adopt_input_rows` as ORM rows, for jobs still made with the ORM (pipelines)."""
    return [
        JobFile(
            kind=f.kind,
            name=f.name,
            size=f.size,
            sha256=f.sha256,
            media_type=f.media_type,
            blob=f.blob,
            content=f.content,
        )
        for f in adopt_input_rows(blobs, staging, job_id, files)
    ]
