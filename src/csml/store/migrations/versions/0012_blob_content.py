"""small blobs in the database: `job_files.content`

Revision ID: 0012_blob_content
Revises: 0011_stored_bytes
Create Date: 2026-12-07

A job file of at most `CSML_DB_BLOB_MAX_BYTES` (an inline input of a batch item, an
inline output of a completion) keeps its bytes in a new nullable column of its row,
written in the transaction that writes the row: no file, no fsync, no folder. Its
`blob` names it as such (`csml.store.blobs.IN_DB`, "db:" before the path a file would
have had), so the stored-bytes triggers of 0011 count it exactly as a file (by blob and
size) and nothing that reads a path opens it. Rows written before keep NULL and their
files: nothing is moved, and the downgrade refuses nothing but drops the column (run it
only with no in-database blob left, or those files are lost).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_blob_content"
down_revision = "0011_stored_bytes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column with no default: no table rewrite on either dialect (and no
    # batch copy on SQLite, which would drop the table's stored-bytes triggers).
    op.add_column("job_files", sa.Column("content", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN in place (SQLite >= 3.35): the triggers stay.
    op.execute("ALTER TABLE job_files DROP COLUMN content")
