"""Settings: every knob ampsync has, read from the environment (and a `.env` file).

Names are the README's. Validation happens once, at start-up, and a wrong value stops the process
with one line naming the variable (see `load()` and `SettingsError`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .amplitude.limits import MAX_EVENTS_PER_REQUEST, REGION_URLS

# A table name or schema.table made of identifier characters only: the name is put into SQL.
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,115}(\.[A-Za-z_][A-Za-z0-9_]{0,115})?$")


class SettingsError(SystemExit):
    """A setting is wrong; the message names the variable and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(f"ampsync: {message}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- Amplitude -------------------------------------------------------------------------
    amplitude_api_key: SecretStr | None = Field(None, alias="AMPLITUDE_API_KEY")
    amplitude_region: Literal["us", "eu"] = Field("us", alias="AMPLITUDE_REGION")
    amplitude_server_url: str | None = Field(None, alias="AMPLITUDE_SERVER_URL")
    # Events go through Batch by default: it deduplicates by insert_id across devices and allows
    # 1000 events/s per user instead of 30 (docs/amplitude.md, "Deduplication" and
    # "Throttling"). `http_v2` for low latency.
    event_api: Literal["batch", "http_v2"] = Field("batch", alias="AMPSYNC_EVENT_API")
    # Identify rows go as `$identify` events through the event API (idempotent by insert_id);
    # `identify` selects the form Identify API, which deduplicates nothing.
    identify_api: Literal["batch", "http_v2", "identify"] = Field(
        "batch", alias="AMPSYNC_IDENTIFY_API"
    )
    # Group rows go as `$groupidentify` events through the event API (idempotent by
    # insert_id); `groupidentify` selects the form Group Identify API, which deduplicates
    # nothing: a re-send after a timeout may apply $add, $append, $prepend twice.
    group_identify_api: Literal["batch", "http_v2", "groupidentify"] = Field(
        "batch", alias="AMPSYNC_GROUP_IDENTIFY_API"
    )
    # An event row waits for earlier identify rows of its user (device) that are pending or in
    # flight, so it carries the properties written before it (docs/amplitude.md, "Order").
    events_after_identify: bool = Field(True, alias="AMPSYNC_EVENTS_AFTER_IDENTIFY")
    min_id_length: int = Field(5, ge=1, le=1024, alias="AMPSYNC_MIN_ID_LENGTH")
    http_timeout_seconds: float = Field(30.0, gt=0, le=600, alias="AMPSYNC_HTTP_TIMEOUT")

    # --- Queue table -----------------------------------------------------------------------
    database_url: str = Field("sqlite:///ampsync.db", alias="AMPSYNC_DATABASE_URL")
    queue_table: str = Field("amplitude_queue", alias="AMPSYNC_QUEUE_TABLE")
    lease_seconds: int = Field(300, ge=5, le=3000, alias="AMPSYNC_LEASE_SECONDS")
    batch_size: int | None = Field(None, ge=1, alias="AMPSYNC_BATCH_SIZE")
    max_attempts: int = Field(12, ge=1, le=1000, alias="AMPSYNC_MAX_ATTEMPTS")
    # A pending row first tried longer ago than this fails instead of being sent: Amplitude
    # deduplicates a re-sent insert_id for 7 days only, so 6 days keeps every re-send inside
    # that window. 0 = no limit. At most ~23 days: SQL Server's DATEADD takes an int of
    # milliseconds (docs/sqlserver.md, "Known limitations").
    max_age_seconds: int = Field(6 * 86400, ge=0, le=2_000_000, alias="AMPSYNC_MAX_AGE_SECONDS")
    # Backoff after a transient failure: base * 2**(attempts-1), capped, with ±50% jitter.
    backoff_base_seconds: float = Field(10.0, ge=0, alias="AMPSYNC_BACKOFF_BASE")
    backoff_max_seconds: float = Field(1800.0, ge=0, alias="AMPSYNC_BACKOFF_MAX")
    # An endpoint that fails this many requests in a row (5xx, timeouts) is paused for all
    # workers, doubling from pause_base up to pause_max; its rows keep their attempts.
    pause_after_failures: int = Field(3, ge=1, alias="AMPSYNC_PAUSE_AFTER_FAILURES")
    pause_base_seconds: float = Field(30.0, ge=0, alias="AMPSYNC_PAUSE_BASE")
    pause_max_seconds: float = Field(600.0, ge=0, alias="AMPSYNC_PAUSE_MAX")
    # Waits Amplitude asks for on 429 (docs/amplitude.md, "429") and for users over the daily
    # quota.
    throttle_wait_v2_seconds: float = Field(30.0, ge=0, alias="AMPSYNC_THROTTLE_WAIT_V2")
    throttle_wait_batch_seconds: float = Field(15.0, ge=0, alias="AMPSYNC_THROTTLE_WAIT_BATCH")
    daily_quota_wait_seconds: float = Field(3600.0, ge=0, alias="AMPSYNC_DAILY_QUOTA_WAIT")
    # Events per second shared by all workers, 0 = no cap (paid plans limit users, not the
    # project); a Starter-plan project sets its 1000 (docs/amplitude.md, "Throttling").
    events_per_second: int = Field(0, ge=0, alias="AMPSYNC_EVENTS_PER_SECOND")
    # An event_time further ahead than this is a mistake in the row (the past is fine).
    max_future_seconds: int = Field(86400, ge=0, alias="AMPSYNC_MAX_FUTURE_SECONDS")
    # Send tasks kept waiting in the broker at most; a sync claims no more than this many
    # batches ahead of the workers, so every claim starts well within its lease. With 8, send
    # processes sat waiting for work when Amplitude was slow to answer; 16 keeps them fed
    # (bench/README.md, finding 5 and the "Knobs" table).
    max_queued_batches: int = Field(16, ge=1, le=1000, alias="AMPSYNC_MAX_QUEUED_BATCHES")

    # Retention: `sent` rows and run history older than this many days are deleted hourly,
    # in small chunks. 0 keeps them forever.
    sent_retention_days: float = Field(0, ge=0, alias="AMPSYNC_RETENTION_DAYS")
    history_retention_days: float = Field(30, ge=0, alias="AMPSYNC_HISTORY_DAYS")

    # --- Celery ----------------------------------------------------------------------------
    celery_broker_url: str | None = Field(None, alias="CELERY_BROKER_URL")
    sync_interval: float = Field(60.0, gt=0, alias="AMPSYNC_SYNC_INTERVAL")
    worker_concurrency: int | None = Field(None, ge=1, le=256, alias="AMPSYNC_WORKER_CONCURRENCY")

    # --- Feeds (tasks/feeds/) --------------------------------------------------------------
    # The TOML file declaring feeds, relative to the working directory; missing = no feeds.
    feeds_file: str = Field("ampsync-feeds.toml", alias="AMPSYNC_FEEDS_FILE")
    # `json`: one JSON object per log line, for log shippers (tasks/logs.py).
    log_format: Literal["text", "json"] = Field("text", alias="AMPSYNC_LOG_FORMAT")

    @field_validator("amplitude_server_url")
    @classmethod
    def _server_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8087")
        value = value.rstrip("/")
        if urlsplit(value).path or urlsplit(value).query:
            # A path here makes every request miss the API ("Invalid request path").
            raise ValueError(
                "must be the server's address without a path (ampsync appends /2/httpapi, "
                "/batch, /identify, /groupidentify), such as https://api2.amplitude.com"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(
                "is not a SQLAlchemy URL, e.g. mssql+pymssql://user:pw@host:1433/dwh"
            ) from exc
        if url.get_backend_name() == "mssql" and url.get_driver_name() != "pymssql":
            # ampsync's SQL Server statements are written and checked for what pymssql sends
            # (docs/sqlserver.md, "Drivers"); pyodbc binds real parameters, at most 2,100.
            raise ValueError(
                f"SQL Server through {url.get_driver_name()} is not supported: use "
                "mssql+pymssql://user:pw@host:1433/db"
            )
        return value

    @field_validator("queue_table")
    @classmethod
    def _queue_table(cls, value: str) -> str:
        if not _TABLE_NAME.match(value):
            raise ValueError("must be a table name or schema.table of letters, digits and _")
        return value

    @field_validator("celery_broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not re.match(r"^(redis|rediss|redis\+socket)://", value):
            raise ValueError("must be a Redis URL (redis://host:6379/0 or redis+socket:///path)")
        return value

    @model_validator(mode="after")
    def _queue_schema_on_sql_server(self) -> Settings:
        # SQL Server resolves an unqualified name in the login's default schema, which need
        # not be dbo: ampsync's names are always qualified there (docs/sqlserver.md).
        if "." not in self.queue_table and self.database_url.startswith("mssql"):
            self.queue_table = f"dbo.{self.queue_table}"
        return self

    @model_validator(mode="after")
    def _batch_size_within_limit(self) -> Settings:
        if self.batch_size is not None and self.batch_size > MAX_EVENTS_PER_REQUEST:
            raise ValueError(
                f"AMPSYNC_BATCH_SIZE={self.batch_size} is above Amplitude's "
                f"{MAX_EVENTS_PER_REQUEST} events per request"
            )
        return self

    # --- derived ---------------------------------------------------------------------------
    @property
    def server_url(self) -> str:
        return self.amplitude_server_url or REGION_URLS[self.amplitude_region]

    @property
    def queue_schema_and_name(self) -> tuple[str | None, str]:
        schema, _, name = self.queue_table.rpartition(".")
        return (schema or None), name

    def require_api_key(self) -> str:
        if self.amplitude_api_key is None or not self.amplitude_api_key.get_secret_value():
            raise SettingsError(
                "AMPLITUDE_API_KEY is not set: put your Amplitude project's API key in the "
                "environment or in .env"
            )
        return self.amplitude_api_key.get_secret_value()


def _field_alias(name: str) -> str:
    field = Settings.model_fields.get(name)
    return (field.alias if field and field.alias else name).upper()


def load() -> Settings:
    """Read and validate settings; a bad value raises SettingsError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _field_alias(str(err["loc"][0])) if err["loc"] else "settings"
        message = err["msg"].removeprefix("Value error, ")
        raw = err.get("input")
        if where == "AMPSYNC_DATABASE_URL" and isinstance(raw, str):
            raw = mask_url(raw)
        shown = f"={raw!r}" if isinstance(raw, str | int | float) and "KEY" not in where else ""
        raise SettingsError(f"{where}{shown}: {message}") from None


@lru_cache(maxsize=1)
def get() -> Settings:
    """The process-wide settings (read once)."""
    return load()


def mask_url(url: str) -> str:
    """A URL with its password replaced, for logs and `status`."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url
