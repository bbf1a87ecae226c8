"""`ampsync metrics [--port 9808] [--host 127.0.0.1]`: Prometheus metrics, read from the
database at each scrape, in Prometheus's text exposition format (version 0.0.4).

Gauges come from the tables as they are now: rows by kind and status, the oldest pending row
of each kind, the endpoint pauses, each feed's last run. The counters (rows sent, failed and
retried, Amplitude's answers by endpoint and code) add up the batches the run history records
as finished since this process started: a counter starts at 0 with the process, as Prometheus
expects, and `rate()` / `increase()` read it across restarts. The history's own pruning
(AMPSYNC_HISTORY_DAYS) never makes a counter go down.

The README's "Metrics" section lists every metric with alert examples.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from .. import settings as settings_module
from ..amplitude.limits import Endpoint
from ..db import endpoints, feeds, reports, setup
from ..db import metrics as db_metrics
from ..db.engine import describe_db_error, make_engine
from ..db.schema import QueueTables, define_tables
from ..delivery.policy import endpoint_for
from ..outcomes import KINDS, Status
from ..settings import Settings, SettingsError

log = logging.getLogger("ampsync.metrics")

DEFAULT_PORT = 9808
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A batch's history row is stamped inside its acknowledgement's transaction and becomes
# visible at the commit, a moment later: each read goes back this far and skips batches it
# already counted, so a late commit is still counted once.
OVERLAP = timedelta(seconds=120)
STATUSES = tuple(s.value for s in Status)


@dataclass
class Family:
    """One metric: its name, type, help line and samples ({label: value}, value)."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def exposition(families: Iterable[Family]) -> str:
    """The families in Prometheus's text format."""
    lines: list[str] = []
    for f in families:
        lines.append(f"# HELP {f.name} {f.help.replace(chr(92), chr(92) * 2)}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for labels, value in f.samples:
            shown = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(
                f"{f.name}{{{shown}}} {_number(value)}" if shown else f"{f.name} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


def _epoch(when: datetime) -> float:
    """A time from the database (UTC, without a zone) as Unix seconds."""
    return when.replace(tzinfo=UTC).timestamp()


class Collector:
    """Reads the database at each `collect()`; keeps the counters between scrapes."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.tables: QueueTables = define_tables(settings.queue_table)
        self.engine = engine or make_engine(settings.database_url)
        self._lock = threading.Lock()
        self._started: datetime | None = None  # the database's time at the first read
        self._read_from: datetime | None = None
        self._counted: dict[int, datetime] = {}  # batch ids counted, with their finish time
        self.sent: dict[str, float] = dict.fromkeys(KINDS, 0.0)
        self.failed: dict[str, float] = dict.fromkeys(KINDS, 0.0)
        self.retried: dict[str, float] = dict.fromkeys(KINDS, 0.0)
        self.answers: dict[tuple[str, str], float] = {}

    def start(self) -> str | None:
        """Fix the start of the counters at the database's time now (the first read does it
        otherwise). Returns one line naming what is missing of the queue table, if anything;
        raises SQLAlchemyError when the database cannot be reached."""
        with self._lock, self.engine.connect() as conn:
            if self._started is None:
                self._started = self._read_from = reports.db_now(conn)
            missing = setup.check_table(conn, self.tables)
        return missing

    def _count_batches(self) -> None:
        with self.engine.connect() as conn:
            if self._started is None:
                self._started = self._read_from = reports.db_now(conn)
            assert self._read_from is not None
            now, batches = db_metrics.finished_batches(conn, self.tables, self._read_from)
        for b in batches:
            if b.id in self._counted:
                continue
            self._counted[b.id] = b.finished_at
            self.sent[b.kind] = self.sent.get(b.kind, 0.0) + b.rows_sent
            self.failed[b.kind] = self.failed.get(b.kind, 0.0) + b.rows_failed
            self.retried[b.kind] = self.retried.get(b.kind, 0.0) + b.rows_retried
            endpoint = endpoint_for(b.kind, self.settings)
            for code, n in (orjson.loads(b.answers) if b.answers else {}).items():
                key = (endpoint, "none" if code == "no answer" else str(code))
                self.answers[key] = self.answers.get(key, 0.0) + n
        self._read_from = max(self._started, now - OVERLAP)
        self._counted = {i: t for i, t in self._counted.items() if t >= self._read_from}

    def collect(self) -> list[Family]:
        """Every family; `ampsync_database_up` is 0 (and the gauges left out) when the
        database could not be read, with the reason logged."""
        up = Family("ampsync_database_up", "gauge", "1 if the last scrape read the database")
        try:
            with self._lock:
                self._count_batches()
            gauges = self._gauges()
        except SQLAlchemyError as exc:
            log.warning("cannot read the database: %s", str(exc).splitlines()[0][:300])
            up.add(0)
            return [up, *self._counters()]
        up.add(1)
        return [up, *gauges, *self._counters()]

    def render(self) -> str:
        return exposition(self.collect())

    def _counters(self) -> list[Family]:
        with self._lock:
            sent = Family(
                "ampsync_rows_sent_total",
                "counter",
                "Rows Amplitude accepted, by kind, in batches finished since this process started",
            )
            failed = Family(
                "ampsync_rows_failed_total",
                "counter",
                "Rows that became failed in a batch, by kind, since this process started",
            )
            retried = Family(
                "ampsync_rows_retried_total",
                "counter",
                "Rows a batch gave back to pending to retry later, by kind, since this process "
                "started",
            )
            for family, values in (
                (sent, self.sent),
                (failed, self.failed),
                (retried, self.retried),
            ):
                for kind, n in sorted(values.items()):
                    family.add(n, kind=kind)
            answers = Family(
                "ampsync_amplitude_answers_total",
                "counter",
                "Amplitude's answers by endpoint and HTTP status (none: timeout or connection "
                "error), since this process started",
            )
            for (endpoint, code), n in sorted(self.answers.items()):
                answers.add(n, endpoint=endpoint, code=code)
        return [sent, failed, retried, answers]

    def _gauges(self) -> list[Family]:
        t = self.tables
        with self.engine.connect() as conn:
            counts = reports.row_counts(conn, t)
            now, oldest = db_metrics.oldest_pending(conn, t)
            states = endpoints.read_all(conn, t)
            with conn.begin():
                feed_runs = feeds.last_runs(conn, feeds.FeedTables.of(t))
        rows = Family("ampsync_rows", "gauge", "Rows in the queue table by kind and status")
        for kind in sorted(set(KINDS) | set(counts)):
            for status in sorted(set(STATUSES) | set(counts.get(kind, {}))):
                rows.add(counts.get(kind, {}).get(status, 0), kind=kind, status=status)
        age = Family(
            "ampsync_oldest_pending_age_seconds",
            "gauge",
            "Age of the oldest pending row of each kind (0: none pending), by the database's clock",
        )
        for kind in sorted(set(KINDS) | set(oldest)):
            created = oldest.get(kind)
            age.add(max(0.0, (now - created).total_seconds()) if created else 0, kind=kind)
        paused = Family(
            "ampsync_endpoint_paused", "gauge", "1 while the endpoint is paused for every worker"
        )
        failures = Family(
            "ampsync_endpoint_failures",
            "gauge",
            "Failed requests in a row counted against the endpoint (it pauses at "
            "AMPSYNC_PAUSE_AFTER_FAILURES)",
        )
        left = Family(
            "ampsync_endpoint_pause_remaining_seconds", "gauge", "Seconds left of the pause"
        )
        by_endpoint = {s.endpoint: s for s in states}
        for name in sorted({e.value for e in Endpoint} | set(by_endpoint)):
            state = by_endpoint.get(name)
            paused.add(1 if state and state.paused else 0, endpoint=name)
            failures.add(state.failures if state else 0, endpoint=name)
            left.add(state.pause_left_seconds if state else 0, endpoint=name)
        last_run = Family(
            "ampsync_feed_last_run_timestamp_seconds",
            "gauge",
            "When each feed last ran (Unix time, UTC)",
        )
        last_failed = Family(
            "ampsync_feed_last_run_failed", "gauge", "1 if the feed's last run ended in an error"
        )
        for name, ran_at, _result, error, _cursor in sorted(feed_runs):
            if ran_at is None:
                continue
            last_run.add(_epoch(ran_at), feed=name)
            last_failed.add(1 if error else 0, feed=name)
        return [rows, age, paused, failures, left, last_run, last_failed]


def _handler(collector: Collector) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, status, kind = collector.render().encode(), 200, CONTENT_TYPE
            elif path == "/":
                body, status, kind = b"ampsync metrics: /metrics\n", 200, "text/plain"
            else:
                body, status, kind = b"not found: try /metrics\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # one line per scrape would drown the log

    return Handler


def make_server(
    settings: Settings, port: int = DEFAULT_PORT, host: str = "127.0.0.1"
) -> ThreadingHTTPServer:
    """The HTTP server, bound and ready for `serve_forever()`; the counters start now. A
    database that cannot be read, a missing queue table or a port in use is a SettingsError
    of one line."""
    collector = Collector(settings)
    try:
        missing = collector.start()
    except SQLAlchemyError as exc:
        raise SettingsError(
            "AMPSYNC_DATABASE_URL: " + describe_db_error(exc, settings.database_url)
        ) from None
    if missing:
        raise SettingsError(missing)
    try:
        server = ThreadingHTTPServer((host, port), _handler(collector))
    except OSError as exc:
        raise SettingsError(
            f"--port {port}: cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    server.daemon_threads = True
    return server


def command(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> int:
    """`ampsync metrics`: serve /metrics until interrupted (SIGINT, or SIGTERM's default)."""
    server = make_server(settings_module.get(), port, host)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving Prometheus metrics on http://{shown}:{server.server_port}/metrics",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
