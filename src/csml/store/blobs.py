"""Job files on disk under the data directory.

Files are written to a staging folder while they stream in, then renamed into
place, so a half-written upload is never visible as a job's file. Staging folders
of uploads that never finished are swept when the coordinator starts.

Every folder here is 0700 and every file 0600 (see `csml.store.private`), whatever
the umask: no other uid on the host reads a user's files.

A file's row holds its path relative to the data directory; `path` refuses one that
leaves it (absolute, or `..` past the top) by its text alone, without asking the
filesystem (that `resolve` cost ~50 µs, a dozen `lstat`s, per inline input and output).
Nothing here makes a symbolic link (models are hard links or copies), and no other uid
can write in the 0700 tree, so there is no link to follow out of it.

Small blobs in the database: a job file of at most `Settings.db_blob_max_bytes` sent
inline (a batch item's input, a completion's inline output) is not a file at all; its
bytes are in its row's `content` column, written in the transaction that writes the row
(the commit makes them durable: no file create, fsync or folder). Its blob is named
`IN_DB` + the path a file would have had (`in_db_name`), so it stays unique to its job
and file, the stored-bytes triggers count it as they count a file (by blob and size),
and `path` refuses it (ValueError): nothing opens it as a file. `in_db` tells them apart.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from csml.schemas import base64_text
from csml.store.base64_memo import Base64Memo
from csml.store.private import DIR_MODE, create_private_file, private_dir

_SAFE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
CHUNK = 1 << 20
IN_DB = "db:"
"""The prefix of a blob whose bytes are in its row (`JobFile.content`), not a file."""


def in_db(blob: str) -> bool:
    """Whether the blob `blob` (a row's) is kept in the database, not as a file."""
    return blob.startswith(IN_DB)


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than the limit of {limit} bytes")
        self.limit = limit


def check_name(name: str) -> str:
    """File names are the declared names of an operation: never a path."""
    if not _SAFE_NAME.match(name):
        raise ValueError(f"invalid file name {name!r}")
    return name


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._top = root.resolve()
        # Small files' base64 as it arrived, for their first reader (`base64_memo`).
        self.base64 = Base64Memo()
        private_dir(root)
        private_dir(root / "staging")
        private_dir(root / "jobs")

    def new_staging(self) -> Path:
        path = self.staging_path()
        path.mkdir(mode=DIR_MODE)
        return path

    def staging_path(self) -> Path:
        """A new staging folder's path, not made yet: its first file makes it
        (`make_staging`), so an upload kept in memory makes no folder."""
        return self.root / "staging" / uuid.uuid4().hex

    @staticmethod
    def make_staging(path: Path) -> None:
        """Make the staging folder `path` (from `staging_path`) if it is not there yet."""
        path.mkdir(mode=DIR_MODE, exist_ok=True)

    def make_dirs(self, path: Path) -> Path:
        """`path` (below the root) and its missing parents, each 0700."""
        return private_dir(path, stop=self.root)

    def sweep_staging(self, older_than: float = 0.0) -> int:
        """Remove staging folders untouched for `older_than` seconds (uploads that never
        finished: a crash or a kill mid-request); how many were removed."""
        cutoff = time.time() - older_than
        swept = 0
        for entry in (self.root / "staging").iterdir():
            try:
                touched = max(
                    [entry.lstat().st_mtime] + [f.lstat().st_mtime for f in entry.iterdir()]
                    if entry.is_dir() and not entry.is_symlink()
                    else [entry.lstat().st_mtime]
                )
            except OSError:
                continue
            if older_than <= 0 or touched < cutoff:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                swept += 1
        return swept

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id[:2] / job_id

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def in_db_name(self, path: Path) -> str:
        """The blob of a file kept in the database that would have been at `path` (below
        the root): that path, named as not a file (`IN_DB`)."""
        return IN_DB + self.relative(path)

    def path(self, relative: str) -> Path:
        """The file at `relative` (a row's blob path) below the data directory; ValueError
        for a path that leaves it (see the module docstring), and for a blob kept in the
        database (`in_db`: not a file)."""
        if relative.startswith(IN_DB):
            raise ValueError("blob is kept in the database, not as a file")
        normal = os.path.normpath(relative)
        if os.path.isabs(normal) or normal in (".", "..") or normal.startswith("../"):
            raise ValueError("blob path escapes the data directory")
        return self._top / normal

    def base64_of(
        self,
        relative: str,
        sha256: str,
        size: int,
        load: Callable[[], bytes | None] | None = None,
    ) -> str | None:
        """The standard base64 of the stored blob `relative`, whose row says `sha256`
        and `size`: the text it came in, if the memo still holds it (`self.base64`), else
        read (a file; `load()` for a blob in the database, none without it) and encoded;
        None when it cannot be read or is not `size` bytes (whoever fetches it then is
        told what is wrong)."""
        text = self.base64.take(sha256, size)
        if text is not None:
            return text
        if in_db(relative):
            content = load() if load is not None else None
            if content is None or len(content) != size:
                return None
            return base64_text.encode(content)
        try:
            with open(self.path(relative), "rb") as src:
                data = src.read(size + 1)
        except (OSError, ValueError):
            return None
        if len(data) != size:
            return None
        return base64_text.encode(data)

    def adopt(self, staging: Path, job_id: str, kind: str) -> Path:
        """Move a staging folder to be the job's `kind` folder (atomic rename)."""
        target = self.job_dir(job_id) / kind
        self.make_dirs(target.parent)
        os.replace(staging, target)
        return target

    def adopt_files(self, files: dict[str, Path], job_id: str, kind: str) -> Path:
        """Move staged files (by the name each takes) into the job's new `kind` folder
        (one atomic rename each): for files staged in a folder shared with other jobs'."""
        target = self.job_dir(job_id) / kind
        self.make_dirs(target)
        for name, staged in files.items():
            os.replace(staged, target / check_name(name))
        return target

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)


class HashingWriter:
    """Writes chunks to a file, hashing and counting them, enforcing a size limit."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()
        # 0600 whatever the umask; closed in finish()/abort()
        self._file: BinaryIO = os.fdopen(create_private_file(path), "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise TooLarge(self.limit)
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self, *, sync: bool = True) -> str:
        """Close (flushing to stable storage unless `sync` is off) and return the sha256."""
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def fsync_paths(paths: list[Path]) -> None:
    """Flush files, then their folders, to stable storage."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_folders_of(paths)


def fsync_folders_of(paths: list[Path]) -> None:
    """Flush the folders of `paths` (each once) to stable storage: the second half of
    `fsync_paths`, for files their writer already flushed through its own descriptor."""
    for folder in {p.parent for p in paths}:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
