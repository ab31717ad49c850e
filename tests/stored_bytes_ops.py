"""Random sequences of what changes an identity's stored bytes, for the counter's property
tests on SQLite (tests/unit/test_stored_bytes.py) and PostgreSQL
(tests/integration/postgres/test_stored_bytes_pg.py).

`Store.play(ops)` makes two fresh identities, runs each operation in a transaction of
its own through the store's own functions where the coordinator has one (the hot path's
`insert_job` and `add_files`, the ORM's pipeline steps and params, `models.add` and
`delete_owned`, retention's `delete_job_rows`, erasure's `lock_for_erasure` +
`delete_identity`), or as a plain statement for what only a cascade or a future path
does (a job or identity deleted alone, a file or model row changed in place), and after
each one checks, for every identity of the run, that its counter equals the sum the
quota used to compute (`jobs_quota.summed_stored_bytes`) and that `stored_blobs` holds
exactly the (blob, size) file counts of its jobs.

An operation is (kind, a, b, c): small integers that pick a job, a blob, a size, params
and so on among what exists at that point, so any list of them is a valid run (and
hypothesis shrinks a failing one to a short one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from csml import ids
from csml.coordinator.retention import delete_job_rows
from csml.store import identities as identity_rows
from csml.store import jobs_quota
from csml.store import models as model_rows
from csml.store.db import make_sessionmaker, transaction
from csml.store.jobs import FILES, JOBS, FileRow
from csml.store.jobs_write import NewJob, add_files, insert_job
from csml.store.models import StoredModel
from csml.store.tables import Identity, Job, JobFile, StoredBlob, utcnow
from csml.store.tables_artifacts import ModelArtifact

KINDS = (
    "submit",  # a job with 0-2 inputs (insert_job, the hot path)
    "step",  # a pipeline step sharing its parent's blobs (ORM, as pipelines do)
    "output",  # an output file of a job (add_files, as a completion does)
    "params",  # a job's params replaced (ORM, as attaching a model does)
    "model",  # a model kept: of a job of its owner, another's job, none, a gone one
    "unmodel",  # a model deleted (models.delete_owned)
    "repoint",  # a model's job changed in place (no code does it; the trigger counts it)
    "reblob",  # a file's blob or size changed in place (likewise)
    "expire",  # a job and its steps deleted by retention (delete_job_rows)
    "drop",  # a job deleted alone: its files and steps go by cascade
    "erase",  # an identity erased (lock_for_erasure, delete_job_rows, delete_identity)
    "drop_identity",  # an identity deleted alone: everything goes by cascade
)
Op = tuple[str, int, int, int]

BLOBS = ("blob/a", "blob/b", "blob/c", "blob/d")
SIZES = (1, 7, 1000)
PARAMS: tuple[dict[str, Any], ...] = (
    {},
    {"a": 1},
    {"text": "ééé", "n": [1, 2, 3]},
    {"model": "x" * 40, "nested": {"k": None}},
)


# Sequences worth naming (each also one the property tests may draw).
NAMED: list[list[Op]] = [
    # A pipeline and its step share blobs: counted once, until both are gone.
    [("submit", 0, 0, 2), ("step", 0, 0, 0), ("step", 0, 1, 1), ("expire", 0, 0, 0)],
    # A step dropped alone, then its parent by cascade.
    [("submit", 0, 0, 2), ("step", 0, 0, 1), ("drop", 1, 0, 0), ("drop", 0, 0, 0)],
    # A model of a job counts once its job is gone (retention), until deleted.
    [("submit", 0, 1, 1), ("model", 0, 1, 0), ("expire", 0, 0, 0), ("unmodel", 0, 0, 0)],
    # A model naming another identity's job counts from the start.
    [("submit", 1, 0, 1), ("model", 0, 2, 0), ("drop", 0, 0, 0)],
    # Erasure, and a plain delete of an identity with everything it holds.
    [("submit", 0, 2, 2), ("output", 0, 1, 2), ("model", 0, 1, 0), ("erase", 0, 0, 0)],
    [("submit", 0, 2, 2), ("step", 0, 1, 1), ("model", 0, 0, 1), ("drop_identity", 0, 0, 0)],
    # Rows changed in place.
    [("submit", 0, 0, 2), ("reblob", 0, 3, 1), ("params", 0, 2, 0), ("repoint", 0, 0, 1)],
]


@dataclass
class Run:
    """What one `play` made (alive or not): its identities."""

    owners: list[str] = field(default_factory=list)


class Store:
    """A migrated store (SQLite or PostgreSQL) that plays operation sequences."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions: sessionmaker[Session] = make_sessionmaker(engine)
        self.names = 0

    # -- what exists -------------------------------------------------------------------

    def _alive(self, owners: Sequence[str]) -> list[str]:
        with self.engine.connect() as conn:
            found = set(conn.scalars(select(Identity.id).where(Identity.id.in_(list(owners)))))
        return [o for o in owners if o in found]

    def _jobs(self, owners: Sequence[str]) -> list[tuple[int, str, str, int | None]]:
        """(seq, id, owner, parent seq) of the run's jobs, in seq order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(JOBS.c.seq, JOBS.c.id, JOBS.c.owner_id, JOBS.c.parent_seq)
                .where(JOBS.c.owner_id.in_(list(owners)))
                .order_by(JOBS.c.seq)
            ).all()
        return [(int(s), str(i), str(o), p) for s, i, o, p in rows]

    def _models(self, owners: Sequence[str]) -> list[tuple[str, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ModelArtifact.id, ModelArtifact.owner_id)
                .where(ModelArtifact.owner_id.in_(list(owners)))
                .order_by(ModelArtifact.seq)
            ).all()
        return [(str(m), str(o)) for m, o in rows]

    def _name(self) -> str:
        self.names += 1
        return f"f{self.names}"

    def _identity(self) -> str:
        owner = ids.new_id()
        with transaction(self.sessions) as session:
            session.add(Identity(id=owner, token_hash=ids.new_id(), created_at=utcnow()))
        return owner

    # -- the check ---------------------------------------------------------------------

    def check(self, owners: Sequence[str]) -> None:
        """Each identity's counter is the sum, and `stored_blobs` the file counts."""
        with self.engine.connect() as conn:
            for owner in owners:
                counter = jobs_quota.stored_bytes(conn, owner)
                summed = jobs_quota.summed_stored_bytes(conn, owner)
                assert counter == summed, f"identity {owner}: counter {counter}, sum {summed}"
                held = set(
                    conn.execute(
                        select(StoredBlob.blob, StoredBlob.size, StoredBlob.refs).where(
                            StoredBlob.owner_id == owner
                        )
                    ).all()
                )
                files = set(
                    conn.execute(
                        select(FILES.c.blob, FILES.c.size, func.count())
                        .join(JOBS, JOBS.c.seq == FILES.c.job_seq)
                        .where(JOBS.c.owner_id == owner)
                        .group_by(FILES.c.blob, FILES.c.size)
                    ).all()
                )
                assert held == files, f"identity {owner}: stored_blobs {held}, files {files}"

    # -- a run -------------------------------------------------------------------------

    def play(self, ops: Sequence[Op]) -> Run:
        run = Run([self._identity(), self._identity()])
        for op in ops:
            self.step(run, op)
            self.check(run.owners)
        return run

    def step(self, run: Run, op: Op) -> None:
        kind, a, b, c = op
        owners = self._alive(run.owners)
        if not owners:
            run.owners.append(self._identity())
            owners = self._alive(run.owners)
        jobs = self._jobs(owners)
        owner = owners[a % len(owners)]
        if kind == "submit":
            inputs = [
                FileRow(
                    "input",
                    self._name(),
                    SIZES[(c + k) % len(SIZES)],
                    "0" * 64,
                    "application/octet-stream",
                    BLOBS[(b + k) % len(BLOBS)],
                )
                for k in range(c % 3)
            ]
            job = NewJob(
                id=ids.new_id(),
                owner_id=owner,
                app="echo",
                operation="echo",
                params=PARAMS[b % len(PARAMS)],
                limits={},
                fair_rank=1,
                created_at=utcnow(),
                max_attempts=1,
            )
            with self.engine.begin() as conn:
                insert_job(conn, job, inputs, None)
        elif kind == "model":
            others = [j for j in jobs if j[2] != owner]
            mine = [j for j in jobs if j[2] == owner]
            job_id = (
                None,
                mine[c % len(mine)][1] if mine else None,
                others[c % len(others)][1] if others else ids.new_id(),
                ids.new_id(),  # a job that is gone (or never was)
            )[b % 4]
            model = StoredModel(
                id=ids.new_id(),
                owner_id=owner,
                app="echo",
                kind="thing",
                format="test",
                format_version=1,
                name="m",
                operation="echo",
                job_id=job_id,
                size=SIZES[c % len(SIZES)] * 3,
                sha256="0" * 64,
                media_type="application/octet-stream",
                blob=f"models/{ids.new_id()}/m",
                metrics={},
                created_at=utcnow(),
            )
            with transaction(self.sessions) as session:
                model_rows.add(session, model)
        elif kind in ("unmodel", "repoint"):
            models = self._models(owners)
            if not models:
                return
            model_id, model_owner = models[a % len(models)]
            with transaction(self.sessions) as session:
                if kind == "unmodel":
                    model_rows.delete_owned(session, model_owner, model_id)
                else:
                    target = jobs[b % len(jobs)][1] if jobs and c % 2 else None
                    session.execute(
                        update(ModelArtifact)
                        .where(ModelArtifact.id == model_id)
                        .values(job_id=target, size=SIZES[b % len(SIZES)])
                    )
        elif kind in ("erase", "drop_identity"):
            with transaction(self.sessions) as session:
                if kind == "erase":
                    rows = identity_rows.lock_for_erasure(session, owner)
                    delete_job_rows(session, rows, utcnow())
                    identity_rows.delete_identity(session, owner, f"submit:{owner}")
                else:
                    session.execute(delete(Identity).where(Identity.id == owner))
        elif jobs:
            self._on_job(kind, jobs[a % len(jobs)], b, c)

    def _on_job(self, kind: str, job: tuple[int, str, str, int | None], b: int, c: int) -> None:
        seq, job_id, owner, _ = job
        if kind == "output":
            row = FileRow(
                "output",
                self._name(),
                SIZES[c % len(SIZES)],
                "0" * 64,
                "application/octet-stream",
                BLOBS[b % len(BLOBS)],
            )
            with self.engine.begin() as conn:
                add_files(conn, seq, [row])
        elif kind == "step":
            with transaction(self.sessions) as session:
                parent = session.get(Job, seq)
                assert parent is not None
                shared = [
                    JobFile(
                        kind="input",
                        name=self._name(),
                        size=f.size,
                        sha256=f.sha256,
                        media_type=f.media_type,
                        blob=f.blob,
                    )
                    for f in parent.files
                ]
                if c % 2:  # and one of its own
                    shared.append(
                        JobFile(
                            kind="input",
                            name=self._name(),
                            size=SIZES[b % len(SIZES)],
                            sha256="0" * 64,
                            media_type="application/octet-stream",
                            blob=BLOBS[c % len(BLOBS)],
                        )
                    )
                step = Job(
                    id=ids.new_id(),
                    owner_id=owner,
                    app="echo",
                    operation="echo",
                    params=PARAMS[c % len(PARAMS)],
                    limits={},
                    state="queued",
                    fair_rank=1,
                    created_at=utcnow(),
                    attempts=0,
                    max_attempts=1,
                    progress_fraction=0.0,
                    progress_message="",
                    parent_seq=seq,
                    step_index=b % 3,
                    files=shared,
                )
                session.add(step)
        elif kind == "params":
            with transaction(self.sessions) as session:
                found = session.get(Job, seq)
                assert found is not None
                found.params = PARAMS[b % len(PARAMS)]
        elif kind == "reblob":
            with self.engine.begin() as conn:
                name = conn.scalar(
                    select(FILES.c.name).where(FILES.c.job_seq == seq).order_by(FILES.c.name)
                )
                if name is not None:
                    conn.execute(
                        update(FILES)
                        .where(FILES.c.job_seq == seq, FILES.c.name == name)
                        .values(blob=BLOBS[b % len(BLOBS)], size=SIZES[c % len(SIZES)])
                    )
        elif kind == "expire":
            with transaction(self.sessions) as session:
                delete_job_rows(session, [(seq, job_id)], utcnow())
        elif kind == "drop":
            with self.engine.begin() as conn:
                conn.execute(text("DELETE FROM jobs WHERE seq = :seq"), {"seq": seq})


# Rows of every counted kind, seeded at revision 0010 (before the counter) by
# `seed_at_0010`, and the stored bytes of each identity they make: a: the blob "shared"
# once + "own" + m2 (its job is gone; m1's job is kept) + len('{"x": 1}'); b: 7 + the
# params' 15 characters; c: m3 (no job).
SEEDED = {"a": 100 + 30 + 20000 + 8, "b": 7 + 15, "c": 5}
STAMP = "'2026-01-01 00:00:00'"


def seed_at_0010(conn: Connection) -> None:
    """Insert `SEEDED`'s rows (columns every revision since 0010 has) and commit."""
    for owner in ("a", "b", "c"):
        conn.execute(
            text(f"INSERT INTO identities (id, token_hash, created_at) VALUES (:o, :h, {STAMP})"),
            {"o": owner, "h": "h" + owner},
        )
    jobs = [("j1", "a", '{"x": 1}'), ("j2", "a", "{}"), ("j3", "b", '{"text": "ééé"}')]
    for seq, (job_id, owner, params) in enumerate(jobs, start=1):
        conn.execute(
            text(
                "INSERT INTO jobs (seq, id, owner_id, app, operation, params, limits, "
                "state, fair_rank, created_at, attempts, max_attempts, progress_fraction, "
                "progress_message, trusted_only, verify_runs) VALUES (:seq, :id, :o, "
                f"'echo', 'echo', :p, '{{}}', 'succeeded', 1, {STAMP}, 1, 1, 1.0, '', false, 0)"
            ),
            {"seq": seq, "id": job_id, "o": owner, "p": params},
        )
    files = [(1, "in", "shared", 100), (2, "in", "shared", 100), (2, "out", "own", 30)]
    files += [(3, "in", "b-file", 7)]
    for seq, name, blob, size in files:
        conn.execute(
            text(
                "INSERT INTO job_files (job_seq, kind, name, size, sha256, media_type, "
                "blob) VALUES (:seq, 'input', :name, :size, '', '', :blob)"
            ),
            {"seq": seq, "name": name, "size": size, "blob": blob},
        )
    models = [("m1", "a", "j1", 1000), ("m2", "a", "gone", 20000), ("m3", "c", None, 5)]
    for model_id, keeper, made_by, size in models:
        conn.execute(
            text(
                "INSERT INTO models (id, owner_id, app, kind, format, format_version, name, "
                "job_id, size, sha256, media_type, blob, metrics, created_at) VALUES "
                f"(:id, :o, 'echo', 'k', 'f', 1, 'm', :j, :s, '', '', :id, '{{}}', {STAMP})"
            ),
            {"id": model_id, "o": keeper, "j": made_by, "s": size},
        )
    conn.commit()
