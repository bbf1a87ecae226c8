"""Running a feed: read its source, plan, and enqueue the plan in one transaction with the
feed's state and cursor, so a run either happens whole or not at all. Preview plans the same
way and writes nothing. Every statement comes from tasks/db/feeds.py."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from ..db import engine as db_engine
from ..db import feeds as db_feeds
from ..db import queue, retry, schema
from ..db.schema import QueueTables
from ..settings import Settings
from .config import Feed, FeedsConfig, load_config
from .errors import FeedConflict, FeedError
from .plan import EntityState, Payloads, Plan, plan_entities, plan_events
from .render import plural
from .source import Cursor, SourceRows, read_source, source_engine
from .state import load_state, write_state

MAX_SHOWN_ERRORS = 20  # in a run's summary; preview shows every one


@dataclass
class RunResult:
    feed: str
    kind: str
    rows_read: int = 0
    rows_enqueued: int = 0
    markers_enqueued: int = 0
    failed_enqueued: int = 0  # event rows Amplitude would refuse, enqueued as failed
    invalid: int = 0
    errors: list[str] = field(default_factory=list)
    settled: dict[str, int] = field(default_factory=dict)
    first_id: int | None = None
    last_id: int | None = None
    cursor: str | None = None
    note: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [
            f"feed {self.feed} ({self.kind}): read {plural(self.rows_read, 'row')}, enqueued "
            f"{self.rows_enqueued}"
        ]
        if self.first_id is not None:
            parts[0] += f" (queue ids {self.first_id}–{self.last_id})"
        if self.markers_enqueued:
            parts.append(plural(self.markers_enqueued, "marker event"))
        if self.failed_enqueued:
            parts.append(f"{plural(self.failed_enqueued, 'invalid event')} enqueued as failed")
        if self.invalid:
            parts.append(f"{plural(self.invalid, 'row')} not sent (invalid)")
        if self.settled.get("not_delivered"):
            parts.append(
                f"{plural(self.settled['not_delivered'], 'earlier row')} not delivered, "
                "enqueued again where still changed"
            )
        return "; ".join(parts) + f" in {self.seconds:.2f} s"


def check_tables(conn: Connection, ft: db_feeds.FeedTables) -> None:
    missing = db_feeds.missing_tables(conn, ft)
    if missing:
        raise FeedError(
            f"table {', '.join(missing)} does not exist: run `ampsync init-db` "
            "(it only adds what is missing)"
        )


class FeedRunner:
    """Runs and previews feeds against the queue database of `settings`."""

    def __init__(
        self, settings: Settings, engine: Engine | None = None, tables: QueueTables | None = None
    ) -> None:
        self.s = settings
        self.tables = tables or schema.define_tables(settings.queue_table)
        self.ft = db_feeds.FeedTables.of(self.tables)
        self.engine = engine or source_engine(settings.database_url)

    def _source(self, feed: Feed) -> Engine:
        return (
            self.engine
            if feed.source_url == self.s.database_url
            else source_engine(feed.source_url)
        )

    def _prepare(self, feed: Feed) -> tuple[int, Cursor]:
        """Make sure the feed has its row; return its version and cursor."""
        with self.engine.connect() as conn:
            with conn.begin():
                check_tables(conn, self.ft)
                row = db_feeds.feed_row(conn, self.ft, feed.name)
            if row is None:
                row = db_feeds.add_feed_row(conn, self.ft, feed.name)
        return row.version, Cursor.from_row(row.cursor_value, row.seen)

    def _plan(self, conn: Connection, feed: Feed, source: SourceRows, cursor: Cursor) -> Plan:
        build = Payloads(self.s, db_feeds.now(conn))
        if feed.kind == "event":
            return plan_events(feed, source, cursor, build)
        state, settled = load_state(conn, self.ft, feed)
        plan = plan_entities(feed, source, state, build)
        plan.settled = settled
        return plan

    def preview(self, feed: Feed) -> Plan:
        """What the next run would enqueue; writes nothing."""
        _, cursor = self._prepare(feed)
        source = read_source(feed, self._source(feed), cursor)
        with self.engine.connect() as conn:
            transaction = conn.begin()
            try:
                return self._plan(conn, feed, source, cursor)
            finally:
                transaction.rollback()  # settling pending rows is only shown, never written

    def run(self, feed: Feed) -> RunResult:
        """Read the source and enqueue what changed, in one transaction with the feed's state
        (and cursor). A failure enqueues nothing and is recorded for `ampsync feed list`."""
        started = time.monotonic()
        try:
            version, cursor = self._prepare(feed)
            source = read_source(feed, self._source(feed), cursor)
            result = retry.retrying(
                lambda: self._apply_in_transaction(feed, version, source, cursor)
            )
        except FeedConflict:
            raise
        except FeedError as exc:
            self._record_error(feed, str(exc))
            raise
        except SQLAlchemyError as exc:
            message = f"feed {feed.name}: " + db_engine.describe_db_error(exc, self.s.database_url)
            self._record_error(feed, message)
            raise FeedError(message) from None
        result.seconds = time.monotonic() - started
        return result

    def _apply_in_transaction(
        self, feed: Feed, version: int, source: SourceRows, cursor: Cursor
    ) -> RunResult:
        """The run's one transaction, run again whole after a deadlock or a lock timeout."""
        with self.engine.begin() as conn:
            return self._apply(conn, feed, version, source, cursor)

    def _apply(
        self, conn: Connection, feed: Feed, version: int, source: SourceRows, cursor: Cursor
    ) -> RunResult:
        if not db_feeds.take_turn(conn, self.ft, feed.name, version):
            raise FeedConflict(
                f"feed {feed.name}: another run of this feed finished while this "
                "one read its source; nothing enqueued (the next run goes on)"
            )
        plan = self._plan(conn, feed, source, cursor)
        result = RunResult(
            feed.name, feed.kind, rows_read=plan.rows_read, settled=plan.settled, note=plan.note
        )
        ids = db_feeds.enqueue(conn, self.ft, [p.row for p in plan.planned])
        if ids:
            result.first_id, result.last_id = ids[0], ids[-1]
        failed = [(qid, p.error) for qid, p in zip(ids, plan.planned, strict=True) if p.error]
        for qid, error in failed:
            db_feeds.mark_invalid(conn, self.ft, qid, error)
        markers = [p.marker for p in plan.planned if p.marker]
        if markers:
            queue.insert_rows(conn, self.tables, markers)
        if feed.kind != "event":
            for qid, planned in zip(ids, plan.planned, strict=True):
                s = plan.state.setdefault(planned.key, EntityState())
                s.pending[qid] = {p: c.new for p, c in planned.changes.items()}
                s.dirty = True
            write_state(conn, self.ft, feed, plan.state)
        result.rows_enqueued = len(ids)
        result.failed_enqueued = len(failed)
        result.markers_enqueued = len(markers)
        result.invalid = len(plan.invalid)
        result.errors = (
            plan.invalid[:MAX_SHOWN_ERRORS]
            + [f"{p.key}: {p.error} (enqueued as failed)" for p in plan.planned if p.error][
                :MAX_SHOWN_ERRORS
            ]
        )
        moved: tuple[str | None, str | None] | None = None
        if plan.cursor is not None:
            seen = orjson.dumps(sorted(plan.cursor.seen)).decode() if plan.cursor.seen else None
            moved = (plan.cursor.to_json(), seen)
            result.cursor = moved[0]
        summary = {k: v for k, v in result.as_dict().items() if k != "errors"}
        db_feeds.record_run(conn, self.ft, feed.name, orjson.dumps(summary).decode(), moved)
        return result

    def _record_error(self, feed: Feed, message: str) -> None:
        try:
            with self.engine.begin() as conn:
                db_feeds.record_error(conn, self.ft, feed.name, message)
        except SQLAlchemyError:
            pass  # the queue database itself is the problem; the raised error says so

    def status(self) -> dict[str, dict[str, Any]]:
        """The last run of every feed that has run, by name."""
        with self.engine.connect() as conn, conn.begin():
            check_tables(conn, self.ft)
            rows = db_feeds.last_runs(conn, self.ft)
        return {
            name: {
                "last_run_at": at,
                "last_result": orjson.loads(res) if res else None,
                "last_error": err,
                "cursor": cur,
            }
            for name, at, res, err, cur in rows
        }


# --- entry points for the CLI and the Celery task ----------------------------------------------


def config_for(s: Settings) -> FeedsConfig:
    return load_config(s.feeds_file, s.database_url)


def run_feed(s: Settings, name: str, engine: Engine | None = None) -> RunResult:
    return FeedRunner(s, engine).run(config_for(s).get(name))
