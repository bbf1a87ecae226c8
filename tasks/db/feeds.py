"""Every statement a feed sends: its source query or procedure call wrapped with the cursor's
bounds, its row in `<queue>_feeds` (version, cursor, last run), its per-id state in
`<queue>_feed_state`, the status of the queue rows it waits for, and the rows it enqueues.
`review_statements` compiles them all for one dialect, for a DBA to read before a feed runs.

The feed itself is defined in tasks/feeds/; this module takes it as `FeedSource`, so the
database layer never imports the feeds package.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy import (
    Connection,
    Insert,
    Select,
    Table,
    Update,
    bindparam,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ClauseElement, TextClause

from ..outcomes import INVALID
from . import retry
from .schema import QueueTables
from .sql import FAILED, utcnow
from .tsql import CHUNK, DriverSQL, counted, driver_sql, run_count, with_identity

# The queue columns a feed fills; the queue assigns the others (id, status, created_at, …).
QUEUE_COLUMNS = (
    "kind",
    "user_id",
    "device_id",
    "event_type",
    "event_time",
    "insert_id",
    "group_type",
    "group_value",
    "properties",
    "extra",
)

# Ids (and state rows) per statement: see tasks/db/tsql.py's CHUNK.
_IDS_PER_STATEMENT = CHUNK


class FeedSource(Protocol):
    """What the statements need to know of a feed (tasks/feeds/config.py's Feed)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def query(self) -> str | None: ...

    @property
    def procedure(self) -> str | None: ...

    @property
    def params(self) -> Mapping[str, Any]: ...

    @property
    def cursor(self) -> str | None: ...

    @property
    def cursor_mode(self) -> str | None: ...


# --- ampsync's tables for feeds ----------------------------------------------------------------


@dataclass(frozen=True)
class FeedTables:
    queue: Table
    feeds: Table
    state: Table

    @classmethod
    def of(cls, tables: QueueTables) -> FeedTables:
        return cls(tables.queue, tables.feeds, tables.feed_state)


def missing_tables(conn: Connection, ft: FeedTables) -> list[str]:
    """The feed tables `ampsync init-db` has not created yet."""
    insp = inspect(conn)
    return [t.fullname for t in (ft.feeds, ft.state) if not insp.has_table(t.name, schema=t.schema)]


# --- the source --------------------------------------------------------------------------------

_BOUND_SQL = {
    # Rows below the lowest rowversion of an open transaction are committed.
    "rowversion": "SELECT CAST(MIN_ACTIVE_ROWVERSION() AS BIGINT) AS bound",
    # Every transaction below the snapshot's xmin has finished.
    "xid": "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS bound",
}
SOURCE_ALIAS = "ampsync_source"


def read_bound(conn: Connection, cursor_mode: str | None) -> int | None:
    """rowversion / xid cursors: the value below which every write has finished; None for
    modes that have no such bound (overlap)."""
    if cursor_mode not in _BOUND_SQL:
        return None
    return int(conn.execute(text(_BOUND_SQL[cursor_mode])).scalar_one())


def _escape_colons(sql: str) -> str:
    """User SQL goes through text(): `:word` in it is not one of our parameters."""
    return re.sub(r"(?<![:\w\\]):(?=\w)", r"\\:", sql)


def wrapper_problems(query: str, dialect_name: str) -> list[str]:
    """What keeps an event feed's query from running wrapped as `SELECT * FROM (query) AS
    ampsync_source` on SQL Server, each with what to change: ORDER BY without TOP (error
    1033), a column without a name (8155), two columns of one name (8156). Empty when the
    query is fine, is not SQL Server's, or cannot be parsed here (the server then says)."""
    if dialect_name != "mssql":
        return []
    try:
        import sqlglot
        from sqlglot import expressions as exp
    except ImportError:  # pragma: no cover - sqlglot is a dependency
        return []
    try:
        tree = sqlglot.parse_one(query, read="tsql")
    except sqlglot.errors.SqlglotError:
        return []
    problems: list[str] = []
    ordered = isinstance(tree, exp.Query) and tree.args.get("order")
    if ordered and not (tree.args.get("limit") or tree.args.get("offset")):
        problems.append(
            "ORDER BY is not allowed in the wrapped query without TOP: remove it (ampsync "
            "reads rows in cursor order itself)"
        )
    selects = tree.selects if isinstance(tree, exp.Query) else []
    seen: dict[str, int] = {}
    for n, column in enumerate(selects, 1):
        if isinstance(column, exp.Star) or (
            isinstance(column, exp.Column) and isinstance(column.this, exp.Star)
        ):
            continue
        name = column.alias_or_name
        if not name:
            problems.append(
                f"column {n} ({column.sql(dialect='tsql')[:60]}) has no name: give it one with AS"
            )
            continue
        if name.lower() in seen:
            problems.append(
                f"column {n} is named {name!r} like column {seen[name.lower()]}: rename one with AS"
            )
        seen.setdefault(name.lower(), n)
    return problems


def source_statement(feed: FeedSource, dialect: Dialect, first_run: bool = False) -> TextClause:
    """The statement a run executes on the source. Event feeds get the cursor's bounds: a
    query is wrapped and filtered; a procedure receives them as parameters `after`/`before`."""
    bounds: list[str] = []
    if feed.kind == "event":
        bounds = ["after"] if feed.cursor_mode == "overlap" else ["after", "before"]
        if feed.cursor_mode == "overlap" and first_run and not feed.procedure:
            bounds = []  # a procedure gets after = NULL instead
    if feed.procedure:
        names = list(feed.params) + bounds
        if dialect.name == "mssql":
            values = {n: f":{n}" for n in names}
            declare = ""
            if feed.cursor_mode == "rowversion":
                # EXEC takes no expressions: the bounds go through BIGINT variables, so a
                # bound above 2^31 (a DECIMAL literal) reaches the procedure as the counter.
                declare = "DECLARE " + ", ".join(f"@ampsync_{n} BIGINT = :{n}" for n in bounds)
                declare += ";\n"
                values.update({n: f"@ampsync_{n}" for n in bounds})
            sql = f"{declare}EXEC {feed.procedure}" + (
                " " + ", ".join(f"@{n} = {v}" for n, v in values.items()) if names else ""
            )
        elif dialect.name == "postgresql":
            sql = f"SELECT * FROM {feed.procedure}({', '.join(f'{n} => :{n}' for n in names)})"
        else:
            sql = f"CALL {feed.procedure}({', '.join(f':{n}' for n in names)})"
        return text(sql)
    # parse_config gives every feed a query or a procedure, and every event feed a cursor.
    assert feed.query is not None
    sql = _escape_colons(feed.query.strip().rstrip(";"))
    if not bounds:
        return text(sql)
    assert feed.cursor is not None
    column = f"{SOURCE_ALIAS}.{dialect.identifier_preparer.quote(feed.cursor)}"
    if feed.cursor_mode == "rowversion":
        # pymssql writes the bounds as bare integers; above 2^31 SQL Server types them DECIMAL,
        # whose BINARY(8) is not the counter's: cast through BIGINT (docs/sqlserver.md).
        after, before = (
            "CAST(CAST(:after AS BIGINT) AS BINARY(8))",
            "CAST(CAST(:before AS BIGINT) AS BINARY(8))",
        )
        where = f"{column} > {after} AND {column} < {before}"
    elif feed.cursor_mode == "xid":
        where = f"{column} > :after AND {column} < :before"
    else:
        where = f"{column} >= :after"
    return text(f"SELECT * FROM ({sql}) AS {SOURCE_ALIAS} WHERE {where}")


# --- the feed's row: version, cursor, last run -------------------------------------------------


class FeedRow(NamedTuple):
    version: int
    cursor_value: str | None  # JSON, see tasks/feeds/source.py's Cursor
    seen: str | None


def _feed_select(ft: FeedTables, feed_name: str) -> Select[int, str | None, str | None]:
    f = ft.feeds
    return select(f.c.version, f.c.cursor_value, f.c.seen).where(f.c.feed == feed_name)


def feed_row(conn: Connection, ft: FeedTables, feed_name: str) -> FeedRow | None:
    """The feed's row; None before its first run."""
    row = conn.execute(_feed_select(ft, feed_name)).first()
    return None if row is None else FeedRow(row[0], row[1], row[2])


def add_feed_row(conn: Connection, ft: FeedTables, feed_name: str) -> FeedRow:
    """Add the feed's row on its first run and return it. The insert commits on its own: it
    fails when a concurrent first run added the row, which is as good."""
    try:
        with conn.begin():
            conn.execute(insert(ft.feeds).values(feed=feed_name, version=0))
    except IntegrityError:
        pass  # another run created it
    row = retry.transaction(conn, lambda c: c.execute(_feed_select(ft, feed_name)).one())
    return FeedRow(row[0], row[1], row[2])


def _take_turn(ft: FeedTables, feed_name: str, version: int) -> Update:
    f = ft.feeds
    return (
        update(f)
        .where(f.c.feed == feed_name, f.c.version == version)
        .values(version=f.c.version + 1)
    )


def take_turn_statement(
    ft: FeedTables, feed_name: str, version: int, dialect: Dialect
) -> Update | DriverSQL:
    """The version bump; on SQL Server followed by `SELECT @@ROWCOUNT` in the same batch: with
    NOCOUNT on (a server's user options) the driver's rowcount is -1."""
    if dialect.name == "mssql":
        return counted(driver_sql(_take_turn(ft, feed_name, version), dialect))
    return _take_turn(ft, feed_name, version)


def take_turn(conn: Connection, ft: FeedTables, feed_name: str, version: int) -> bool:
    """This run's turn: the version bump locks the feed's row until commit, and matches
    nothing (False) when another run committed since this one read `version`."""
    statement = take_turn_statement(ft, feed_name, version, conn.dialect)
    if isinstance(statement, DriverSQL):
        return run_count(conn, statement) == 1
    return conn.execute(statement).rowcount == 1


def _run_update(
    ft: FeedTables, feed_name: str, last_result: str, cursor: tuple[str | None, str | None] | None
) -> Update:
    f = ft.feeds
    values: dict[str, Any] = dict(last_run_at=utcnow(), last_error=None)
    if cursor is not None:
        values.update(cursor_value=cursor[0], seen=cursor[1])
    values["last_result"] = last_result
    return update(f).where(f.c.feed == feed_name).values(**values)


def record_run(
    conn: Connection,
    ft: FeedTables,
    feed_name: str,
    last_result: str,
    cursor: tuple[str | None, str | None] | None,
) -> None:
    """A run's summary; `cursor` (cursor_value, seen) moves the event cursor when given."""
    conn.execute(_run_update(ft, feed_name, last_result, cursor))


def record_error(conn: Connection, ft: FeedTables, feed_name: str, message: str) -> None:
    f = ft.feeds
    conn.execute(
        update(f)
        .where(f.c.feed == feed_name)
        .values(last_run_at=utcnow(), last_error=message[:2000])
    )


def last_runs(
    conn: Connection, ft: FeedTables
) -> list[tuple[str, datetime | None, str | None, str | None, str | None]]:
    """(feed, last_run_at, last_result, last_error, cursor_value) of every feed that has run."""
    f = ft.feeds
    rows = conn.execute(
        select(f.c.feed, f.c.last_run_at, f.c.last_result, f.c.last_error, f.c.cursor_value)
    ).all()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def now(conn: Connection) -> datetime:
    """The queue database's current UTC time, in the caller's transaction."""
    value: datetime = conn.execute(select(utcnow())).scalar_one()
    return value


# --- state of identify / group_identify feeds --------------------------------------------------


class StateRow(NamedTuple):
    entity: str
    accepted: str | None  # JSON {property: value}
    pending: str | None  # JSON {queue id: {property: value}}


def _state_select(ft: FeedTables, feed_name: str) -> Select[str, str | None, str | None]:
    t = ft.state
    return select(t.c.entity, t.c.accepted, t.c.pending).where(t.c.feed == feed_name)


def _status_select(ft: FeedTables, ids: Sequence[int]) -> Select[int, str]:
    return select(ft.queue.c.id, ft.queue.c.status).where(ft.queue.c.id.in_(ids))


def _state_update(ft: FeedTables) -> Update:
    t = ft.state
    return (
        update(t)
        .where(t.c.feed == bindparam("b_feed"), t.c.entity == bindparam("b_entity"))
        .values(
            accepted=bindparam("b_accepted"), pending=bindparam("b_pending"), updated_at=utcnow()
        )
    )


def _state_insert(ft: FeedTables) -> Insert:
    t = ft.state
    return insert(t).values(
        feed=bindparam("b_feed"),
        entity=bindparam("b_entity"),
        accepted=bindparam("b_accepted"),
        pending=bindparam("b_pending"),
    )


def read_state(conn: Connection, ft: FeedTables, feed_name: str) -> list[StateRow]:
    return [StateRow(r[0], r[1], r[2]) for r in conn.execute(_state_select(ft, feed_name))]


def queue_statuses(conn: Connection, ft: FeedTables, ids: Sequence[int]) -> dict[int, str]:
    """The status of each queue row in `ids` that still exists."""
    status: dict[int, str] = {}
    for start in range(0, len(ids), _IDS_PER_STATEMENT):
        chunk = ids[start : start + _IDS_PER_STATEMENT]
        status.update(conn.execute(_status_select(ft, chunk)).all())
    return status


def write_state(
    conn: Connection,
    ft: FeedTables,
    feed_name: str,
    changed: Sequence[StateRow],
    new: Sequence[StateRow],
) -> None:
    """Update the ids that have a state row, insert those that have none yet."""

    def params(rows: Sequence[StateRow]) -> list[dict[str, Any]]:
        return [
            {
                "b_feed": feed_name,
                "b_entity": r.entity,
                "b_accepted": r.accepted,
                "b_pending": r.pending,
            }
            for r in rows
        ]

    # One row per statement (executemany), at most CHUNK rows per call; all in the run's
    # transaction, which must stay whole (tasks/feeds/runner.py).
    for start in range(0, len(changed), _IDS_PER_STATEMENT):
        conn.execute(_state_update(ft), params(changed[start : start + _IDS_PER_STATEMENT]))
    for start in range(0, len(new), _IDS_PER_STATEMENT):
        conn.execute(_state_insert(ft), params(new[start : start + _IDS_PER_STATEMENT]))


# --- the queue rows a run enqueues -------------------------------------------------------------


def enqueue(conn: Connection, ft: FeedTables, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert rows and return their ids in order (a pending change is remembered by its row)."""
    if not rows:
        return []
    table = ft.queue
    if conn.dialect.name == "mssql":
        # One row a batch, its id from SCOPE_IDENTITY(): OUTPUT without INTO fails once the
        # queue table has a trigger (error 334, docs/sqlserver.md).
        return [run_count(conn, enqueue_statement(ft, row, conn.dialect)) for row in rows]
    if conn.dialect.insert_executemany_returning_sort_by_parameter_order:
        statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        return list(conn.execute(statement, list(rows)).scalars())
    ids: list[int] = []
    for row in rows:
        key = conn.execute(insert(table), row).inserted_primary_key
        assert key is not None  # an INSERT always has one
        ids.append(key[0])
    return ids


def enqueue_statement(ft: FeedTables, row: Mapping[str, Any], dialect: Dialect) -> Any:
    """One row's INSERT as `dialect` runs it (SQL Server: with its id in the same batch)."""
    statement = insert(ft.queue).values(**row).inline()  # no OUTPUT on SQL Server
    if dialect.name == "mssql":
        return with_identity(driver_sql(statement, dialect))
    return statement


def mark_invalid(conn: Connection, ft: FeedTables, queue_id: int, error: str) -> None:
    """A row Amplitude would refuse is enqueued as failed, so operators see it and why."""
    q = ft.queue
    conn.execute(
        update(q)
        .where(q.c.id == queue_id)
        .values(status=FAILED, last_error=f"{INVALID} {error}"[:2000])
    )


# --- review ------------------------------------------------------------------------------------


def review_statements(feed: FeedSource, tables: QueueTables, dialect: Dialect) -> dict[str, str]:
    """Every statement a run of `feed` executes, as `dialect` compiles it (for a DBA's review
    and for tests that parse them)."""
    ft = FeedTables.of(tables)

    def sql(statement: ClauseElement, literal: bool = True) -> str:
        if literal:
            compiled = statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        else:
            compiled = statement.compile(dialect=dialect)
        return str(compiled).strip()

    # SQL Server's batches around the statements (tsql.py): the count and the new id
    mssql = dialect.name == "mssql"
    counted_suffix = ";\nSELECT @@ROWCOUNT AS n" if mssql else ""
    identity_suffix = ";\nSELECT CAST(SCOPE_IDENTITY() AS BIGINT) AS id" if mssql else ""
    bounds: dict[str, int] = {"after": 0, "before": 1000} if feed.kind == "event" else {}
    if feed.cursor_mode == "overlap":
        bounds = {"after": 0}
    source = source_statement(feed, dialect)
    out = {"source": sql(source.bindparams(**bounds, **feed.params))}
    if feed.kind == "event" and feed.cursor_mode in _BOUND_SQL:
        out["bound"] = _BOUND_SQL[feed.cursor_mode]
    out.update(
        {
            "take_turn": sql(_take_turn(ft, feed.name, 7)) + counted_suffix,
            "cursor": sql(_run_update(ft, feed.name, "{}", ('{"value": 1}', None))),
            "state": sql(_state_select(ft, feed.name)),
            "queue_status": sql(_status_select(ft, [1, 2, 3])),
            "state_update": sql(_state_update(ft), literal=False),
            "state_insert": sql(_state_insert(ft), literal=False),
            "enqueue": sql(
                insert(ft.queue).values({c: bindparam(c) for c in QUEUE_COLUMNS}).inline()
                if dialect.name == "mssql"
                else insert(ft.queue)
                .values({c: bindparam(c) for c in QUEUE_COLUMNS})
                .returning(ft.queue.c.id),
                literal=False,
            )
            + identity_suffix,
        }
    )
    return out
