"""A job's files, handed to its uid for the job and taken back afterwards (worker side).

As root: a private tmp dir (0700, owned by the job's uid) is created; the input
files become the job's (0400) and so does the output directory (0700); the
directories above them, up to the temp dir (or the worker's own folder), get the
traverse bit (o+x) only, so a job can reach its own files by path but list
nothing of the worker's. When the job answers, inputs and outputs go back to
root and the output directory keeps only regular files the job itself wrote: a
symlink or hard link to a file of the worker's (e.g. `outputs/annotated ->
/etc/shadow`) is dropped, never uploaded. The tmp dir is removed once no process
of the job is left.

A process reused for one owner's consecutive jobs (see `sandbox`) keeps one uid
and one tmp dir (`new_grant`); each job's files are handed to that uid
(`grant_files`) and taken back after it, and the tmp dir is emptied between jobs
(`clear_tmp`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csml.worker.isolation import draw_uid, job_env


@dataclass
class Grant:
    tmp: Path
    inputs: list[Path]
    output_dir: Path
    uid: int | None = None
    gid: int | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "gid": self.gid,
            "tmp": str(self.tmp),
            "env": job_env(str(self.tmp)),
        }


def new_grant(
    tmp_root: Path,
    own_uid: bool,
    in_use: Collection[int] = (),
    name: str | None = None,
) -> Grant:
    """A private tmp dir in `tmp_root` (named `name`: only we write there) and, if
    `own_uid`, a fresh uid that owns it; no files yet."""
    if name is None:
        tmp = Path(tempfile.mkdtemp(prefix="job-", dir=tmp_root))
    else:
        tmp = tmp_root / name
        tmp.mkdir(mode=0o700)
    grant = Grant(tmp, [], tmp)
    if own_uid:
        try:
            grant.uid = grant.gid = uid = draw_uid(in_use)
            os.chown(grant.tmp, uid, uid)
        except OSError:
            remove_tmp(grant)
            raise
    return grant


def grant_files(
    base: Grant,
    inputs: Collection[Path],
    output_dir: Path,
    roots: Collection[Path] = (),
    reachable: set[str] | None = None,
) -> Grant:
    """`base` with one job's files handed to its uid (if any). Directories are loosened
    (o+x) only below `roots` (default: the temp dir holding the tmp dir). `reachable`:
    directories already found or made traversable (for folders reused from job to job),
    not looked at again; those made so here are added (a directory replaced since by one
    that is not traversable keeps jobs out of it: it fails closed)."""
    grant = Grant(base.tmp, list(inputs), output_dir, base.uid, base.gid)
    if grant.uid is None:
        return grant
    uid = grant.uid
    try:
        for path in grant.inputs:
            os.chown(path, uid, uid)
            os.chmod(path, 0o400)
        os.chown(output_dir, uid, uid, follow_symlinks=False)
        os.chmod(output_dir, 0o700)
        dirs = {p.parent for p in grant.inputs} | {output_dir.parent}
        _grant_traverse(dirs, roots or (base.tmp.parent.parent,), reachable)
    except OSError:
        take_back(grant)
        raise
    return grant


def hand_over(
    inputs: Collection[Path],
    output_dir: Path,
    tmp_root: Path,
    own_uid: bool,
    in_use: Collection[int] = (),
    name: str | None = None,
    roots: Collection[Path] = (),
) -> Grant:
    """`new_grant` and `grant_files` in one, for a process that runs one job."""
    base = new_grant(tmp_root, own_uid, in_use, name)
    try:
        return grant_files(base, inputs, output_dir, roots or (tmp_root.parent,))
    except OSError:
        remove_tmp(base)
        raise


def take_back(grant: Grant) -> list[str]:
    """Inputs and outputs back to root; outputs only as regular files the job wrote
    (their names are returned; [] if the output directory is gone).

    Safe while a process of the job is still alive: once the output directory is
    root's (0700) the job can change no entry in it, only the content of files
    it still holds open (its own output anyway).
    """
    if grant.uid is not None:
        for path in grant.inputs:
            with contextlib.suppress(OSError):
                os.chown(path, 0, 0)  # first: the job can no longer chmod it
                os.chmod(path, 0o400)
    try:
        return _take_back_outputs(grant.output_dir, grant.uid)
    except FileNotFoundError:
        return []


def clear_tmp(grant: Grant) -> None:
    """Empty the tmp dir (between two jobs of one process; entries are not followed)."""
    with contextlib.suppress(FileNotFoundError), os.scandir(grant.tmp) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def remove_tmp(grant: Grant) -> None:
    """Once no process of the job is left."""
    try:
        os.rmdir(grant.tmp)  # usually empty
    except OSError:
        shutil.rmtree(grant.tmp, ignore_errors=True)


def _grant_traverse(
    dirs: Collection[Path], roots: Collection[Path], reachable: set[str] | None = None
) -> None:
    """o+x on the directories holding `dirs`, only ever below one of `roots`; those in
    `reachable` are skipped, those done are added to it."""
    seen: set[str] = set() if reachable is None else reachable
    if all(str(d) in seen for d in dirs):
        return  # (folders reused from job to job: the usual case)
    tops = tuple(os.path.join(r, "") for r in roots)
    for d in dirs:
        a = str(d)
        while a.startswith(tops) and a not in seen:
            st = os.stat(a)
            if not st.st_mode & stat.S_IXOTH and st.st_uid == os.geteuid():
                os.chmod(a, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            seen.add(a)
            a = os.path.dirname(a)


def _take_back_outputs(out: Path, uid: int | None) -> list[str]:
    kept: list[str] = []
    if uid is not None:
        os.chown(out, 0, 0, follow_symlinks=False)  # first: the job can no longer chmod it
        os.chmod(out, 0o700)
    with os.scandir(out) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and (uid is None or st.st_uid == uid):
                if uid is not None:
                    os.chown(entry.path, 0, 0, follow_symlinks=False)
                kept.append(entry.name)
            elif stat.S_ISDIR(st.st_mode):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
    return kept
