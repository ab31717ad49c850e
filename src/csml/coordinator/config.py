"""Coordinator settings, from `CSML_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from platformdirs import user_data_dir
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from csml.store.db import sqlite_url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CSML_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path(user_data_dir("csml")))
    database_url: str | None = Field(None, description="Default: SQLite in the data directory.")

    queue_capacity: int = Field(1000, ge=1, description="Default queued-job bound per app.")
    queue_capacities: dict[str, int] = Field(default_factory=dict, description="Per-app bounds.")
    retry_after_seconds: int = 5

    lease_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(10.0, gt=0)
    worker_live_seconds: float = Field(45.0, gt=0, description="Heartbeat age that counts as live.")
    reap_interval_seconds: float = Field(1.0, gt=0)
    max_attempts: int = Field(3, ge=1)

    job_timeout_seconds: float = Field(600.0, gt=0)
    job_memory_mb: int = Field(2048, ge=16)
    job_cpu_seconds: float = Field(600.0, gt=0)

    max_upload_bytes: int = Field(1 << 30, ge=1, description="Per input file.")
    max_output_bytes: int = Field(1 << 30, ge=1, description="Per output file.")
    max_wait_seconds: float = 60.0

    # Abuse control without identity (see csml.coordinator.abuse): 0 disables a limit.
    pow_difficulty: int = Field(
        16, ge=0, le=64, description="Leading zero bits a new identity's proof of work needs."
    )
    pow_challenge_seconds: float = Field(300.0, gt=0, description="How long a challenge lasts.")
    identity_rate_limit: int = Field(
        60, ge=0, description="New identities per window, across the whole service."
    )
    identity_rate_window_seconds: float = Field(60.0, gt=0)
    submission_rate_limit: int = Field(
        60, ge=0, description="Submissions per window, per identity."
    )
    submission_rate_window_seconds: float = Field(60.0, gt=0)
    max_active_jobs: int = Field(100, ge=0, description="Queued + running jobs per identity.")
    max_stored_bytes: int = Field(
        10 << 30, ge=0, description="Bytes of job inputs and outputs kept per identity."
    )
    max_models: int = Field(20, ge=0, description="Model artifacts kept per identity.")
    retention_hours: float = Field(
        168.0, gt=0, description="Finished jobs and their files are erased this long after."
    )
    retention_interval_seconds: float = Field(60.0, gt=0, description="How often to purge.")

    def resolved_database_url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir)

    def capacity(self, app: str) -> int:
        return self.queue_capacities.get(app, self.queue_capacity)
