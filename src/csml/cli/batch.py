"""`csml batch`: one operation over many files, a progress bar, outputs and a manifest.

    csml batch opencv detect-faces photos/ -o out/          # every file in a folder
    csml batch opencv detect-faces 'photos/*.jpg' -o out/   # a glob (quoted or expanded)
    csml batch opencv detect-faces photos.zip -o out/       # the files inside a zip

Each input becomes an ordinary job (see `csml.client.batch`: small files are submitted
many per request through the batch route, larger ones alone); `out/<item>/` receives the
item's outputs and `out/manifest.jsonl` one line per item (input, job, state, error,
result, saved outputs), in input order. Failed items are listed, and the batch goes on;
the exit status is 0 when every item succeeded and 1 otherwise.

Item folder names are made from the local file names, kept to `[A-Za-z0-9._-]`, and
made unique; a zip's member names are reduced to their last part the same way, so
nothing is written outside `out/`.
"""

from __future__ import annotations

import glob
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from csml.cli.connection import UrlOpt, client
from csml.cli.output import console
from csml.cli.params import find_operation, parse_params
from csml.client import CsmlError
from csml.client.batch import BatchItem, single_file_input
from csml.schemas.workers import INLINE_MAX_BYTES

GLOB_CHARS = re.compile(r"[*?\[]")
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ZIP_BYTES = 8 << 30  # uncompressed total a zip may expand to
CONCURRENCY = 64
"""Items in flight by default: a batch request carries up to a quarter of them (16) as
places free up, so small photos cost ~0.06 submit requests each (0.11 at 32 in flight,
0.48 at 8) and their share of write commits halves (0.49 -> 0.37 per photo in
`bench/batch_photos.py`); still under the default 100 active jobs per identity.
Session 16 measured 64 against 32 in pairs (two clusters, runs alternated, same tree):
64 ended sooner in 6 of 6 pairs (300 photos at load 5-8: 6.8 vs 8.3 s median; 400 at
load 12-14: 16.9 vs 18.5 s); the CLI's own CPU was lower at 32 at the lighter load
(2.98 vs 3.25 CPU-ms per photo with its start) and not at the heavier one (2.40 vs 2.32),
the coordinator's lower at 64 (3.18 vs 3.40): 64 stays."""


def safe_stem(name: str) -> str:
    """A file-system-safe folder name from a (possibly hostile) file name."""
    stem = UNSAFE.sub("_", Path(name.replace("\\", "/")).name).strip("._") or "item"
    return stem[:100]


def expand_inputs(words: list[str], unpack_dir: Path) -> list[tuple[str, Path]]:
    """(label, path) per input file: folders list their files, globs expand, zips unpack."""
    found: list[tuple[str, Path]] = []
    for word in words:
        path = Path(word)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise CsmlError(f"{word}: the folder has no files")
            found.extend((str(p), p) for p in files)
        elif path.is_file() and zipfile.is_zipfile(path):
            found.extend(_unzip(path, unpack_dir / f"zip{len(found)}"))
        elif path.is_file():
            found.append((str(path), path))
        elif GLOB_CHARS.search(word):
            matches = sorted(Path(m) for m in glob.glob(word) if Path(m).is_file())
            if not matches:
                raise CsmlError(f"{word}: no file matches")
            found.extend((str(p), p) for p in matches)
        else:
            raise CsmlError(f"{word}: no such file or folder")
    if not found:
        raise CsmlError("no input files: name files, a folder, a glob or a zip")
    return found


def _unzip(path: Path, into: Path) -> list[tuple[str, Path]]:
    with zipfile.ZipFile(path) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise CsmlError(f"{path}: expands to more than {MAX_ZIP_BYTES >> 30} GiB")
        into.mkdir(parents=True)
        out: list[tuple[str, Path]] = []
        for n, member in enumerate(sorted(members, key=lambda m: m.filename)):
            target = into / f"{n:06d}-{safe_stem(member.filename)}"
            with zf.open(member) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            out.append((f"{path}:{member.filename}", target))
    if not out:
        raise CsmlError(f"{path}: the zip has no files")
    return out


def batch(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    operation: Annotated[str, typer.Argument(help="e.g. detect-faces")],
    inputs: Annotated[list[str], typer.Argument(help="Files, folders, globs or zip files.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for outputs and manifest.jsonl.")
    ],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="Parameter KEY=VALUE (repeatable).")
    ] = None,
    params_json: Annotated[str | None, typer.Option(help="Parameters as a JSON object.")] = None,
    input_name: Annotated[
        str | None, typer.Option("--input", help="The operation's input each file feeds.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Items in flight at once.", min=1)] = CONCURRENCY,
    timeout: Annotated[float, typer.Option(help="Most seconds one item may take.")] = 3600,
    url: UrlOpt = None,
) -> None:
    """Run one operation over many files; outputs per item and a JSONL manifest."""
    params = parse_params(param or [], params_json)
    with client(url) as c, tempfile.TemporaryDirectory(prefix="csml-batch-") as tmp:
        op = find_operation(c.app(app_name), operation)
        feed = single_file_input(((i.name, i.required) for i in op.inputs), input_name)
        sources = expand_inputs(inputs, Path(tmp))
        output.mkdir(parents=True, exist_ok=True)
        folders = _item_folders([label for label, _ in sources])
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            # Off the terminal the (transient) bar is never shown: do not render it at
            # all (at 10 renders a second it cost ~10% of the command's CPU); on one,
            # 4 renders a second.
            disable=not console.is_terminal,
            refresh_per_second=4,
        ) as bar:
            task = bar.add_task(f"{app_name} {op.name}", total=len(sources), failed=0)
            failed = 0

            def done(item: BatchItem) -> None:
                nonlocal failed
                if item.ok and item.job is not None:
                    _save(item, output / folders[item.index])
                else:
                    failed += 1
                    bar.console.print(f"[red]failed[/] {item.source}: {item.error}")
                bar.update(task, advance=1, failed=failed)

            result = c.map(
                app_name,
                op.name,
                [path for _, path in sources],
                labels=[label for label, _ in sources],
                input=feed,
                params=params,
                concurrency=concurrency,
                timeout=timeout,
                on_done=done,
                inline_outputs=INLINE_MAX_BYTES,  # each item's outputs come with its result
            )
        manifest = result.write_manifest(output / "manifest.jsonl")
    ok, bad = len(result.succeeded), len(result.failed)
    console.print(
        f"{ok} of {len(result.items)} items succeeded in {result.wall_s:.1f} s"
        + (f", {bad} failed" if bad else "")
        + f"; manifest {manifest}"
    )
    if bad:
        raise typer.Exit(1)


def _item_folders(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        stem = safe_stem(label.rsplit(":", 1)[-1])
        stem = stem.rsplit(".", 1)[0] if "." in stem else stem
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else f"{stem}-{n + 1}")
    return out


def _save(item: BatchItem, folder: Path) -> None:
    assert item.job is not None
    folder.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Any] = {}
    for name in item.job.data.outputs:
        saved[name] = str(item.job.download(name, folder))
    item.saved = saved
