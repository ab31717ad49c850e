"""The coordinator's store: SQL rows (SQLAlchemy 2) and blob files on disk."""
