"""Jobs in the store: named statements on SQLAlchemy Core for the job lifecycle's reads.

Everything here takes a Core `Connection` (a pooled read connection, or the one a
`Writer` operation runs in) and returns small frozen rows (`JobRow`, `FileRow`,
`Envelope`), never ORM objects, so a request loads a job once and nothing is lazily
loaded later. The lifecycle's writes are in `csml.store.jobs_write` (how jobs end:
`csml.store.jobs_end`), the quota counts in `csml.store.jobs_quota`.

Invariants:

- A job is found only by its owner (`owned`, and `owned_file` for one of its files with
  its bytes: a download's one read): another identity's job is `NotFound`,
  never `Forbidden`; an id prefix matching several jobs is `Malformed`.
- A load is one statement however many jobs it returns: the rows, their confidential
  envelope (a left join) and their files (a correlated subquery aggregating them into
  one JSON array per job, `_FilesAgg`: `json_group_array` on SQLite, `json_agg` on
  PostgreSQL). One statement is its own snapshot, so a load needs no explicit read
  transaction (`csml.store.db.read_each`) and a job's files are always those of the
  row read with them.
- The hot statements are built once, at import, with bound parameters (`bindparam`):
  named statements that SQLAlchemy compiles once and then only executes (building and
  cache-keying a statement per call costs ~5x executing a prepared one). The hottest
  (loads by owner or id, `changed`, `leases`, `probe`, and in `jobs_write`/`jobs_end`
  the rank, the job insert, the claim, the served rank, lease extension and `end_held`)
  are `Prepared` (`csml.store.prepared`): rendered once per dialect and sent on the
  DB-API cursor, their rows plain tuples read by position (`_job`, `plain_row`), which
  costs a half to a third of Core's execution.
- The claim's probe (`probe`) is one read: whether a job waits for the worker and the
  app's newest requirement key id (`placement_keys`), so a caller reloads keys only
  when they changed.
- Locks (`lock=True`) are row locks on PostgreSQL (`FOR UPDATE` of the jobs rows
  only); on SQLite the write transaction's database lock stands for them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, Table, and_, bindparam, func, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.functions import FunctionElement

from csml import ids
from csml.refusals import Malformed, NotFound
from csml.store.prepared import Prepared
from csml.store.tables import AppRecord, FairCounter, Job, JobFile, Worker
from csml.store.tables_confidential import JobConfidential, JobRecipient, WorkerKey
from csml.store.tables_placement import PlacementKey
from csml.store.tables_verification import JobRun

JOBS = cast(Table, Job.__table__)
FILES = cast(Table, JobFile.__table__)
ENVELOPES = cast(Table, JobConfidential.__table__)
RECIPIENTS = cast(Table, JobRecipient.__table__)
APPS = cast(Table, AppRecord.__table__)
COUNTERS = cast(Table, FairCounter.__table__)
WORKERS = cast(Table, Worker.__table__)
WORKER_KEYS = cast(Table, WorkerKey.__table__)
PLACEMENT_KEYS = cast(Table, PlacementKey.__table__)
RUNS = cast(Table, JobRun.__table__)

QUEUED, RUNNING = "queued", "running"
TERMINAL = ("succeeded", "failed", "cancelled")
CHUNK = 500  # ids per IN list


@dataclass(frozen=True, slots=True)
class FileRow:
    """An input, output or pinned-model file of a job (the bytes are at `blob`). `content`:
    the bytes of a blob kept in the database (`csml.store.blobs.in_db`) as a writer gives
    them to be inserted; a load never reads them (`file_content` does)."""

    kind: str
    name: str
    size: int
    sha256: str
    media_type: str
    blob: str
    model_id: str | None = None
    content: bytes | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """A confidential job's envelope (the coordinator holds no key that opens it)."""

    version: int
    job_nonce: str
    result_public_key: str
    encrypted_params: str
    encrypted_result: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job as stored, with its files and envelope (attribute names as `Job`'s)."""

    seq: int
    id: str
    owner_id: str
    app: str
    operation: str
    params: dict[str, Any]
    limits: dict[str, Any]
    state: str
    fair_rank: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    progress_fraction: float
    progress_message: str
    error: str | None
    result: dict[str, Any] | None
    worker_id: str | None
    lease_id: str | None
    lease_expires_at: datetime | None
    parent_seq: int | None
    step_index: int | None
    requires_key: str | None
    warm_key: str | None
    files: tuple[FileRow, ...] = ()
    confidential: Envelope | None = None
    # verify (issue 13): see `csml.coordinator.verification`
    trusted_only: bool = False
    min_reputation: int | None = None
    verify_runs: int = 0


_ENVELOPE_COLS = (
    ENVELOPES.c.job_seq.label("env_seq"),
    ENVELOPES.c.version.label("env_version"),
    ENVELOPES.c.job_nonce.label("env_nonce"),
    ENVELOPES.c.result_public_key.label("env_result_key"),
    ENVELOPES.c.encrypted_params.label("env_params"),
    ENVELOPES.c.encrypted_result.label("env_result"),
)
# The columns a JobRow carries: a column read for one purpose only (credit's
# `credit_lease`, read by completion in `jobs_end`) stays out of it.
_JOB_FIELDS = [c.name for c in JOBS.columns if c.name in JobRow.__dataclass_fields__]


# A job's file columns, in the order of `FileRow`'s fields (one JSON array per job in
# job loads and in the claim's RETURNING, `INPUT_FILES_OF_JOB`).
FILE_COLUMNS = (
    FILES.c.kind,
    FILES.c.name,
    FILES.c.size,
    FILES.c.sha256,
    FILES.c.media_type,
    FILES.c.blob,
    FILES.c.model_id,
)


class _FilesAgg(FunctionElement[Any]):
    """An aggregate of its arguments' rows into one JSON array of arrays (per dialect)."""

    name = "files_agg"
    inherit_cache = True


@compiles(_FilesAgg, "sqlite")
def _files_agg_sqlite(element: _FilesAgg, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_group_array(json_array({compiler.process(element.clauses, **kw)}))"


@compiles(_FilesAgg, "postgresql")
def _files_agg_pg(element: _FilesAgg, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_agg(json_build_array({compiler.process(element.clauses, **kw)}))"


_FILES_OF_JOB = (
    select(_FilesAgg(*FILE_COLUMNS))
    .where(FILES.c.job_seq == JOBS.c.seq)
    .scalar_subquery()
    .label("files_json")
)


# A job's input files as one JSON array (NULL or `[]` without any), for a statement on
# `jobs` (the claim's RETURNING: `jobs_write.take`); `files_of` reads it.
INPUT_FILES_OF_JOB = (
    select(_FilesAgg(*FILE_COLUMNS))
    .where(FILES.c.job_seq == JOBS.c.seq, FILES.c.kind == "input")
    .scalar_subquery()
    .label("inputs_json")
)


# What a statement returning whole jobs that have no envelope selects (e.g. a plain
# job's end, `jobs_end.end_held`): `plain_row` makes each a `JobRow`, as a load would.
PLAIN_JOB_COLUMNS = (*(JOBS.c[name] for name in _JOB_FIELDS), _FILES_OF_JOB)


def _select_jobs() -> Select[Any]:
    return select(JOBS, *_ENVELOPE_COLS, _FILES_OF_JOB).select_from(
        JOBS.outerjoin(ENVELOPES, ENVELOPES.c.job_seq == JOBS.c.seq)
    )


# Where a `_select_jobs` row holds each value (rows are read by position: a `Prepared`
# statement's rows are plain tuples).
# A `JobRow` is made positionally: its fields in order, `files` and `confidential` where
# they stand among them.
_ROW_FIELDS = list(JobRow.__dataclass_fields__)
_AROUND = _ROW_FIELDS.index("files"), _ROW_FIELDS.index("confidential")
assert _AROUND[1] == _AROUND[0] + 1
assert set(_ROW_FIELDS) - {"files", "confidential"} == set(_JOB_FIELDS)
_SELECTED = [c.key for c in _select_jobs().selected_columns]
_JOB_AT = tuple(_SELECTED.index(name) for name in _ROW_FIELDS if name in _JOB_FIELDS)
_ENV_AT = tuple(_SELECTED.index(str(c.key)) for c in _ENVELOPE_COLS)
_FILES_AT = _SELECTED.index("files_json")
# ... and in a `PLAIN_JOB_COLUMNS` row: the job's fields in `_JOB_FIELDS` order, then files.
_PLAIN_AT = tuple(_JOB_FIELDS.index(name) for name in _ROW_FIELDS if name in _JOB_FIELDS)
_PLAIN_FILES_AT = len(_JOB_FIELDS)


def _rows(
    conn: Connection, stmt: Select[Any] | Prepared, params: dict[str, Any] | None = None
) -> list[JobRow]:
    """Run a `_select_jobs` statement: the rows with their files and envelopes (one
    statement)."""
    if isinstance(stmt, Prepared):
        return [_job(r) for r in stmt.rows(conn, params or {})]
    return [_job(r) for r in conn.execute(stmt, params)]


def files_of(found: Any) -> tuple[FileRow, ...]:
    """The `files_json` (or `inputs_json`) of a row: text on SQLite, decoded by the
    driver on PostgreSQL, NULL there for a job without files."""
    if found is None or found == "[]":  # SQLite's empty aggregate: most jobs' files
        return ()
    if isinstance(found, str | bytes):
        found = json.loads(found)
    return tuple(FileRow(*f) for f in found)


def _job(r: Sequence[Any]) -> JobRow:
    seq, version, nonce, result_key, params, result = (r[i] for i in _ENV_AT)
    env = Envelope(version, nonce, result_key, params, result) if seq is not None else None
    values: list[Any] = [r[i] for i in _JOB_AT]
    values[_AROUND[0] : _AROUND[0]] = (files_of(r[_FILES_AT]), env)
    return JobRow(*values)


def plain_row(r: Sequence[Any]) -> JobRow:
    """A row of `PLAIN_JOB_COLUMNS` as the `JobRow` a load gives (no envelope)."""
    values: list[Any] = [r[i] for i in _PLAIN_AT]
    values[_AROUND[0] : _AROUND[0]] = (files_of(r[_PLAIN_FILES_AT]), None)
    return JobRow(*values)


def load(
    conn: Connection,
    *where: ColumnElement[bool],
    lock: bool = False,
    newest_first: bool = False,
    limit: int | None = None,
) -> list[JobRow]:
    """The jobs matching `where`, oldest first (or newest first), with files and envelope."""
    stmt = _select_jobs().where(*where)
    stmt = stmt.order_by(JOBS.c.seq.desc() if newest_first else JOBS.c.seq)
    if limit is not None:
        stmt = stmt.limit(limit)
    if lock:
        stmt = stmt.with_for_update(of=JOBS)
    return _rows(conn, stmt)


# -- the owner's view -------------------------------------------------------------


# An id or a prefix of one: ids are lowercase hex (`ids.is_id_prefix`), so a prefix is
# a LIKE pattern with nothing to escape.
_BY_OWNER_ID = (JOBS.c.owner_id == bindparam("owner_id"), JOBS.c.id == bindparam("ident"))
_BY_OWNER_PREFIX = (JOBS.c.owner_id == bindparam("owner_id"), JOBS.c.id.like(bindparam("ident")))
_OWNED_SELECTS = {
    full: _select_jobs().where(*(_BY_OWNER_ID if full else _BY_OWNER_PREFIX)).limit(2)
    for full in (True, False)
}
_OWNED = {full: Prepared(stmt) for full, stmt in _OWNED_SELECTS.items()}
_OWNED_LOCKED = {
    full: Prepared(stmt.with_for_update(of=JOBS)) for full, stmt in _OWNED_SELECTS.items()
}
_OWNED_STATE = {
    full: select(JOBS.c.id, JOBS.c.state)
    .where(*(_BY_OWNER_ID if full else _BY_OWNER_PREFIX))
    .limit(2)
    for full in (True, False)
}
_BY_ID = Prepared(_select_jobs().where(JOBS.c.id == bindparam("job_id")))


def _owned_params(owner_id: str, ident: str) -> tuple[bool, dict[str, Any]]:
    if not ids.is_id_prefix(ident):
        raise NotFound.of("job", ident)
    full = len(ident) == ids.ID_LENGTH
    return full, {"owner_id": owner_id, "ident": ident if full else f"{ident}%"}


def _one(found: Sequence[Any], ident: str) -> Any:
    if not found:
        raise NotFound.of("job", ident)
    if len(found) > 1:
        raise Malformed("ambiguous_id", f"{ident!r} matches several jobs; give more of it")
    return found[0]


def owned(conn: Connection, owner_id: str, ident: str, *, lock: bool = False) -> JobRow:
    """The owner's job whose id is `ident` or starts with it (see the invariants)."""
    full, params = _owned_params(owner_id, ident)
    stmt = (_OWNED_LOCKED if lock else _OWNED)[full]
    return cast(JobRow, _one(_rows(conn, stmt, params), ident))


def by_id(conn: Connection, job_id: str) -> JobRow | None:
    """The job with this id, whoever owns it (for its worker), or None."""
    found = _rows(conn, _BY_ID, {"job_id": job_id})
    return found[0] if found else None


_CONTENT = Prepared(
    select(FILES.c.content).where(
        FILES.c.job_seq == bindparam("seq"),
        FILES.c.kind == bindparam("kind"),
        FILES.c.name == bindparam("name"),
    )
)


def file_content(conn: Connection, seq: int, kind: str, name: str) -> bytes | None:
    """The bytes of job `seq`'s file `name` of `kind` kept in the database (its
    `content`), or None: no such file, or one on disk."""
    found = _CONTENT.scalar(conn, {"seq": seq, "kind": kind, "name": name})
    return bytes(found) if found is not None else None


@dataclass(frozen=True, slots=True)
class OwnedFile:
    """One file of an owner's job as its download needs it (`owned_file`): the job's id,
    when it ended (or was made, if it has not), the file's row and, for a blob kept in the
    database (`csml.store.blobs.in_db`), its bytes (None: on disk, or erased)."""

    job_id: str
    ended_at: datetime
    file: FileRow


# The owner's job (by id or prefix, as `owned`) with its file of this kind and name, if
# it has one (a left join: the job's row alone says there is none): one statement, the
# file's bytes with it when the database keeps them.
_OWNED_FILE = {
    full: Prepared(
        select(
            JOBS.c.id,
            JOBS.c.finished_at,
            JOBS.c.created_at,
            *FILE_COLUMNS,
            FILES.c.content,
        )
        .select_from(
            JOBS.outerjoin(
                FILES,
                and_(
                    FILES.c.job_seq == JOBS.c.seq,
                    FILES.c.kind == bindparam("kind"),
                    FILES.c.name == bindparam("name"),
                ),
            )
        )
        .where(*(_BY_OWNER_ID if full else _BY_OWNER_PREFIX))
        .limit(2)
    )
    for full in (True, False)
}


def owned_file(
    conn: Connection, owner_id: str, ident: str, kind: str, name: str
) -> OwnedFile | None:
    """The owner's job `ident` (found as `owned` finds it: `NotFound`, `Malformed`) with
    its file `name` of `kind` and, kept in the database, that file's bytes; None when the
    job has no such file. One statement (a download's whole read: no job load, no second
    read for the bytes)."""
    full, params = _owned_params(owner_id, ident)
    found = _OWNED_FILE[full].rows(conn, {**params, "kind": kind, "name": name})
    row = _one(found, ident)
    job_id, finished_at, created_at = row[0], row[1], row[2]
    if row[3] is None:  # the join found no file: the job has none of that name
        return None
    kind_, name_, size, sha256, media_type, blob, model_id, content = row[3:]
    return OwnedFile(
        job_id,
        finished_at or created_at,
        FileRow(
            kind_,
            name_,
            size,
            sha256,
            media_type,
            blob,
            model_id,
            bytes(content) if content is not None else None,
        ),
    )


def owned_state(conn: Connection, owner_id: str, ident: str) -> tuple[str, str]:
    """(id, state) of the owner's job `ident`; one query, no files."""
    full, params = _owned_params(owner_id, ident)
    row = _one(conn.execute(_OWNED_STATE[full], params).all(), ident)
    return str(row[0]), str(row[1])


def list_owned(
    conn: Connection, owner_id: str, *, state: str | None, app: str | None, limit: int
) -> list[JobRow]:
    """The owner's jobs (pipeline steps left out), newest first."""
    where = [JOBS.c.owner_id == owner_id, JOBS.c.parent_seq.is_(None)]
    if state:
        where.append(JOBS.c.state == state)
    if app:
        where.append(JOBS.c.app == app)
    return load(conn, *where, newest_first=True, limit=limit)


_OWNED_IN = {
    by: Prepared(
        _select_jobs()
        .where(JOBS.c.owner_id == bindparam("owner_id"), col.in_(bindparam("keys", expanding=True)))
        .order_by(JOBS.c.seq)
    )
    for by, col in (("id", JOBS.c.id), ("seq", JOBS.c.seq))
}


def changed(conn: Connection, owner_id: str, job_ids: Iterable[str]) -> list[JobRow]:
    """The owner's jobs among `job_ids` as the owner lists them: a pipeline step stands
    for its pipeline; another identity's or an erased job is left out. Oldest first."""
    found: dict[int, JobRow] = {}
    wanted = sorted(job_ids)
    for i in range(0, len(wanted), CHUNK):
        params = {"owner_id": owner_id, "keys": wanted[i : i + CHUNK]}
        rows = _rows(conn, _OWNED_IN["id"], params)
        parents = {r.parent_seq for r in rows if r.parent_seq is not None}
        found.update((r.seq, r) for r in rows if r.parent_seq is None)
        missing = sorted(parents - found.keys())
        if missing:
            by_seq: dict[str, Any] = {"owner_id": owner_id, "keys": missing}
            found.update((r.seq, r) for r in _rows(conn, _OWNED_IN["seq"], by_seq))
    return sorted(found.values(), key=lambda j: j.seq)


def steps_of(conn: Connection, parent_seqs: Sequence[int]) -> dict[int, list[JobRow]]:
    """The step jobs of these pipelines, by parent seq (every parent has an entry)."""
    out: dict[int, list[JobRow]] = {seq: [] for seq in parent_seqs}
    if parent_seqs:
        for step in load(conn, JOBS.c.parent_seq.in_(list(parent_seqs))):
            assert step.parent_seq is not None
            out[step.parent_seq].append(step)
    return out


def ranks_ahead(conn: Connection, app: str, last_rank: int) -> list[tuple[int, int]]:
    """(fair_rank, seq) of `app`'s queued jobs up to `last_rank`, in claim order."""
    stmt = (
        select(JOBS.c.fair_rank, JOBS.c.seq)
        .where(JOBS.c.app == app, JOBS.c.state == QUEUED, JOBS.c.fair_rank <= last_rank)
        .order_by(JOBS.c.fair_rank, JOBS.c.seq)
    )
    return [(int(rank), int(seq)) for rank, seq in conn.execute(stmt)]


def queue_stats(conn: Connection) -> dict[str, dict[str, int]]:
    """Jobs per app and state (queued and running only)."""
    stats: dict[str, dict[str, int]] = {}
    stmt = (
        select(JOBS.c.app, JOBS.c.state, func.count())
        .where(JOBS.c.state.in_([QUEUED, RUNNING]))
        .group_by(JOBS.c.app, JOBS.c.state)
    )
    for app, state, count in conn.execute(stmt):
        stats.setdefault(app, {})[state] = int(count)
    return stats


@dataclass(frozen=True, slots=True)
class LiveWorkers:
    """An app's live workers: how many, their slots in all, their sandboxes."""

    workers: int
    slots: int
    sandboxes: tuple[str, ...]


def live_workers(conn: Connection, live_since: datetime) -> dict[str, LiveWorkers]:
    """Per app, the workers not stopped that were heard from at or after `live_since`."""
    live = and_(WORKERS.c.stopped_at.is_(None), WORKERS.c.last_heartbeat >= live_since)
    counts = conn.execute(
        select(WORKERS.c.app, func.count(), func.sum(WORKERS.c.slots))
        .where(live)
        .group_by(WORKERS.c.app)
    ).all()
    sandboxes: dict[str, list[str]] = {}
    for app, sandbox in conn.execute(
        select(WORKERS.c.app, WORKERS.c.sandbox).where(live).distinct()
    ):
        sandboxes.setdefault(app, []).append(sandbox)
    return {
        app: LiveWorkers(int(n), int(slots or 0), tuple(sorted(sandboxes.get(app, []))))
        for app, n, slots in counts
    }


# -- submission's reads (also inside the submit transaction) ----------------------


_DEPTH = (
    select(func.count())
    .select_from(JOBS)
    .where(JOBS.c.app == bindparam("app"), JOBS.c.state == QUEUED)
)


def queued_depth(conn: Connection | Session, app: str) -> int:
    """How many of `app`'s jobs are queued (an exact count)."""
    return int(conn.scalar(_DEPTH, {"app": app}) or 0)


def keyed_live_workers(conn: Connection, worker_ids: Sequence[str], app: str) -> set[str]:
    """Those of `worker_ids` that are running workers of `app` with a registered key."""
    stmt = (
        select(WORKERS.c.id)
        .join(WORKER_KEYS, WORKER_KEYS.c.worker_id == WORKERS.c.id)
        .where(
            WORKERS.c.id.in_(list(worker_ids)),
            WORKERS.c.app == app,
            WORKERS.c.stopped_at.is_(None),
        )
    )
    return {str(w) for w in conn.scalars(stmt)}


# -- claims -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimant:
    """What a contributed worker's claim is filtered by (`claimable`), from the cached
    view of the worker (`csml.coordinator.verification.Verifier.claimant`)."""

    contributor_id: str
    reputation: int
    quarantined: bool
    operations: tuple[str, ...] | None  # None: any operation


def claimable(
    worker_id: Any,
    app: Any,
    met: Any = None,
    *,
    contributed: bool = False,
    quarantined: bool = False,
    operations: bool = False,
) -> ColumnElement[bool]:
    """Queued jobs of `app` this worker may take: a confidential job only by the
    workers its data key was sealed to; with `met` (the requirement keys this worker
    meets, see `csml.placement`), a job with a requirement only if its key is in it. An
    operator worker's claim stops there (whatever the verification policies).

    A contributed worker's (`contributed`; bound parameters `b_party`, its contributor,
    and `b_reputation`; see `csml.coordinator.verification`) takes no `trusted_only` job,
    none whose `min_reputation` is above its reputation, and no job being checked that
    its party already ran; a `quarantined` one only jobs being checked; with
    `operations`, only the operations bound as `b_ops` (the deterministic ones)."""
    sealed = select(RECIPIENTS.c.job_seq).where(RECIPIENTS.c.job_seq == JOBS.c.seq)
    to_me = sealed.where(RECIPIENTS.c.worker_id == worker_id)
    where: list[ColumnElement[bool]] = [
        JOBS.c.app == app,
        JOBS.c.state == QUEUED,
        or_(~sealed.exists(), to_me.exists()),
    ]
    if met is not None:
        where.append(or_(JOBS.c.requires_key.is_(None), JOBS.c.requires_key.in_(met)))
    if contributed:
        ran = select(RUNS.c.id).where(
            RUNS.c.job_seq == JOBS.c.seq, RUNS.c.contributor_id == bindparam("b_party")
        )
        where += [
            JOBS.c.trusted_only.is_(False),
            or_(
                JOBS.c.min_reputation.is_(None),
                JOBS.c.min_reputation <= bindparam("b_reputation"),
            ),
            or_(JOBS.c.verify_runs == 0, ~ran.exists()),
        ]
        if quarantined:
            where.append(JOBS.c.verify_runs > 0)
        if operations:
            where.append(JOBS.c.operation.in_(bindparam("b_ops", expanding=True)))
    return and_(*where)


@dataclass(frozen=True, slots=True)
class Lease:
    """A job's lease and progress as stored (what a heartbeat would change)."""

    state: str
    worker_id: str | None
    lease_id: str | None
    lease_expires_at: datetime | None
    progress_fraction: float
    progress_message: str


_LEASES = Prepared(
    select(
        JOBS.c.id,
        JOBS.c.state,
        JOBS.c.worker_id,
        JOBS.c.lease_id,
        JOBS.c.lease_expires_at,
        JOBS.c.progress_fraction,
        JOBS.c.progress_message,
    ).where(JOBS.c.id.in_(bindparam("ids", expanding=True)))
)


def leases(conn: Connection, job_ids: Sequence[str]) -> dict[str, Lease]:
    """The leases of these jobs, by id (a read: whether a heartbeat needs a write)."""
    return {r[0]: Lease(*r[1:]) for r in _LEASES.rows(conn, {"ids": list(job_ids)})}


_MET: BindParameter[Any] = bindparam("met", expanding=True)


@functools.cache
def _probe(contributed: bool, quarantined: bool, operations: bool) -> Any:
    """One statement: whether a job waits for this worker, and the app's newest
    requirement key (the caller reloads its keys when that grew: `requirement_keys`)."""
    where = claimable(
        bindparam("worker_id"),
        bindparam("app"),
        _MET,
        contributed=contributed,
        quarantined=quarantined,
        operations=operations,
    )
    return Prepared(
        select(
            select(JOBS.c.seq).where(where).limit(1).scalar_subquery(),
            select(func.max(PLACEMENT_KEYS.c.id))
            .where(PLACEMENT_KEYS.c.app == bindparam("app"))
            .scalar_subquery(),
        )
    )


def probe(
    conn: Connection,
    worker_id: str,
    app: str,
    met: Sequence[str],
    claimant: Claimant | None = None,
) -> tuple[bool, int]:
    """(whether a job waits for this worker, given the requirement keys it meets and, for
    a contributed worker, its `claimant` filter; the largest `placement_keys.id` of the
    app, 0 if none): a read, one statement."""
    params: dict[str, Any] = {"worker_id": worker_id, "app": app, "met": list(met)}
    params.update(claimant_params(claimant))
    head, newest = _probe(*claimant_key(claimant)).rows(conn, params)[0]
    return head is not None, int(newest or 0)


_KEYS = (
    select(PLACEMENT_KEYS.c.id, PLACEMENT_KEYS.c.key, PLACEMENT_KEYS.c.requires)
    .where(PLACEMENT_KEYS.c.app == bindparam("app"), PLACEMENT_KEYS.c.id > bindparam("after"))
    .order_by(PLACEMENT_KEYS.c.id)
)


def requirement_keys(conn: Connection, app: str, after: int = 0) -> list[tuple[int, str, Any]]:
    """(id, key, requirement) of the app's requirement keys with an id above `after`."""
    return [(int(i), str(k), r) for i, k, r in conn.execute(_KEYS, {"app": app, "after": after})]


def requirement_of(conn: Connection, app: str, key: str) -> dict[str, Any] | None:
    row = conn.execute(
        select(PLACEMENT_KEYS.c.requires).where(
            PLACEMENT_KEYS.c.app == app, PLACEMENT_KEYS.c.key == key
        )
    ).first()
    return None if row is None else dict(row[0])


def labels_since(
    conn: Connection, app: str, since: datetime, *, stopped: bool = False
) -> list[dict[str, Any]]:
    """The labels of `app`'s workers not stopped and heard from at or after `since`;
    with `stopped`, also of those that stopped at or after it (live within the window)."""
    if stopped:
        heard = func.coalesce(WORKERS.c.stopped_at, WORKERS.c.last_heartbeat) >= since
    else:
        heard = and_(WORKERS.c.stopped_at.is_(None), WORKERS.c.last_heartbeat >= since)
    stmt = select(WORKERS.c.labels).where(WORKERS.c.app == app, heard)
    return [dict(labels or {}) for (labels,) in conn.execute(stmt)]


def claimant_key(claimant: Claimant | None) -> tuple[bool, bool, bool]:
    """Which variant of the claim predicate a claimant needs (see `claimable`)."""
    if claimant is None:
        return (False, False, False)
    return (True, claimant.quarantined, claimant.operations is not None)


def claimant_params(claimant: Claimant | None) -> dict[str, Any]:
    """The bound parameters of a contributed worker's claim predicate."""
    if claimant is None:
        return {}
    params: dict[str, Any] = {
        "b_party": claimant.contributor_id,
        "b_reputation": claimant.reputation,
    }
    if claimant.operations is not None:
        params["b_ops"] = list(claimant.operations)
    return params
