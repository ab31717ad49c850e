"""Batch submission: many jobs in one request, each checked and queued as a single one.

`read` turns the body of `POST /v1/jobs/batch` into items, refusing the whole request
(a refusal from `csml.refusals`) only for what concerns the body: not JSON, not an
object with `items`, no items or more than `MAX_BATCH_ITEMS`, an inline input over
`INLINE_MAX_BYTES`. Nothing has been submitted when it refuses.

`submit` then takes each item in order through what a single submission goes through
(`api_users.submit_job` with the inputs as form parts): the spec's limits
(`spec_limits.load`), its schema (`JobSpec`), the model quota, and finally
`JobQueue.submit_many`, which takes every remaining item through `submit`'s checks
(the operation's declared inputs, params, limits, the submission rate window when one
is set, so each item counts in it, quotas on active jobs and stored bytes, the queue
bound, recipients) in the write that creates its job and gives it its fair rank. An
item refused before that write is still counted in the window (or refused past it) by
`abuse.check_submission`, as every item was before the window moved into the write.
Those writes are queued together and in order, so a batch costs about one commit
(group commit, see `csml.store.writer`), and each item's quota check sees the items
before it. Items are jobs: they count against quotas and take their turns like any
other job.

Invariants:
- One item's refusal never refuses another; each `Outcome` holds the item's job or
  the exception that refused it (a refusal, or an API error of a service not yet
  converted to refusals; anything else is a failure of the coordinator the API logs).
- Items are submitted in request order, so their fair ranks follow it.
- An item whose spec (as JSON) and input names are those of an earlier item of the same
  request that passed its checks shares that item's checked `JobSpec` (never changed
  once made); its operation is still looked up, and a spec that failed is checked again
  for each item that carries it, so every refusal is the item's own.
- An input of at most `Settings.db_blob_max_bytes` (the default: every inline input) is
  staged in memory and kept in the database with its job's row, in the write that
  creates the job (durable by its commit; no file, folder or fsync): see
  `csml.store.blobs`, "Small blobs in the database".
- Larger inputs (when the setting is below the inline bound) are staged in one folder
  per request and made durable (one `fsync_paths` over every staged file of the request:
  each file, then that one folder) before any of them is submitted; an accepted item's
  files become its job's inputs (each moved into the job's folder:
  `staged_inputs.adopt_input_rows` without a folder of its own), and the folder with a
  refused item's files is removed.

The JobQueue methods used are `check_files` and `submit_many` (public, stable names).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import ValidationError

from csml.coordinator import abuse, artifacts, spec_limits
from csml.coordinator.staged_inputs import StagedFile
from csml.refusals import Invalid, TooLarge
from csml.schemas import base64_text
from csml.schemas.batches import INLINE_MAX_CHARS, MAX_BATCH_ITEMS, BatchItemIn
from csml.schemas.jobs import JobSpec
from csml.schemas.workers import INLINE_MAX_BYTES
from csml.store.blobs import HashingWriter, check_name, fsync_paths
from csml.store.jobs import JobRow

if TYPE_CHECKING:
    from csml.coordinator.state import Core

INLINE_MEDIA_TYPE = "application/octet-stream"
INPUT_CODES = ("unknown_input", "missing_input")  # `check_files` refusals naming an input


@dataclass
class Item:
    """One item as read from the body: its raw spec and decoded inputs, or why it
    could not be read (`error`, the item's own refusal)."""

    index: int
    spec: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, bytes] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # the inputs' base64 as it came
    error: Exception | None = None


@dataclass
class Outcome:
    """What became of one item: its job, or the exception that refused it."""

    index: int
    job: JobRow | None = None
    error: Exception | None = None


def _invalid_body(message: str, where: str = "body") -> Invalid:
    return Invalid("invalid_request", f"{where}: {message}", field=where)


def read(raw: bytes, max_params_depth: int) -> list[Item]:
    """The items of a batch body; refuses (whole request) what concerns the body."""
    try:
        data = pydantic_core.from_json(raw, allow_inf_nan=True)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise spec_limits.too_deep("body", max_params_depth) from None
        raise _invalid_body(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _invalid_body('send an object: {"items": [{"spec": {...}, "inputs": {...}}]}')
    for key in data:
        if key != "items":
            raise _invalid_body("unknown field; a batch has only `items`", str(key)[:64])
    items = data.get("items")
    if not isinstance(items, list):
        raise _invalid_body("a list of items is required", "items")
    if not items:
        raise _invalid_body("a batch needs at least one item", "items")
    if len(items) > MAX_BATCH_ITEMS:
        raise TooLarge(
            "too_many_items",
            f"items: {len(items)} items, over the limit of {MAX_BATCH_ITEMS} per batch; "
            "send them in several requests",
            field="items",
        )
    out = [_item(i, value) for i, value in enumerate(items)]
    for item in out:  # the body's bound before any item is submitted
        for name, content in item.inputs.items():
            if len(content) > INLINE_MAX_BYTES:
                raise _inline_too_large(item.index, name)
    return out


def _inline_too_large(index: int, name: str) -> TooLarge:
    return TooLarge(
        "inline_input_too_large",
        f"items.{index}.inputs.{name}: over {INLINE_MAX_BYTES} bytes, the most an input "
        "may carry inline; submit this item alone as multipart (POST /v1/jobs)",
        field=f"items.{index}.inputs.{name}",
    )


def _plain_item(value: Any) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The spec and inputs of an item of the usual form (an object with an object `spec`
    and optional `inputs` of strings, nothing else) without a model: what
    `BatchItemIn` accepts as it is; None for anything else (the model then says why or
    converts it)."""
    if type(value) is not dict or not 1 <= len(value) <= 2:
        return None
    spec = value.get("spec")
    inputs = value.get("inputs", {})
    if type(spec) is not dict or type(inputs) is not dict or len(value) != 1 + ("inputs" in value):
        return None
    for name, text in inputs.items():
        if type(text) is not str or type(name) is not str:
            return None
    return spec, inputs


def _item(index: int, value: Any) -> Item:
    plain = _plain_item(value)
    if plain is None:
        try:
            parsed = BatchItemIn.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            where = loc or "item"
            return Item(
                index, error=Invalid("invalid_item", f"{where}: {err['msg']}", field=loc or None)
            )
        plain = parsed.spec, parsed.inputs
    spec, inputs = plain
    item = Item(index, spec=spec)
    for name, text in inputs.items():
        if len(text) > INLINE_MAX_CHARS:
            raise _inline_too_large(index, name[:64])
        try:
            # strict: canonical standard base64 only (`csml.schemas.base64_text`)
            item.inputs[name] = base64_text.decode(text)
            item.texts[name] = text
        except ValueError:
            item.error = Invalid(
                "invalid_input",
                f"inputs.{name[:64]}: not base64; send the file's bytes in standard base64",
                field=f"inputs.{name[:64]}",
            )
    return item


def submit(core: Core, owner_id: str, items: list[Item]) -> list[Outcome]:
    """Check and submit each item in order (see the module docstring)."""
    outcomes = [Outcome(item.index) for item in items]
    windowed = bool(core.settings.submission_rate_limit)
    specs: dict[int, tuple[JobSpec, int]] = {}
    checked: dict[tuple[bytes, frozenset[str]], tuple[JobSpec, int]] = {}  # see `_checked_spec`
    staged: dict[int, dict[str, StagedFile]] = {}
    folder: Path | None = None  # the request's staging folder, every item's inputs
    try:
        for item, outcome in zip(items, outcomes, strict=True):
            try:
                if item.error is not None:
                    raise item.error
                specs[item.index] = _checked_spec(core, item, checked)
                if item.inputs:
                    if folder is None and _needs_folder(core, item):
                        folder = core.blobs.new_staging()
                    staged[item.index] = _stage(core, folder, item)
            except Exception as exc:
                outcome.error = exc
        staged_paths = [
            f.path for files in staged.values() for f in files.values() if f.path is not None
        ]
        if staged_paths:
            fsync_paths(staged_paths)  # each file, then the one folder
        ready: list[Outcome] = []
        jobs: list[tuple[JobSpec, Path | None, dict[str, StagedFile]]] = []
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome.error is not None:
                continue
            spec, kept = specs[item.index]
            files = staged.get(item.index, {})
            try:
                _, op = core.catalog.operation(spec.app, spec.operation)
                abuse.check_model_quota(core, owner_id, artifacts.makes_models(op))
            except Exception as exc:
                outcome.error = exc
                if windowed:  # counted (or refused past the window) first, as before
                    uploaded = sum(f.size for f in files.values())
                    outcome.error = _early_check(core, owner_id, kept + uploaded) or exc
                continue
            ready.append(outcome)
            # No folder of its own: its files are moved one by one (`adopt_input_rows`).
            jobs.append((spec, None, files))
        # Quotas are checked again, race-free and item after item, in the writes, which
        # also count each item in the submission window (one statement each).
        answers = core.queue.submit_many(owner_id, jobs, count_window=windowed)
        by_index = {item.index: item for item in items}
        for outcome, answer in zip(ready, answers, strict=True):
            if isinstance(answer, Exception):
                outcome.error = answer
            else:
                outcome.job = answer
                texts = by_index[outcome.index].texts
                for name, f in staged.get(outcome.index, {}).items():  # for its claim
                    core.blobs.base64.put(f.sha256, f.size, texts[name])
    finally:
        if folder is not None:  # what is left: the inputs of items refused
            core.blobs.discard(folder)
    return outcomes


def _early_check(core: Core, owner_id: str, kept: int) -> Exception | None:
    """`abuse.check_submission` for an item refused before its write: its refusal, or
    None once the item is counted in the window."""
    try:
        abuse.check_submission(core, owner_id, kept)
    except Exception as exc:
        return exc
    return None


def _checked_spec(
    core: Core, item: Item, checked: dict[tuple[bytes, frozenset[str]], tuple[JobSpec, int]]
) -> tuple[JobSpec, int]:
    """The item's spec, checked as a single JSON submission's, and its kept bytes.

    `checked` holds the request's specs that passed, by their JSON and input names: an
    item with the same spec and input names as an earlier one (every item of a
    `Client.map` batch) shares its checked `JobSpec` (never changed once made) instead of
    parsing, validating and looking it up again; the operation is still looked up per
    item (it may have gone). A spec that failed is checked again for each item, so
    each refusal is the item's own."""
    raw = json.dumps(item.spec, separators=(",", ":"), ensure_ascii=False).encode()
    key = (raw, frozenset(item.inputs))
    known = checked.get(key)
    if known is not None:
        core.catalog.operation(known[0].app, known[0].operation)  # no such app or operation
        return known
    data, kept = spec_limits.load_kept(raw, core.settings)
    if "steps" in item.spec:
        raise Invalid(
            "invalid_spec",
            "spec.steps: a batch item is one job, not a pipeline; submit pipelines to "
            "POST /v1/jobs",
            field="spec.steps",
        )
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = f"spec.{loc}" if loc else "spec"
        raise Invalid("invalid_spec", f"{where}: {err['msg']}", field=where) from None
    names = set(item.inputs)
    for name in sorted(names):
        try:
            check_name(name)
        except ValueError:
            raise Invalid(
                "unknown_input", f"{name[:64]!r} is not a file name", field=f"inputs.{name[:64]}"
            ) from None
    core.catalog.operation(spec.app, spec.operation)  # no such app or operation
    try:
        core.queue.check_files(spec, names)
    except Exception as exc:  # its field is the input's name: name it as the item's input
        named = getattr(exc, "field", None)
        if getattr(exc, "code", None) in INPUT_CODES and isinstance(named, str) and named:
            exc.field = f"inputs.{named}"  # type: ignore[attr-defined]
        raise
    checked[key] = spec, kept
    return checked[key]


def _needs_folder(core: Core, item: Item) -> bool:
    """Whether an input of the item is over the database bound: staged as a file."""
    bound = core.settings.db_blob_max_bytes
    return any(len(content) > bound for content in item.inputs.values())


def _stage(core: Core, folder: Path | None, item: Item) -> dict[str, StagedFile]:
    """The item's inputs: each of at most `db_blob_max_bytes` in memory, to be kept in
    the database; the others written to the request's staging folder `folder` (not yet
    synced), each as `<item index>.<name>` there (names are checked: no two items'
    files collide)."""
    limit = core.settings.max_upload_bytes
    bound = core.settings.db_blob_max_bytes
    files: dict[str, StagedFile] = {}
    try:
        for name, content in item.inputs.items():
            if len(content) > limit:
                raise TooLarge(
                    "file_too_large",
                    f"input {name!r} is larger than the limit of {limit} bytes",
                    field=f"inputs.{name}",
                )
            if len(content) <= bound:
                files[name] = StagedFile(
                    name=name,
                    path=None,
                    size=len(content),
                    sha256=hashlib.sha256(content).hexdigest(),
                    media_type=INLINE_MEDIA_TYPE,
                    content=content,
                )
                continue
            assert folder is not None  # `_needs_folder` made it
            writer = HashingWriter(folder / f"{item.index}.{name}", limit)
            writer.write(content)
            digest = writer.finish(sync=False)
            files[name] = StagedFile(
                name=name,
                path=writer.path,
                size=writer.size,
                sha256=digest,
                media_type=INLINE_MEDIA_TYPE,
            )
    except BaseException:
        for f in files.values():
            if f.path is not None:
                f.path.unlink(missing_ok=True)
        raise
    return files


SPEC_FIELDS = ("app", "operation", "params", "limits", "confidential")


def item_field(index: int, field_name: str | None) -> str:
    """The field of an item's refusal, named from the batch: `items.3.spec.params.scale`,
    `items.3.inputs.image`, or `items.3` when the refusal names no field. (A single
    submission's refusal may name a spec's field without `spec.`, e.g. `params.scale`.)"""
    if not field_name:
        return f"items.{index}"
    if field_name.split(".", 1)[0] in SPEC_FIELDS:
        field_name = f"spec.{field_name}"
    return f"items.{index}.{field_name}"
