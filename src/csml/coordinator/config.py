"""Coordinator settings, from `CSML_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from platformdirs import user_data_dir
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from csml.schemas.workers import INLINE_MAX_BYTES
from csml.store.db import sqlite_url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CSML_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path(user_data_dir("csml")))
    database_url: str | None = Field(None, description="Default: SQLite in the data directory.")
    database_url_file: Path | None = Field(
        None, description="A file holding the database URL (a secret mount); not with the URL."
    )
    bootstrap_join_token_file: Path | None = Field(
        None, description="A file holding a join token to register (hashed) at start."
    )

    queue_capacity: int = Field(1000, ge=1, description="Default queued-job bound per app.")
    queue_capacities: dict[str, int] = Field(default_factory=dict, description="Per-app bounds.")
    retry_after_seconds: int = 5

    lease_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(10.0, gt=0)
    worker_live_seconds: float = Field(45.0, gt=0, description="Heartbeat age that counts as live.")
    contributions: bool = Field(
        False,
        description="Whether identities may contribute workers to an app the operator has not "
        "ruled on (`csml apps contribution APP --allow/--deny` overrides it per app). Off by "
        "default: users' public jobs go to strangers' machines only where the operator said so.",
    )
    credit_priority_k: int = Field(
        1,
        ge=0,
        description="Credit priority: of every CSML_CREDIT_PRIORITY_N consecutive jobs a "
        "coordinator hands out for an app, at most this many go to identities with credit "
        "ahead of round-robin (0: no priority). Must be below N.",
    )
    credit_priority_n: int = Field(2, ge=1, description="See CSML_CREDIT_PRIORITY_K.")
    verify_probation: int = Field(
        5,
        ge=0,
        description="Agreements a new contributed worker needs before it leaves probation "
        "(until then every result of its is verified, whatever the app's policy).",
    )
    reap_interval_seconds: float = Field(1.0, gt=0)
    max_attempts: int = Field(3, ge=1)

    job_timeout_seconds: float = Field(600.0, gt=0)
    job_memory_mb: int = Field(2048, ge=16)
    job_cpu_seconds: float = Field(600.0, gt=0)

    max_upload_bytes: int = Field(1 << 30, ge=1, description="Per input file.")
    max_output_bytes: int = Field(1 << 30, ge=1, description="Per output file.")
    db_blob_max_bytes: int = Field(
        INLINE_MAX_BYTES,
        ge=0,
        le=INLINE_MAX_BYTES,
        description="A job file sent inline (a batch item's input, a worker's inline output) "
        "of at most this many bytes is kept in the database, in the transaction that "
        "writes its row, instead of as a file (no file create, fsync or folder); 0: "
        "always a file. At most the inline bound, 256 KiB (the default).",
    )
    # Request bodies (see csml.coordinator.middleware): refused with 413 once passed.
    max_json_bytes: int = Field(
        64 << 10, ge=1024, description="A JSON request body, unless a limit below says otherwise."
    )
    max_worker_json_bytes: int = Field(
        4 << 20, ge=1024, description="A worker's JSON body (registration evidence, results)."
    )
    max_spec_bytes: int = Field(
        256 << 10, ge=1024, description="A job spec: a JSON submission or the `spec` form part."
    )
    max_params_bytes: int = Field(
        64 << 10, ge=2, description="A job's params (all steps of a pipeline), as JSON."
    )
    max_params_depth: int = Field(
        16, ge=1, le=64, description="Nesting of lists and objects inside params."
    )
    max_request_bytes: int = Field(
        2 << 30, ge=1024, description="A whole multipart submission (every file together)."
    )
    max_form_parts: int = Field(
        32, ge=2, description="Parts of a multipart submission (the spec and its files)."
    )
    max_wait_seconds: float = 60.0

    # Abuse control without identity (see csml.coordinator.abuse): 0 disables a limit.
    pow_difficulty: int = Field(
        16, ge=0, le=64, description="Leading zero bits a new identity's proof of work needs."
    )
    pow_challenge_seconds: float = Field(300.0, gt=0, description="How long a challenge lasts.")
    identity_rate_limit: int = Field(
        60,
        ge=0,
        description="Target rate of new identities per window, service-wide: past it the "
        "proof of work gets one bit harder per doubling of the rate (0: never harder).",
    )
    pow_max_extra_bits: int = Field(
        6, ge=0, le=32, description="At most this many bits above pow_difficulty under a flood."
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
    queue_timeout_seconds: float = Field(
        3600.0,
        gt=0,
        description="A queued job no live worker could claim for this long fails.",
    )
    retention_interval_seconds: float = Field(60.0, gt=0, description="How often to purge.")
    placement_window: int = Field(
        16,
        ge=0,
        le=1024,
        description="A claim prefers jobs whose model the worker holds warm among this many "
        "jobs at the head of the fair queue (0: strict fair order).",
    )

    api_docs: bool = Field(
        False,
        description="Serve /docs (Swagger UI) and /redoc (ReDoc) from the package's copies "
        "(never a CDN); off, the OpenAPI document is still at /openapi.json.",
    )

    # The operator view (/operator, /v1/operator/...): off unless a token is set.
    operator_token: SecretStr | None = Field(
        None, description="Bearer token of the operator view; distinct from user tokens."
    )
    operator_token_file: Path | None = Field(None, description="A file holding it instead.")

    @model_validator(mode="after")
    def _credit_bound(self) -> Settings:
        if self.credit_priority_k >= self.credit_priority_n:
            raise ValueError(
                f"CSML_CREDIT_PRIORITY_K ({self.credit_priority_k}) must be below "
                f"CSML_CREDIT_PRIORITY_N ({self.credit_priority_n}): otherwise identities "
                "without credit could starve"
            )
        return self

    @model_validator(mode="after")
    def _read_database_url_file(self) -> Settings:
        if self.database_url_file is not None:
            if self.database_url:
                raise ValueError("set CSML_DATABASE_URL or CSML_DATABASE_URL_FILE, not both")
            self.database_url = read_secret_file(self.database_url_file, "database_url_file")
        return self

    def resolved_database_url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir)

    def operator_secret(self) -> str | None:
        """The operator token, from the setting or its file; None when the view is off."""
        if self.operator_token is not None:
            return self.operator_token.get_secret_value().strip() or None
        if self.operator_token_file is not None:
            return read_secret_file(self.operator_token_file, "operator_token_file")
        return None

    def capacity(self, app: str) -> int:
        return self.queue_capacities.get(app, self.queue_capacity)


def read_secret_file(path: Path, what: str) -> str:
    """The stripped text of a secret file; a clear error when missing or empty."""
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"{what}: {path} is empty")
    return value
