"""Every statement ampsync can send to its database, by what it does, exactly as the driver
gets it: `ampsync statements` prints this list for a DBA, and the SQL Server rendering tests
check each entry (tests/integration/test_mssql_statements.py).

The list is not written out by hand: each entry comes from running the real function of
tasks/db (`queue.claim`, `queue.sweep`, `feeds.take_turn`, …) on a connection that records what
it is asked to execute and answers with representative rows, so a statement a function sends
cannot be missing here. For SQL Server through pymssql the text is what pymssql puts on the
wire (`pymssql._mssql.substitute_params`: strings as N'…', integers bare, times cut to
milliseconds); for the other databases the statement is compiled with its values inlined.
Nothing here needs a reachable server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, cast

from sqlalchemy import Connection, Insert, create_engine
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.expression import Select, TextClause

from ..amplitude.limits import MAX_EVENTS_PER_REQUEST
from ..outcomes import KINDS, ORDERED_KINDS
from ..settings import Settings
from . import endpoints, history, queue, reports
from . import feeds as db_feeds
from . import metrics as db_metrics
from .schema import QueueTables
from .tsql import DriverSQL

# Representative values: ids and a rowversion above 2^31, where SQL Server's typing of bare
# integer literals matters; a claim token as uuid4().hex makes one.
TOKEN = "3f2a9c1e5b7d4e6f8a0b1c2d3e4f5a6b"
IDS = (3_000_000_001, 3_000_000_002, 3_000_000_003)
ROWVERSION = (3_000_000_001, 3_000_000_900)
RUN_ID = "5e0c1a2b3c4d"
WHEN = datetime(2026, 11, 28, 9, 0, 0, 123456)


@dataclass(frozen=True)
class Values:
    """The settings the statements depend on."""

    lease_seconds: float = 300
    batch_size: int = MAX_EVENTS_PER_REQUEST
    max_attempts: int = 12
    max_age_seconds: float = 6 * 86400
    backoff_max_seconds: float = 1800
    pause_max_seconds: float = 600
    throttle_wait_seconds: float = 30
    daily_quota_wait_seconds: float = 3600
    sent_retention_days: float = 0
    history_retention_days: float = 30
    events_after_identify: bool = True

    @classmethod
    def from_settings(cls, s: Settings) -> Values:
        return cls(
            lease_seconds=s.lease_seconds,
            batch_size=s.batch_size or MAX_EVENTS_PER_REQUEST,
            max_attempts=s.max_attempts,
            max_age_seconds=s.max_age_seconds,
            backoff_max_seconds=s.backoff_max_seconds,
            pause_max_seconds=s.pause_max_seconds,
            throttle_wait_seconds=max(s.throttle_wait_v2_seconds, s.throttle_wait_batch_seconds),
            daily_quota_wait_seconds=s.daily_quota_wait_seconds,
            sent_retention_days=s.sent_retention_days,
            history_retention_days=s.history_retention_days,
            events_after_identify=bool(getattr(s, "events_after_identify", True)),
        )

    @classmethod
    def largest(cls) -> Values:
        """The largest value each setting allows (its `le` bound in tasks/settings.py, or
        infinity where it has none): every interval must still fit SQL Server's DATEADD."""

        def top(name: str) -> float:
            bound = math.inf
            for meta in Settings.model_fields[name].metadata:
                le = getattr(meta, "le", None)
                if le is not None:
                    bound = float(le)
            return bound

        return cls(
            lease_seconds=top("lease_seconds"),
            batch_size=MAX_EVENTS_PER_REQUEST,
            max_attempts=int(top("max_attempts")),
            max_age_seconds=top("max_age_seconds"),
            backoff_max_seconds=top("backoff_max_seconds"),
            pause_max_seconds=top("pause_max_seconds"),
            throttle_wait_seconds=max(
                top("throttle_wait_v2_seconds"), top("throttle_wait_batch_seconds")
            ),
            daily_quota_wait_seconds=top("daily_quota_wait_seconds"),
            sent_retention_days=top("sent_retention_days"),
            history_retention_days=top("history_retention_days"),
        )


@dataclass(frozen=True)
class Named:
    """One statement: its group (what it does), its name, its text as the driver gets it."""

    group: str
    name: str
    sql: str
    note: str = ""


# --- rendering ---------------------------------------------------------------------------------


def dialect_for(url: str) -> Dialect:
    """The dialect of a database URL, with its driver's paramstyle; connects to nothing."""
    return create_engine(url).dialect


def _pymssql(dialect: Dialect) -> bool:
    return dialect.name == "mssql" and dialect.driver == "pymssql"


def render(statement: ClauseElement | DriverSQL, dialect: Dialect, params: Any = None) -> str:
    """`statement` as `dialect`'s driver receives it (see module docstring)."""
    if isinstance(params, Sequence) and not isinstance(params, str | bytes):
        params = params[0] if params else None  # executemany: the first row stands for all
    params = dict(params or {})
    if isinstance(statement, DriverSQL):
        sql, values = statement.sql, {**statement.params, **params}
    elif _pymssql(dialect):
        compiled = statement.compile(
            dialect=dialect,
            column_keys=sorted(params) or None,
            compile_kwargs={"render_postcompile": True},
        )
        values = dict(compiled.construct_params(params) or {})
        processors: Mapping[str, Any] = getattr(compiled, "_bind_processors", {})
        for key, value in values.items():
            if key in processors:
                values[key] = processors[key](value)
        sql = str(compiled)
    else:
        if params and isinstance(statement, Insert) and not getattr(statement, "_values", None):
            statement = statement.values(**params)
        elif params and isinstance(statement, TextClause):
            statement = statement.bindparams(**params)
        elif params:

            def fill(bind: Any) -> None:
                if bind.key in params:
                    bind.value, bind.callable = params[bind.key], None

            statement = visitors.cloned_traverse(statement, {}, {"bindparam": fill})
        sql = str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        if dialect.identifier_preparer._double_percents:  # the driver reads %% as %
            sql = sql.replace("%%", "%")
        return sql.strip()
    if not _pymssql(dialect):
        return sql.strip()
    from pymssql import _mssql

    text: bytes | str = _mssql.substitute_params(sql, values)
    return (text.decode() if isinstance(text, bytes) else text).strip()


# --- the recording connection ------------------------------------------------------------------


class _Row(tuple[Any, ...]):
    names: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[self.names.index(name)]
        except ValueError:
            raise AttributeError(name) from None


class _Result:
    def __init__(self, rows: list[tuple[Any, ...]], names: Sequence[str]) -> None:
        self.rows = []
        for values in rows:
            row = _Row(values)
            row.names = tuple(names)
            self.rows.append(row)
        self.rowcount = len(rows)
        self.returns_rows = True
        self.inserted_primary_key = (IDS[0],)

    def __iter__(self) -> Iterator[_Row]:
        return iter(self.rows)

    def all(self) -> list[_Row]:
        return self.rows

    fetchall = all

    def first(self) -> _Row | None:
        return self.rows[0] if self.rows else None

    def one(self) -> _Row:
        return self.rows[0]

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None

    def scalar_one(self) -> Any:
        return self.rows[0][0]

    def scalars(self) -> list[Any]:
        return [r[0] for r in self.rows]

    def keys(self) -> list[str]:
        return list(self.rows[0].names) if self.rows else []


class _Recorder:
    """Stands in for a Connection: records each statement as the driver would get it and
    answers with the next of `answers` (no rows when they run out)."""

    def __init__(self, dialect: Dialect, answers: Sequence[list[Any]] = ()) -> None:
        self.dialect = dialect
        self.answers = list(answers)
        self.sent: list[str] = []

    def _answer(self, statement: Any) -> _Result:
        answer = self.answers.pop(0) if self.answers else []
        names: Sequence[str] = ()
        if isinstance(statement, Select):
            names = list(statement.selected_columns.keys())
        # a row given as a dict names its columns; the others are None
        rows = [
            tuple(row.get(n) for n in names) if isinstance(row, dict) else row for row in answer
        ]
        return _Result(rows, names)

    def execute(self, statement: ClauseElement, params: Any = None) -> _Result:
        self.sent.append(render(statement, self.dialect, params))
        return self._answer(statement)

    def exec_driver_sql(self, sql: str, params: Any = None) -> _Result:
        self.sent.append(render(DriverSQL(sql, dict(params or {})), self.dialect))
        return self._answer(None)

    @contextmanager
    def begin(self) -> Iterator[_Recorder]:
        yield self

    def invalidate(self) -> None:
        pass

    def in_transaction(self) -> bool:
        return False


# --- the catalogue -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExampleFeed:
    """A feed as tasks/db/feeds.py needs it (FeedSource), for the feed statements."""

    name: str
    kind: str
    query: str | None = None
    procedure: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    cursor: str | None = None
    cursor_mode: str | None = None


def example_feeds(dialect: Dialect) -> list[ExampleFeed]:
    """An event feed by query and by procedure (the cursor mode of the database), and an
    identify feed, when the user's feeds file declares none."""
    mode = {"mssql": "rowversion", "postgresql": "xid"}.get(dialect.name, "overlap")
    cursor = {"rowversion": "rv", "xid": "xid"}.get(mode, "picked_at")
    return [
        ExampleFeed(
            "pickups",
            "event",
            query=f"SELECT order_id, user_id, picked_at, {cursor} FROM pickups",
            cursor=cursor,
            cursor_mode=mode,
        ),
        ExampleFeed(
            "pickups_proc",
            "event",
            procedure="pickups_since",
            params={"region": "EU"},
            cursor=cursor,
            cursor_mode=mode,
        ),
        ExampleFeed("crm", "identify", query="SELECT user_id, segment FROM crm_customers"),
    ]


def statements(
    tables: QueueTables,
    dialect: Dialect,
    values: Values | None = None,
    feeds: Sequence[db_feeds.FeedSource] | None = None,
) -> list[Named]:
    """Every statement, in the order a DBA reads them: claims, the send side,
    acknowledgements, the sweep, operators' commands, history, endpoint pauses, status
    reports, feeds."""
    v = values or Values()
    out: list[Named] = []

    def capture(
        group: str,
        name: str,
        run: Callable[[Connection], object],
        answers: Sequence[list[Any]] = (),
        note: str = "",
    ) -> None:
        recorder = _Recorder(dialect, answers)
        run(cast(Connection, recorder))
        for n, sql in enumerate(recorder.sent, 1):
            label = name if len(recorder.sent) == 1 else f"{name} ({n}/{len(recorder.sent)})"
            out.append(Named(group, label, sql, note))

    ids = [(i,) for i in IDS]
    limit = v.batch_size
    for kind in KINDS:
        after_identify = v.events_after_identify and kind == "event"
        for floor in (0, IDS[-1]):
            where = " past the claim floor" if floor else ""
            claim = partial(
                queue.claim,
                tables=tables,
                kind=kind,
                limit=limit,
                lease_seconds=v.lease_seconds,
                after_id=floor,
                after_identify=after_identify,
            )
            capture("claim", f"claim {kind}{where}", claim, [ids])
        due = partial(queue.has_due_rows, tables=tables, kind=kind)
        capture("claim", f"due rows left of {kind}", due)

    capture(
        "send",
        "count a re-run",
        lambda c: queue.count_rerun(c, tables, TOKEN, v.max_attempts),
    )
    capture(
        "send",
        "load and renew",
        lambda c: queue.renew_and_load(
            c, tables, TOKEN, v.lease_seconds, max(v.lease_seconds - 30, 1)
        ),
        [[{"id": IDS[0], "short": True}]],
    )
    for kind in ORDERED_KINDS:
        capture(
            "send",
            f"defer {kind} rows out of order",
            partial(queue.defer_out_of_order, tables=tables, kind=kind, token=TOKEN),
            [[(IDS[1],)]],
        )
    capture("send", "load", lambda c: queue.load(c, tables, TOKEN))

    run_row: dict[str, Any] = {
        "run_id": RUN_ID,
        "task": history.BATCH,
        "kind": "event",
        "claim_token": TOKEN,
        "started_at": WHEN,
        "rows_claimed": 3,
        "rows_sent": 1,
        "rows_failed": 1,
        "rows_retried": 1,
        "requests": 1,
        "values_truncated": 0,
        "answers": '{"200": 1}',
        "error": None,
    }
    all_sent = queue.Acknowledgement(sent=list(IDS), failed={}, retry={}, all_sent=True)
    capture(
        "acknowledge",
        "all sent",
        lambda c: queue.acknowledge(c, tables, TOKEN, all_sent, history=run_row),
    )
    mixed = queue.Acknowledgement(
        sent=[IDS[0]],
        failed={IDS[1]: "rejected by Amplitude: user_id 'x' is too short"},
        retry={
            (v.backoff_max_seconds, False, "will retry: HTTP 503"): [IDS[2]],
            (v.throttle_wait_seconds, True, "will retry: throttled (HTTP 429)"): [IDS[2]],
            (v.daily_quota_wait_seconds, True, "will retry: daily quota"): [IDS[2]],
            (v.pause_max_seconds, True, "will retry: batch paused: HTTP 403"): [IDS[2]],
        },
    )
    capture(
        "acknowledge",
        "sent, failed and retried",
        lambda c: queue.acknowledge(c, tables, TOKEN, mixed, history=run_row),
    )

    capture(
        "sweep",
        "sweep",
        lambda c: queue.sweep(c, tables, v.max_attempts, v.max_age_seconds, thorough=True),
        [[(0,)]] * 4,
    )

    capture(
        "retry-failed",
        "retry-failed --kind --class --since --until",
        lambda c: queue.retry_failed(
            c, tables, kind="event", failure_class="gave-up", since=WHEN, until=WHEN
        ),
        [[(0,)]],
    )
    capture(
        "retry-failed",
        "retry-failed --ids",
        lambda c: queue.retry_failed(c, tables, ids=list(IDS), failure_class=None),
        [[(0,)]],
    )
    capture(
        "retry-failed",
        "retry-failed: rows first tried over 7 days ago",
        lambda c: queue.failed_first_tried_before(c, tables, 7 * 86400, kind="event"),
        [[(0,)]],
    )

    sent_days = v.sent_retention_days or 30
    history_days = v.history_retention_days or 30
    keep = [
        f"{name}=0 keeps them: shown at 30 days"
        for name, days in (
            ("AMPSYNC_RETENTION_DAYS", v.sent_retention_days),
            ("AMPSYNC_HISTORY_DAYS", v.history_retention_days),
        )
        if not days
    ]
    capture(
        "prune",
        "prune",
        lambda c: queue.prune(c, tables, sent_days, history_days),
        [[(0,)], [(0,)]],
        note="; ".join(keep),
    )

    capture("history", "record a sync", lambda c: history.record_run(c, tables, run_row))
    capture(
        "history",
        "last runs",
        lambda c: history.last_runs(c, tables),
        [[(RUN_ID, WHEN, 3, None)]],
    )

    pause = v.pause_max_seconds
    capture("endpoint pause", "read", lambda c: endpoints.read(c, tables, "batch"))
    capture("endpoint pause", "read all", lambda c: endpoints.read_all(c, tables))
    capture(
        "endpoint pause",
        "record a failure (first)",
        lambda c: endpoints.record_failure(c, tables, "batch", 1, "HTTP 503", lambda n: pause),
    )
    capture(
        "endpoint pause",
        "record a failure (again)",
        lambda c: endpoints.record_failure(c, tables, "batch", 1, "HTTP 503", lambda n: pause),
        [[(2,)]],
    )
    capture("endpoint pause", "clear", lambda c: endpoints.clear_failures(c, tables, "batch"))

    capture("status", "rows by kind and status", lambda c: reports.row_counts(c, tables))
    capture(
        "status",
        "rows by status up to an id",
        lambda c: reports.row_counts(c, tables, "event", IDS[-1]),
    )
    capture("status", "highest id", lambda c: reports.max_id(c, tables, "event"))
    capture(
        "status",
        "oldest pending row",
        lambda c: reports.pending_overview(c, tables),
        [[(WHEN, WHEN)], [(0,)]],
    )
    capture("status", "commonest errors", lambda c: reports.failures(c, tables))
    if hasattr(reports, "busy_users"):
        capture(
            "status", "users near the update limit", lambda c: reports.busy_users(c, tables, 1350)
        )
    capture("status", "failed rows", lambda c: reports.failed_rows(c, tables))
    capture(
        "retry-failed",
        "failed rows by class",
        lambda c: reports.failed_by_class(c, tables, "event", [IDS[0]], WHEN, WHEN),
        [[(0, 0, 0, 0)]],
    )
    capture("status", "database time", lambda c: reports.db_now(c), [[(WHEN,)]])
    capture(
        "metrics",
        "oldest pending row of each kind",
        lambda c: db_metrics.oldest_pending(c, tables),
        [[(WHEN,)], []],
    )
    capture(
        "metrics",
        "batches finished since",
        lambda c: db_metrics.finished_batches(c, tables, WHEN),
        [[(WHEN,)], []],
    )

    for feed in feeds if feeds is not None else example_feeds(dialect):
        _feed_statements(capture, tables, dialect, feed)
    return out


def _feed_statements(
    capture: Callable[..., None],
    tables: QueueTables,
    dialect: Dialect,
    feed: db_feeds.FeedSource,
) -> None:
    ft = db_feeds.FeedTables.of(tables)
    group = f"feed {feed.name} ({feed.kind})"
    params: dict[str, Any] = dict(feed.params)
    if feed.kind == "event":
        capture(group, "cursor bound", lambda c: db_feeds.read_bound(c, feed.cursor_mode), [[(0,)]])
        if feed.cursor_mode == "overlap":
            params["after"] = WHEN if feed.cursor and "time" in feed.cursor else IDS[0]
        else:
            params.update(after=ROWVERSION[0], before=ROWVERSION[1])
    capture(
        group,
        "source",
        lambda c: c.execute(db_feeds.source_statement(feed, dialect), params),
    )
    capture(group, "its row", lambda c: db_feeds.feed_row(c, ft, feed.name))
    capture(
        group,
        "its row, first run",
        lambda c: db_feeds.add_feed_row(c, ft, feed.name),
        [[], [(0, None, None)]],
    )
    capture(group, "take its turn", lambda c: db_feeds.take_turn(c, ft, feed.name, 7), [[(1,)]])
    capture(group, "the queue database's time", lambda c: db_feeds.now(c), [[(WHEN,)]])
    if feed.kind != "event":
        capture(group, "state", lambda c: db_feeds.read_state(c, ft, feed.name))
        capture(
            group,
            "status of pending rows",
            lambda c: db_feeds.queue_statuses(c, ft, list(IDS)),
        )
        row = db_feeds.StateRow("Alice", '{"segment": "gold"}', '{"3000000001": {}}')
        capture(
            group,
            "state written",
            lambda c: db_feeds.write_state(c, ft, feed.name, [row], [row]),
        )
    enqueued: dict[str, Any] = {
        "kind": feed.kind,
        "user_id": "Alice",
        "properties": '{"segment": "gold"}',
    }
    if feed.kind == "event":
        enqueued.update(event_type="Order Picked Up", event_time=WHEN, insert_id="pickups:1")
    capture(group, "enqueue", lambda c: db_feeds.enqueue(c, ft, [enqueued]), [[(IDS[0],)]])
    capture(
        group,
        "enqueue an invalid row as failed",
        lambda c: db_feeds.mark_invalid(c, ft, IDS[0], "event_type is empty"),
    )
    capture(
        group,
        "record the run",
        lambda c: db_feeds.record_run(c, ft, feed.name, '{"rows_read": 1}', ('{"value": 1}', None)),
    )
    capture(
        group,
        "record a failed run",
        lambda c: db_feeds.record_error(c, ft, feed.name, "the query failed"),
    )
    capture(group, "last runs", lambda c: db_feeds.last_runs(c, ft))
