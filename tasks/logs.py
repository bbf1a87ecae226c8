"""Log lines: one line per event, as text for people or as JSON for log shippers.

The CLI takes `--log-format {text,json}`; workers, beat and Flower read AMPSYNC_LOG_FORMAT
(`tasks/worker/app.py` swaps Celery's formatters through its logging signals). Logs go to stderr;
stdout stays for what a command prints for people (tables, progress, summaries).

Every log record of a process that imports this module is redacted as it is made
(`tasks/redact.py`): the API key, the configured URLs' passwords and any URL's password never
reach a handler, whoever logged them (ampsync, Celery, kombu, SQLAlchemy).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime

import orjson

from . import redact, settings

FORMATS = ("text", "json")
ENV = "AMPSYNC_LOG_FORMAT"
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=` (or Celery's
# own `data`, which carries the task id, name and return value) and is kept as a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))).union(
    {"message", "asctime", "taskName"}
)


def _known_secrets() -> list[str]:
    """The process's secrets (API key, URL passwords); none while the settings are invalid."""
    try:
        current = settings.get()
    except settings.SettingsError:
        return []
    if _secrets_of[0] is not current:  # settings are re-read after cache_clear (the demo)
        _secrets_of[:] = [current, current.secrets()]
    return _secrets_of[1]


_secrets_of: list = [None, []]
_make_record = logging.getLogRecordFactory()


def _redacted_record(*args, **kwargs) -> logging.LogRecord:
    record = _make_record(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is logging's to report
        return record
    clean = redact.text(message, _known_secrets())
    if clean != message:
        record.msg, record.args = clean, None
    return record


def redact_every_record() -> None:
    """Make every log record of this process from a redacted message (idempotent)."""
    if logging.getLogRecordFactory() is not _redacted_record:
        logging.setLogRecordFactory(_redacted_record)


redact_every_record()


def _current_task() -> dict[str, str]:
    """Task id and name when the record is logged inside a Celery task."""
    try:
        from celery._state import get_current_task
    except ImportError:  # pragma: no cover - celery is a dependency
        return {}
    task = get_current_task()
    if task is None or task.request is None or task.request.id is None:
        return {}
    return {"task_id": task.request.id, "task_name": task.name}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, then the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
        }
        entry.update(_current_task())
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def resolve(explicit: str | None = None) -> str:
    """The format to use: the explicit choice, else AMPSYNC_LOG_FORMAT (env or .env), else text."""
    if explicit:
        return explicit
    try:
        return settings.get().log_format
    except settings.SettingsError:
        return os.environ.get(ENV, "text") if os.environ.get(ENV) in FORMATS else "text"


def use_json(logger: logging.Logger) -> None:
    """Give each handler of `logger` the JSON formatter (Celery set them up as text)."""
    formatter = JsonFormatter()
    for handler in logger.handlers:
        handler.setFormatter(formatter)


def json_warnings() -> None:
    """Python warnings (Celery's SecurityWarning, deprecations) as JSON lines on stderr, also
    those raised before Celery has set up its logging."""
    logging.captureWarnings(True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers = [handler]
    warnings_logger.propagate = False


def configure(fmt: str | None = None) -> str:
    """Logging for a CLI process; processes it starts (worker, beat) inherit the format."""
    fmt = resolve(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name("ampsync-cli")
    root = logging.getLogger()
    # Replace only our own handler: a host process (pytest, a notebook) keeps its handlers.
    root.handlers = [h for h in root.handlers if h.get_name() != "ampsync-cli"] + [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("ampsync").setLevel(logging.INFO)
    if fmt == "json":
        json_warnings()
    os.environ[ENV] = fmt
    note_dotenv()
    return fmt


_noted: set = set()  # once per process, however often logging is configured


def note_dotenv() -> None:
    """One line naming the `.env` that settings are read from: a stray one in the working
    directory would otherwise send rows (and the key) wherever it says, unnoticed."""
    path = settings.dotenv_file()
    if path is not None and path not in _noted:
        _noted.add(path)
        logging.getLogger("ampsync.settings").info(
            "settings read from %s and the environment", path
        )
