"""stored bytes: a per-identity counter kept by triggers, so the quota reads one row

Revision ID: 0011_stored_bytes
Revises: 0010_placement
Create Date: 2026-12-06

An identity's stored bytes (what `max_stored_bytes` limits) were summed on every
submission from its kept jobs: O(kept jobs). They are now a column of its row,
`identities.stored_bytes`, that triggers keep equal to that same sum in the statement
that changes a counted row (so in its transaction, whoever sends it: the hot path, the
ORM, a cascade, an older coordinator during a rolling upgrade). The sum is unchanged:

- each distinct (blob, size) among the files of the identity's jobs, once (a pipeline
  and its steps share blobs): `stored_blobs` counts the file rows holding each, and
  the size counts while that count is above 0;
- plus its models whose job is gone (job_id NULL, or no job of the identity has it);
- plus the length of the params JSON text of its jobs, where longer than 2 (`{}`).

Deleting a job first deletes its file rows (its BEFORE DELETE trigger), so their
triggers still find the job's owner; a cascade from the job does the same. A job's
owner and id never change (a trigger refuses it: the counts are keyed by them).

PostgreSQL: each change is an atomic increment of the identity's row (held to the end
of the transaction); a file's trigger locks that row before its `stored_blobs` row
(the order a submission takes them in: identity, then what it inserts), which changes
by upsert or UPDATE ... RETURNING; a model's trigger key-share-locks its job's row, so
a model and its job removed by concurrent transactions count exactly once. The upgrade locks the
four tables before it backfills, so no write lands between the triggers and the sums.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_stored_bytes"
down_revision = "0010_placement"
branch_labels = None
depends_on = None

_TABLES = ("jobs", "job_files", "models")

# The SQLite triggers. `length(CAST(params AS TEXT))` is how the sum counted params; a
# file's owner is its job's. A file row in: its blob's count up, its size in when the
# count became 1; out: its size out when it was the blob's last row, the count down.
SQLITE_TRIGGERS = [
    """
CREATE TRIGGER stored_bytes_job_insert AFTER INSERT ON jobs
WHEN length(CAST(NEW.params AS TEXT)) > 2
  OR EXISTS (SELECT 1 FROM models m WHERE m.job_id = NEW.id)
BEGIN
  UPDATE identities SET stored_bytes = stored_bytes
    + (CASE WHEN length(CAST(NEW.params AS TEXT)) > 2
       THEN length(CAST(NEW.params AS TEXT)) ELSE 0 END)
    - coalesce((SELECT sum(m.size) FROM models m
                WHERE m.job_id = NEW.id AND m.owner_id = NEW.owner_id), 0)
  WHERE id = NEW.owner_id;
END""",
    """
CREATE TRIGGER stored_bytes_job_keys BEFORE UPDATE OF owner_id, id ON jobs
WHEN OLD.owner_id IS NOT NEW.owner_id OR OLD.id IS NOT NEW.id
BEGIN
  SELECT RAISE(ABORT, 'a job''s owner and id never change (stored bytes count by them)');
END""",
    """
CREATE TRIGGER stored_bytes_job_params AFTER UPDATE OF params ON jobs
WHEN CAST(OLD.params AS TEXT) IS NOT CAST(NEW.params AS TEXT)
BEGIN
  UPDATE identities SET stored_bytes = stored_bytes
    + (CASE WHEN length(CAST(NEW.params AS TEXT)) > 2
       THEN length(CAST(NEW.params AS TEXT)) ELSE 0 END)
    - (CASE WHEN length(CAST(OLD.params AS TEXT)) > 2
       THEN length(CAST(OLD.params AS TEXT)) ELSE 0 END)
  WHERE id = NEW.owner_id;
END""",
    """
CREATE TRIGGER stored_bytes_job_delete BEFORE DELETE ON jobs
BEGIN
  DELETE FROM job_files WHERE job_seq = OLD.seq;
  UPDATE identities SET stored_bytes = stored_bytes
    - (CASE WHEN length(CAST(OLD.params AS TEXT)) > 2
       THEN length(CAST(OLD.params AS TEXT)) ELSE 0 END)
    + coalesce((SELECT sum(m.size) FROM models m
                WHERE m.job_id = OLD.id AND m.owner_id = OLD.owner_id), 0)
  WHERE id = OLD.owner_id;
END""",
    """
CREATE TRIGGER stored_bytes_file_insert AFTER INSERT ON job_files
BEGIN
  INSERT INTO stored_blobs (owner_id, blob, size, refs)
    SELECT j.owner_id, NEW.blob, NEW.size, 1 FROM jobs j WHERE j.seq = NEW.job_seq
    ON CONFLICT (owner_id, blob, size) DO UPDATE SET refs = refs + 1;
  UPDATE identities SET stored_bytes = stored_bytes + NEW.size
  WHERE id = (SELECT j.owner_id FROM jobs j WHERE j.seq = NEW.job_seq)
    AND (SELECT b.refs FROM stored_blobs b WHERE b.owner_id = identities.id
         AND b.blob = NEW.blob AND b.size = NEW.size) = 1;
END""",
    """
CREATE TRIGGER stored_bytes_file_update AFTER UPDATE OF job_seq, blob, size ON job_files
WHEN OLD.job_seq IS NOT NEW.job_seq OR OLD.blob IS NOT NEW.blob OR OLD.size IS NOT NEW.size
BEGIN
  UPDATE identities SET stored_bytes = stored_bytes - OLD.size
  WHERE id = (SELECT j.owner_id FROM jobs j WHERE j.seq = OLD.job_seq)
    AND (SELECT b.refs FROM stored_blobs b WHERE b.owner_id = identities.id
         AND b.blob = OLD.blob AND b.size = OLD.size) = 1;
  DELETE FROM stored_blobs
  WHERE owner_id = (SELECT j.owner_id FROM jobs j WHERE j.seq = OLD.job_seq)
    AND blob = OLD.blob AND size = OLD.size AND refs <= 1;
  UPDATE stored_blobs SET refs = refs - 1
  WHERE owner_id = (SELECT j.owner_id FROM jobs j WHERE j.seq = OLD.job_seq)
    AND blob = OLD.blob AND size = OLD.size;
  INSERT INTO stored_blobs (owner_id, blob, size, refs)
    SELECT j.owner_id, NEW.blob, NEW.size, 1 FROM jobs j WHERE j.seq = NEW.job_seq
    ON CONFLICT (owner_id, blob, size) DO UPDATE SET refs = refs + 1;
  UPDATE identities SET stored_bytes = stored_bytes + NEW.size
  WHERE id = (SELECT j.owner_id FROM jobs j WHERE j.seq = NEW.job_seq)
    AND (SELECT b.refs FROM stored_blobs b WHERE b.owner_id = identities.id
         AND b.blob = NEW.blob AND b.size = NEW.size) = 1;
END""",
    """
CREATE TRIGGER stored_bytes_file_delete BEFORE DELETE ON job_files
BEGIN
  UPDATE identities SET stored_bytes = stored_bytes - OLD.size
  WHERE id = (SELECT j.owner_id FROM jobs j WHERE j.seq = OLD.job_seq)
    AND (SELECT b.refs FROM stored_blobs b WHERE b.owner_id = identities.id
         AND b.blob = OLD.blob AND b.size = OLD.size) = 1;
  DELETE FROM stored_blobs
  WHERE owner_id = (SELECT j.owner_id FROM jobs j WHERE j.seq = OLD.job_seq)
    AND blob = OLD.blob AND size = OLD.size AND refs <= 1;
  UPDATE stored_blobs SET refs = refs - 1
  WHERE owner_id = (SELECT j.owner_id FROM jobs j WHERE j.seq = OLD.job_seq)
    AND blob = OLD.blob AND size = OLD.size;
END""",
    """
CREATE TRIGGER stored_bytes_model_insert AFTER INSERT ON models
WHEN NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = NEW.job_id AND j.owner_id = NEW.owner_id)
BEGIN
  UPDATE identities SET stored_bytes = stored_bytes + NEW.size WHERE id = NEW.owner_id;
END""",
    """
CREATE TRIGGER stored_bytes_model_update AFTER UPDATE OF owner_id, job_id, size ON models
BEGIN
  UPDATE identities SET stored_bytes = stored_bytes - OLD.size
  WHERE id = OLD.owner_id AND NOT EXISTS (SELECT 1 FROM jobs j
    WHERE j.id = OLD.job_id AND j.owner_id = OLD.owner_id);
  UPDATE identities SET stored_bytes = stored_bytes + NEW.size
  WHERE id = NEW.owner_id AND NOT EXISTS (SELECT 1 FROM jobs j
    WHERE j.id = NEW.job_id AND j.owner_id = NEW.owner_id);
END""",
    """
CREATE TRIGGER stored_bytes_model_delete BEFORE DELETE ON models
WHEN NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = OLD.job_id AND j.owner_id = OLD.owner_id)
BEGIN
  UPDATE identities SET stored_bytes = stored_bytes - OLD.size WHERE id = OLD.owner_id;
END""",
]
SQLITE_TRIGGER_NAMES = [
    "stored_bytes_job_insert",
    "stored_bytes_job_keys",
    "stored_bytes_job_params",
    "stored_bytes_job_delete",
    "stored_bytes_file_insert",
    "stored_bytes_file_update",
    "stored_bytes_file_delete",
    "stored_bytes_model_insert",
    "stored_bytes_model_update",
    "stored_bytes_model_delete",
]

# PostgreSQL: one function per table (plpgsql), the same counting.
PG_FUNCTIONS = [
    """
CREATE FUNCTION csml_params_bytes(p json) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN length(CAST(p AS text)) > 2 THEN length(CAST(p AS text)) ELSE 0 END
$$""",
    """
CREATE FUNCTION csml_stored_bytes_job() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  delta bigint;
  owner varchar;
BEGIN
  IF TG_OP = 'INSERT' THEN
    owner := NEW.owner_id;
    delta := csml_params_bytes(NEW.params) - coalesce((SELECT sum(m.size) FROM models m
      WHERE m.job_id = NEW.id AND m.owner_id = NEW.owner_id), 0);
  ELSIF TG_OP = 'UPDATE' THEN
    IF OLD.owner_id IS DISTINCT FROM NEW.owner_id OR OLD.id IS DISTINCT FROM NEW.id THEN
      RAISE EXCEPTION 'a job''s owner and id never change (stored bytes count by them)';
    END IF;
    owner := NEW.owner_id;
    delta := csml_params_bytes(NEW.params) - csml_params_bytes(OLD.params);
  ELSE
    owner := OLD.owner_id;
    DELETE FROM job_files WHERE job_seq = OLD.seq;  -- counted out by their trigger
    delta := coalesce((SELECT sum(m.size) FROM models m
      WHERE m.job_id = OLD.id AND m.owner_id = OLD.owner_id), 0)
      - csml_params_bytes(OLD.params);
  END IF;
  IF delta <> 0 THEN
    UPDATE identities SET stored_bytes = stored_bytes + delta WHERE id = owner;
  END IF;
  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END
$$""",
    """
CREATE FUNCTION csml_stored_bytes_file() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  owner varchar;
  n integer;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    SELECT j.owner_id INTO owner FROM jobs j WHERE j.seq = OLD.job_seq;
    -- The identity's row first; none: it is being deleted, its counts go with it.
    PERFORM 1 FROM identities WHERE id = owner FOR NO KEY UPDATE;
    IF FOUND THEN
      UPDATE stored_blobs b SET refs = b.refs - 1
        WHERE b.owner_id = owner AND b.blob = OLD.blob AND b.size = OLD.size
        RETURNING b.refs INTO n;
      IF n <= 0 THEN
        DELETE FROM stored_blobs b
          WHERE b.owner_id = owner AND b.blob = OLD.blob AND b.size = OLD.size;
        UPDATE identities SET stored_bytes = stored_bytes - OLD.size WHERE id = owner;
      END IF;
    END IF;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    SELECT j.owner_id INTO owner FROM jobs j WHERE j.seq = NEW.job_seq;
    PERFORM 1 FROM identities WHERE id = owner FOR NO KEY UPDATE;
    IF FOUND THEN
      INSERT INTO stored_blobs AS b (owner_id, blob, size, refs)
        VALUES (owner, NEW.blob, NEW.size, 1)
        ON CONFLICT (owner_id, blob, size) DO UPDATE SET refs = b.refs + 1
        RETURNING b.refs INTO n;
      IF n = 1 THEN
        UPDATE identities SET stored_bytes = stored_bytes + NEW.size WHERE id = owner;
      END IF;
    END IF;
    RETURN NEW;
  END IF;
  RETURN OLD;
END
$$""",
    """
CREATE FUNCTION csml_stored_bytes_model() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN
    PERFORM 1 FROM jobs j WHERE j.id = OLD.job_id AND j.owner_id = OLD.owner_id FOR KEY SHARE;
    IF NOT FOUND THEN
      UPDATE identities SET stored_bytes = stored_bytes - OLD.size WHERE id = OLD.owner_id;
    END IF;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    PERFORM 1 FROM jobs j WHERE j.id = NEW.job_id AND j.owner_id = NEW.owner_id FOR KEY SHARE;
    IF NOT FOUND THEN
      UPDATE identities SET stored_bytes = stored_bytes + NEW.size WHERE id = NEW.owner_id;
    END IF;
    RETURN NEW;
  END IF;
  RETURN OLD;
END
$$""",
]
PG_TRIGGERS = [
    "CREATE TRIGGER stored_bytes_job_insert AFTER INSERT ON jobs "
    "FOR EACH ROW EXECUTE FUNCTION csml_stored_bytes_job()",
    "CREATE TRIGGER stored_bytes_job_update AFTER UPDATE OF params, owner_id, id ON jobs "
    "FOR EACH ROW WHEN (CAST(OLD.params AS text) IS DISTINCT FROM CAST(NEW.params AS text) "
    "OR OLD.owner_id IS DISTINCT FROM NEW.owner_id OR OLD.id IS DISTINCT FROM NEW.id) "
    "EXECUTE FUNCTION csml_stored_bytes_job()",
    "CREATE TRIGGER stored_bytes_job_delete BEFORE DELETE ON jobs "
    "FOR EACH ROW EXECUTE FUNCTION csml_stored_bytes_job()",
    "CREATE TRIGGER stored_bytes_file_insert AFTER INSERT ON job_files "
    "FOR EACH ROW EXECUTE FUNCTION csml_stored_bytes_file()",
    "CREATE TRIGGER stored_bytes_file_update AFTER UPDATE OF job_seq, blob, size ON job_files "
    "FOR EACH ROW WHEN (OLD.job_seq IS DISTINCT FROM NEW.job_seq OR OLD.blob IS DISTINCT "
    "FROM NEW.blob OR OLD.size IS DISTINCT FROM NEW.size) "
    "EXECUTE FUNCTION csml_stored_bytes_file()",
    "CREATE TRIGGER stored_bytes_file_delete BEFORE DELETE ON job_files "
    "FOR EACH ROW EXECUTE FUNCTION csml_stored_bytes_file()",
    "CREATE TRIGGER stored_bytes_model_insert AFTER INSERT ON models "
    "FOR EACH ROW EXECUTE FUNCTION csml_stored_bytes_model()",
    "CREATE TRIGGER stored_bytes_model_update AFTER UPDATE OF owner_id, job_id, size ON models "
    "FOR EACH ROW EXECUTE FUNCTION csml_stored_bytes_model()",
    "CREATE TRIGGER stored_bytes_model_delete BEFORE DELETE ON models "
    "FOR EACH ROW EXECUTE FUNCTION csml_stored_bytes_model()",
]
PG_DROPS = [
    "DROP TRIGGER IF EXISTS stored_bytes_job_insert ON jobs",
    "DROP TRIGGER IF EXISTS stored_bytes_job_update ON jobs",
    "DROP TRIGGER IF EXISTS stored_bytes_job_delete ON jobs",
    "DROP TRIGGER IF EXISTS stored_bytes_file_insert ON job_files",
    "DROP TRIGGER IF EXISTS stored_bytes_file_update ON job_files",
    "DROP TRIGGER IF EXISTS stored_bytes_file_delete ON job_files",
    "DROP TRIGGER IF EXISTS stored_bytes_model_insert ON models",
    "DROP TRIGGER IF EXISTS stored_bytes_model_update ON models",
    "DROP TRIGGER IF EXISTS stored_bytes_model_delete ON models",
    "DROP FUNCTION IF EXISTS csml_stored_bytes_model()",
    "DROP FUNCTION IF EXISTS csml_stored_bytes_file()",
    "DROP FUNCTION IF EXISTS csml_stored_bytes_job()",
    "DROP FUNCTION IF EXISTS csml_params_bytes(json)",
]

# The backfill: today's sum, once per identity (the blobs from `stored_blobs`, made first).
_BACKFILL_BLOBS = (
    "INSERT INTO stored_blobs (owner_id, blob, size, refs) "
    "SELECT j.owner_id, f.blob, f.size, count(*) FROM job_files f "
    "JOIN jobs j ON j.seq = f.job_seq GROUP BY j.owner_id, f.blob, f.size"
)
_BACKFILL_COUNTER = (
    "UPDATE identities SET stored_bytes = "
    "coalesce((SELECT sum(b.size) FROM stored_blobs b WHERE b.owner_id = identities.id), 0) "
    "+ coalesce((SELECT sum(m.size) FROM models m WHERE m.owner_id = identities.id "
    "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = m.job_id AND j.owner_id = m.owner_id)), 0) "
    "+ coalesce((SELECT sum(length(CAST(j.params AS TEXT))) FROM jobs j "
    "WHERE j.owner_id = identities.id AND length(CAST(j.params AS TEXT)) > 2), 0)"
)


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    if pg:  # no write between the triggers and the sums (until this commits)
        op.execute("LOCK TABLE identities, jobs, job_files, models IN SHARE ROW EXCLUSIVE MODE")
    op.add_column(
        "identities",
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "stored_blobs",
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("blob", sa.String(length=300), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("refs", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["identities.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("owner_id", "blob", "size"),
    )
    # The jobs' triggers look up the models of a job by its id.
    op.create_index("ix_models_job_id", "models", ["job_id"], unique=False)
    for statement in [*PG_FUNCTIONS, *PG_TRIGGERS] if pg else SQLITE_TRIGGERS:
        op.execute(sa.text(statement))
    op.execute(_BACKFILL_BLOBS)
    op.execute(_BACKFILL_COUNTER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in PG_DROPS:
            op.execute(statement)
        op.drop_index("ix_models_job_id", table_name="models")
        op.drop_table("stored_blobs")
        op.drop_column("identities", "stored_bytes")
    else:
        for name in SQLITE_TRIGGER_NAMES:
            op.execute(sa.text("DROP TRIGGER IF EXISTS " + name))
        op.drop_index("ix_models_job_id", table_name="models")
        op.drop_table("stored_blobs")
        op.execute("ALTER TABLE identities DROP COLUMN stored_bytes")
