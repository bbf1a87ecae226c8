"""Settings: every knob ampsync has, read from the environment (and a `.env` file).

Names are the README's. Validation happens once, at start-up: a wrong value raises
`SettingsError`, one line naming the variable, which the CLI, workers and beat stop with (see
`load()`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from . import broker_address, redact
from .amplitude.limits import MAX_EVENTS_PER_REQUEST, REGION_URLS

# A table name or schema.table made of identifier characters only: the name is put into SQL.
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,115}(\.[A-Za-z_][A-Za-z0-9_]{0,115})?$")


class SettingsError(ValueError):
    """A setting is wrong; the message is one line naming the variable and what to do.

    A normal exception, not SystemExit: a Python shell, notebook or web app that imports
    `tasks` gets the line and goes on. The CLI prints it and exits 2; a worker or beat stops
    with it (tasks/worker/app.py).
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"ampsync: {message}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # An empty variable means the default: docker-compose.yml passes every setting as
        # ${NAME:-}, empty when .env leaves it out.
        env_ignore_empty=True,
    )

    # --- Amplitude -------------------------------------------------------------------------
    amplitude_api_key: SecretStr | None = Field(None, alias="AMPLITUDE_API_KEY")
    amplitude_region: Literal["us", "eu"] = Field("us", alias="AMPLITUDE_REGION")
    # Hosts besides this machine that AMPLITUDE_SERVER_URL may reach over plain http://, comma
    # separated (the compose trial's `emulator`): the API key travels in every request body.
    # Declared before the URL: its validator reads this one.
    plain_http_hosts: str = Field("", alias="AMPSYNC_PLAIN_HTTP_HOSTS")
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
    # Backoff after a transient failure: base * 2**(attempts-1), capped, jittered over its upper
    # half. A 5xx or 408 is Amplitude answering: its rows start again from backoff_base_5xx
    # and come back within backoff_max_5xx (tens of seconds; sustained failure pauses the
    # endpoint instead). No answer at all (timeouts, connection errors) may be the way to
    # Amplitude broken: base and backoff_max. Where both apply, the lower one holds.
    backoff_base_seconds: float = Field(2.0, ge=0, alias="AMPSYNC_BACKOFF_BASE")
    # Amplitude's own SDKs retry a 5xx after 100 ms (docs/amplitude.md, "5xx and timeouts");
    # half a second took 100k flaky events from 0.51 to 0.68 of the clean rate, in one
    # invocation (bench/README.md, "Flaky Amplitude (issue 13)").
    backoff_base_5xx_seconds: float = Field(0.5, ge=0, alias="AMPSYNC_BACKOFF_BASE_5XX")
    backoff_max_seconds: float = Field(1800.0, ge=0, alias="AMPSYNC_BACKOFF_MAX")
    backoff_max_5xx_seconds: float = Field(30.0, ge=0, alias="AMPSYNC_BACKOFF_MAX_5XX")
    # An endpoint pauses for all workers (its rows keep their attempts) only when failure is
    # consistent across requests and workers: at least this many of its last 20 requests
    # failed, and at least pause_failure_ratio of them. At 20 % of requests failing (0.2**5)
    # it practically never pauses; with Amplitude down it pauses after 5 requests. The pause
    # doubles from pause_base up to pause_max while the probe after it fails.
    pause_after_failures: int = Field(5, ge=1, le=20, alias="AMPSYNC_PAUSE_AFTER_FAILURES")
    pause_failure_ratio: float = Field(0.8, gt=0, le=1, alias="AMPSYNC_PAUSE_FAILURE_RATIO")
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
    # A worker process whose memory stays above this many MB after a task is replaced by a
    # fresh one (Celery's worker_max_memory_per_child). A send of big rows peaks near 200 MB
    # with claims bounded by bytes (bench/README.md, "Memory (issue 15)"); 0 = never replaced.
    worker_max_memory_mb: int = Field(512, ge=0, le=1_000_000, alias="AMPSYNC_WORKER_MAX_MEMORY_MB")

    # --- Feeds (tasks/feeds/) --------------------------------------------------------------
    # The TOML file declaring feeds, relative to the working directory; missing = no feeds.
    feeds_file: str = Field("ampsync-feeds.toml", alias="AMPSYNC_FEEDS_FILE")
    # `json`: one JSON object per log line, for log shippers (tasks/logs.py).
    log_format: Literal["text", "json"] = Field("text", alias="AMPSYNC_LOG_FORMAT")

    @field_validator("amplitude_server_url")
    @classmethod
    def _server_url(cls, value: str | None, info: ValidationInfo) -> str | None:
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
        host = urlsplit(value).hostname or ""
        allowed = str(info.data.get("plain_http_hosts") or "").lower().split(",")
        if value.lower().startswith("http://") and not (
            is_loopback(host) or host in {h.strip() for h in allowed if h.strip()}
        ):
            # Every request body carries the API key: in clear text only to this machine.
            raise ValueError(
                f"plain http:// is refused for {host}, which is not this machine (127.0.0.1, "
                "::1, localhost): the API key would travel unencrypted; use https://, or "
                "name the host in AMPSYNC_PLAIN_HTTP_HOSTS"
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
        if url.drivername in _DEFAULT_DRIVERS:
            # A bare scheme (postgres://, mysql://, mssql://) means the driver ampsync ships
            # with or as an extra, not SQLAlchemy's own default (psycopg2, mysqlclient, pyodbc).
            url = url.set(drivername=_DEFAULT_DRIVERS[url.drivername])
            value = url.render_as_string(hide_password=False)
        if url.get_backend_name() == "mssql" and url.get_driver_name() != "pymssql":
            # ampsync's SQL Server statements are written and checked for what pymssql sends
            # (docs/sqlserver.md, "Drivers"); pyodbc binds real parameters, at most 2,100.
            raise ValueError(
                f"SQL Server through {url.get_driver_name()} is not supported: use "
                "mssql+pymssql://user:pw@host:1433/db"
            )
        _require_driver(url)
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
    def _embedded_broker(self) -> Settings:
        # Unset: the embedded Redis of an `ampsync run` for this queue on this machine, if one
        # is up (tasks/broker_address.py).
        if self.celery_broker_url is None:
            self.celery_broker_url = broker_address.read(self.database_url, self.queue_table)
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

    def secrets(self) -> list[str]:
        """What no output may show: the API key and what the configured URLs carry."""
        key = self.amplitude_api_key.get_secret_value() if self.amplitude_api_key else ""
        found = [key] if key else []
        for name in _URL_FIELDS:
            found += redact.secrets_of(getattr(self, name))
        return found

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() end up in tracebacks and debug logs: URLs without their passwords.
        for name, value in super().__repr_args__():
            if name in _URL_FIELDS and isinstance(value, str):
                value = mask_url(value)
            yield name, value


# The fields that may carry a password (user-info or a `?password=` parameter).
_URL_FIELDS = ("database_url", "celery_broker_url", "amplitude_server_url")


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# The umask of every ampsync process: what it writes (the default SQLite file, beat's schedule,
# the embedded Redis's data, the demo's folder) is readable by its user only, and the
# processes it starts inherit it.
PRIVATE_UMASK = 0o077


def dotenv_file() -> Path | None:
    """The `.env` that settings are read from (the working directory's), if there is one."""
    path = Path(".env")
    return path.resolve() if path.is_file() else None


# The driver a bare scheme stands for: what `pip install ampsync` (SQL Server, SQLite) or its
# extras `[postgresql]` and `[mysql]` install.
_DEFAULT_DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
    "mssql": "mssql+pymssql",
}
_INSTALL = {
    "postgresql": "pip install 'ampsync[postgresql]'",
    "mysql": "pip install 'ampsync[mysql]'",
    "mariadb": "pip install 'ampsync[mysql]'",
    "mssql": "pip install pymssql",  # a dependency of ampsync itself: a broken install
}


def _require_driver(url: URL) -> None:
    """Refuse, in one line naming what to install, a URL whose driver this Python lacks: found
    here, every process stops at start-up instead of a worker saying `ready.` and then failing
    every task."""
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ValueError(
            f"SQLAlchemy knows no database {url.drivername!r}: use mssql+pymssql://, "
            "postgresql://, mysql:// or sqlite:///"
        ) from None
    backend, driver = url.get_backend_name(), dialect.driver
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        default = _DEFAULT_DRIVERS.get(backend)
        if default is None:
            how = "install it"
        elif default.endswith(f"+{driver}"):
            how = _INSTALL[backend]
        else:
            how = f"install it, or use {backend}:// after {_INSTALL[backend]}"
        raise ValueError(f"the {backend} driver {driver} is not installed ({exc}): {how}") from None


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
        if isinstance(raw, str):
            # Any value may be a URL with a password, malformed ones included.
            message = redact.text(message, redact.secrets_of(raw))
            raw = mask_url(raw)
        shown = f"={raw!r}" if isinstance(raw, str | int | float) and "KEY" not in where else ""
        raise SettingsError(f"{where}{shown}: {message}") from None


@lru_cache(maxsize=1)
def get() -> Settings:
    """The process-wide settings (read once)."""
    return load()


def mask_url(url: str) -> str:
    """A URL with its password and secret parameters replaced, for logs and `status`."""
    return redact.url(url)
