"""The queue table: its schema, `init-db`, and the named statements that claim and acknowledge rows.

Every statement is built with SQLAlchemy Core, so the same logic compiles for SQL Server,
PostgreSQL, MySQL/MariaDB and SQLite; tests compile them with the mssql dialect and parse the
result as T-SQL. Times come from the database's clock (`utcnow()`), never a worker's. `kind` and
`status` are compared with literals, not bind parameters: SQL Server's filtered indexes need
literals, and pymssql sends strings as NVARCHAR, which would turn seeks on these VARCHAR
columns into scans.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Unicode,
    UnicodeText,
    and_,
    case,
    create_engine,
    event,
    exists,
    func,
    inspect,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mssql, mysql
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex, CreateTable, DDLElement
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from . import settings as settings_module

KINDS = ("identify", "event", "group_identify")
# Kinds whose rows of one key must reach Amplitude in id order (SPEC.md, Delivery rules).
ORDERED_KINDS = ("identify", "group_identify")

# SQL Server caps a statement at 2100 parameters; id lists are sent in chunks below that.
_IDS_PER_STATEMENT = 1000


# --- the database clock ------------------------------------------------------------------------


class utcnow(FunctionElement):
    """The database's current UTC time (naive), so leases never depend on a worker's clock."""

    type = DateTime()
    inherit_cache = True


@compiles(utcnow)
def _utcnow_default(element, compiler, **kw):  # SQLite and anything else
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


@compiles(utcnow, "mssql")
def _utcnow_mssql(element, compiler, **kw):
    return "SYSUTCDATETIME()"


@compiles(utcnow, "postgresql")
def _utcnow_pg(element, compiler, **kw):
    return "(now() AT TIME ZONE 'utc')"


@compiles(utcnow, "mysql")
def _utcnow_mysql(element, compiler, **kw):
    return "UTC_TIMESTAMP(6)"


class utcnow_plus(FunctionElement):
    """The database's UTC time plus a number of seconds (a bind parameter or literal)."""

    type = DateTime()
    inherit_cache = True


@compiles(utcnow_plus)
def _plus_default(element, compiler, **kw):
    (seconds,) = element.clauses
    return (
        "strftime('%Y-%m-%d %H:%M:%f', 'now', "
        f"({compiler.process(seconds, **kw)}) || ' seconds')"
    )


@compiles(utcnow_plus, "mssql")
def _plus_mssql(element, compiler, **kw):
    (seconds,) = element.clauses
    # DATEADD takes an int; milliseconds keep sub-second backoff for tests.
    return f"DATEADD(millisecond, CAST(({compiler.process(seconds, **kw)}) * 1000 AS INT), SYSUTCDATETIME())"


@compiles(utcnow_plus, "postgresql")
def _plus_pg(element, compiler, **kw):
    (seconds,) = element.clauses
    return f"((now() AT TIME ZONE 'utc') + make_interval(secs => {compiler.process(seconds, **kw)}))"


@compiles(utcnow_plus, "mysql")
def _plus_mysql(element, compiler, **kw):
    (seconds,) = element.clauses
    return f"DATE_ADD(UTC_TIMESTAMP(6), INTERVAL ({compiler.process(seconds, **kw)}) * 1000000 MICROSECOND)"


def _lit(value: str) -> ColumnElement:
    """A string literal in the SQL text (see module docstring)."""
    assert value.replace("_", "").isalnum()
    return literal_column(f"'{value}'")


PENDING, IN_FLIGHT, SENT, FAILED = (_lit(s) for s in ("pending", "in_flight", "sent", "failed"))

# --- schema ------------------------------------------------------------------------------------

_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements only INTEGER keys
_TIME = DateTime().with_variant(mssql.DATETIME2(), "mssql").with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# NVARCHAR(MAX) on SQL Server (UnicodeText would give the deprecated NTEXT).
_JSON_TEXT = (UnicodeText().with_variant(mssql.NVARCHAR(), "mssql")
              .with_variant(mysql.LONGTEXT(), "mysql", "mariadb"))  # fmt: skip


@dataclass(frozen=True)
class QueueTables:
    """The queue table and ampsync's own tables beside it, named after it."""

    metadata: MetaData
    queue: Table
    endpoints: Table
    runs: Table

    @property
    def own_columns(self) -> list[str]:
        return [c.name for c in self.queue.columns if c.info.get("owner") == "ampsync"]


def _partial(index: Index, where: ColumnElement) -> Index:
    index.dialect_options["postgresql"]["where"] = where
    index.dialect_options["sqlite"]["where"] = where
    return index


def _own(column: Column) -> Column:
    column.info["owner"] = "ampsync"
    return column


def define_tables(table_name: str) -> QueueTables:
    schema, _, name = table_name.rpartition(".")
    schema = schema or None
    md = MetaData(schema=schema)
    q = Table(
        name,
        md,
        # written by the user's SQL
        Column("id", _ID, primary_key=True, autoincrement=True),
        Column("kind", String(16), nullable=False),
        Column("user_id", Unicode(255)),
        Column("device_id", Unicode(255)),
        Column("event_type", Unicode(1024)),
        Column("event_time", _TIME),
        Column("insert_id", Unicode(255)),
        Column("group_type", Unicode(255)),
        Column("group_value", Unicode(255)),
        Column("properties", _JSON_TEXT),
        Column("extra", _JSON_TEXT),
        # written by ampsync
        Column("status", String(16), nullable=False, server_default="pending"),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("next_attempt_at", _TIME),
        Column("locked_until", _TIME),
        Column("last_error", Unicode(2000)),
        Column("created_at", _TIME, nullable=False, server_default=utcnow()),
        Column("sent_at", _TIME),
        # ampsync's own additions (init-db adds them to an existing table)
        _own(Column("claim_token", String(32))),
        _own(Column("first_attempt_at", _TIME)),
    )
    # Indexes are partial where the database allows (PostgreSQL, SQLite): every claim, renewal
    # and acknowledgement changes `status`, so each update writes every index the row is in; a
    # row outside an index's predicate costs it nothing. Not on SQL Server: filtered indexes
    # make every writer (the user's SQL too) need QUOTED_IDENTIFIER ON.
    # Claim: equality on kind and status, then id order. Sent rows are left out (elsewhere they
    # sit in their own part of the index), so history does not slow the claim down and an
    # acknowledgement writes no entry here: with the key indexes below also left to unfinished
    # rows, database CPU per acknowledged identify row fell 22-24 → 9-12 µs (bench/statements.py
    # --kind identify, alternating runs).
    _partial(Index(f"ix_{name}_claim", q.c.kind, q.c.status, q.c.id), q.c.status != SENT)
    _partial(Index(f"ix_{name}_lease", q.c.status, q.c.locked_until), q.c.status == IN_FLIGHT)
    _partial(Index(f"ix_{name}_claim_token", q.c.claim_token), q.c.claim_token.is_not(None))
    # The maximum-age sweep: only retried rows are in it on PostgreSQL/SQLite (without it the
    # sweep read the whole table, 210-227 ms per sync at 1M rows, bench/README.md).
    _partial(Index(f"ix_{name}_age", q.c.first_attempt_at),
             and_(q.c.status == PENDING, q.c.first_attempt_at.is_not(None)))  # fmt: skip
    # Per-key order of identify / group_identify rows: only unfinished rows can hold a later
    # one back. The key leads: PostgreSQL leaves a column its partial predicate fixes out of
    # the index condition, so a leading `kind` turned each lookup into a scan of the whole
    # index (0.26 ms × 2000 per claim, measured).
    unfinished = q.c.status.in_([PENDING, IN_FLIGHT])
    _partial(Index(f"ix_{name}_user", q.c.user_id, q.c.kind, q.c.id),
             and_(q.c.kind == _lit("identify"), unfinished))  # fmt: skip
    _partial(Index(f"ix_{name}_device", q.c.device_id, q.c.kind, q.c.id),
             and_(q.c.kind == _lit("identify"), q.c.user_id.is_(None), unfinished))  # fmt: skip
    _partial(Index(f"ix_{name}_group", q.c.group_type, q.c.group_value, q.c.kind, q.c.id),
             and_(q.c.kind == _lit("group_identify"), unfinished))  # fmt: skip

    endpoints = Table(
        f"{name}_endpoints",
        md,
        Column("endpoint", String(32), primary_key=True),
        Column("paused_until", _TIME),
        Column("failures", Integer, nullable=False, server_default=text("0")),
        Column("reason", Unicode(2000)),
        Column("updated_at", _TIME, nullable=False, server_default=utcnow()),
    )
    # Run history: one row per sync and per batch, so "what happened last night" is a query.
    runs = Table(
        f"{name}_runs",
        md,
        Column("id", _ID, primary_key=True, autoincrement=True),
        Column("run_id", String(32), nullable=False),
        Column("task", String(16), nullable=False),  # 'sync' or 'batch'
        Column("kind", String(64)),  # a sync may cover every kind
        Column("claim_token", String(32)),
        Column("started_at", _TIME, nullable=False),
        Column("finished_at", _TIME, nullable=False, server_default=utcnow()),
        Column("rows_claimed", Integer, nullable=False, server_default=text("0")),
        Column("rows_sent", Integer, nullable=False, server_default=text("0")),
        Column("rows_failed", Integer, nullable=False, server_default=text("0")),
        Column("rows_retried", Integer, nullable=False, server_default=text("0")),
        Column("requests", Integer, nullable=False, server_default=text("0")),
        Column("values_truncated", Integer, nullable=False, server_default=text("0")),
        Column("answers", Unicode(500)),  # HTTP status -> count, as JSON
        Column("error", Unicode(2000)),
    )
    Index(f"ix_{name}_runs_finished", runs.c.finished_at)
    Index(f"ix_{name}_runs_run_id", runs.c.run_id)
    from .feeds import define_feed_tables  # feeds builds on this module

    define_feed_tables(md, name)
    return QueueTables(md, q, endpoints, runs)


# --- engine ------------------------------------------------------------------------------------


def make_engine(url: str, **kwargs) -> Engine:
    """An engine that survives dropped connections and, on SQLite, several writer processes."""
    options: dict = {"pool_pre_ping": True, "future": True}
    if url.startswith("sqlite"):
        options["connect_args"] = {"timeout": 30}
    elif url.startswith("mssql"):
        # READPAST is refused under SNAPSHOT/SERIALIZABLE.
        options["isolation_level"] = "READ COMMITTED"
    else:
        options["pool_recycle"] = 1800
    options.update(kwargs)
    engine = create_engine(url, **options)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # Several processes write: WAL lets readers go on, busy_timeout waits for the lock.
            # Text that is not UTF-8 is kept (surrogate-escaped) so the row can be failed with
            # a reason instead of breaking the whole fetch.
            dbapi_conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
            dbapi_conn.isolation_level = None  # SQLAlchemy's begin() issues BEGIN itself

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def describe_db_error(exc: BaseException, url: str) -> str:
    first = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0][:300]
    return f"cannot reach the database at {settings_module.mask_url(url)}: {first}"


# --- init-db -----------------------------------------------------------------------------------


class _AddColumn(DDLElement):
    def __init__(self, table: Table, column: Column) -> None:
        self.table, self.column = table, column


@compiles(_AddColumn)
def _add_column(element, compiler, **kw):
    ddl = compiler.sql_compiler.preparer
    col_spec = compiler.get_column_specification(element.column)
    keyword = "ADD" if compiler.dialect.name == "mssql" else "ADD COLUMN"
    return f"ALTER TABLE {ddl.format_table(element.table)} {keyword} {col_spec}"


def missing_ddl(conn: Connection, tables: QueueTables) -> list[DDLElement]:
    """DDL for what the database lacks: tables, ampsync's columns, indexes. Never drops or alters."""
    insp = inspect(conn)
    statements: list[DDLElement] = []
    for table in tables.metadata.sorted_tables:
        if not insp.has_table(table.name, schema=table.schema):
            statements.append(CreateTable(table))
            statements.extend(CreateIndex(ix) for ix in _sorted(table.indexes))
            continue
        present = {c["name"].lower() for c in insp.get_columns(table.name, schema=table.schema)}
        for column in table.columns:
            if column.name.lower() not in present:
                if column.info.get("owner") != "ampsync" and table is tables.queue:
                    continue  # a user column missing is reported by check_table, not added
                statements.append(_AddColumn(table, column))
        have_ix = {ix["name"].lower() for ix in insp.get_indexes(table.name, schema=table.schema)}
        statements.extend(
            CreateIndex(ix) for ix in _sorted(table.indexes) if ix.name.lower() not in have_ix
        )
    return statements


def create_ddl(tables: QueueTables) -> list[DDLElement]:
    """The DDL of a database that has none of ampsync's tables yet."""
    statements: list[DDLElement] = []
    for table in tables.metadata.sorted_tables:
        statements.append(CreateTable(table))
        statements.extend(CreateIndex(ix) for ix in _sorted(table.indexes))
    return statements


def _sorted(indexes) -> list[Index]:
    return sorted(indexes, key=lambda ix: ix.name)


def compile_ddl(statements: Iterable[DDLElement], dialect) -> str:
    sep = "\nGO\n" if dialect.name == "mssql" else ";\n"
    body = sep.join(str(s.compile(dialect=dialect)).strip() for s in statements)
    return body + (sep if body else "")


def init_db(engine: Engine, tables: QueueTables) -> list[str]:
    """Create whatever is missing; return the statements run."""
    with engine.begin() as conn:
        ddl = missing_ddl(conn, tables)
        for statement in ddl:
            conn.execute(statement)
    return [str(s.compile(dialect=engine.dialect)).strip() for s in ddl]


def check_table(conn: Connection, tables: QueueTables) -> str | None:
    """One line naming what is missing from the queue table, or None when it is complete."""
    insp = inspect(conn)
    q = tables.queue
    if not insp.has_table(q.name, schema=q.schema):
        return f"queue table {tables.queue.fullname} does not exist: run `ampsync init-db`"
    present = {c["name"].lower() for c in insp.get_columns(q.name, schema=q.schema)}
    missing = [c.name for c in q.columns if c.name.lower() not in present]
    for own in (tables.endpoints, tables.runs):
        if not insp.has_table(own.name, schema=q.schema):
            missing.append(f"table {own.fullname}")
    if missing:
        return (
            f"queue table {q.fullname} lacks {', '.join(missing)}: run `ampsync init-db` "
            "(it only adds what is missing)"
        )
    return None


# --- claim -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    token: str
    rows: int
    last_id: int = 0  # the highest id claimed; 0 when nothing was

    def next_floor(self, limit: int) -> int:
        """Where the next claim of the kind starts (`after_id`): past this one when it was full;
        after a short one, at the oldest due row again, where retried and released rows wait."""
        return self.last_id if self.rows == limit else 0


def _earlier_of_same_key(q: Table, kind: str, later, conditions) -> ColumnElement:
    """An earlier row of `later`'s key (user, else device, else group) meets the conditions.

    One EXISTS per kind of key, each a seek on its index (kind, key, id): an OR of the keys
    inside one EXISTS made PostgreSQL scan every row of the kind per candidate (2-5 s per
    claim of 2000 rows in 9000, measured), split it runs in milliseconds.
    """
    earlier = q.alias("earlier")
    base = (earlier.c.kind == _lit(kind), earlier.c.id < later.c.id, *conditions(earlier))
    if kind == "group_identify":
        return exists().where(*base, earlier.c.group_type == later.c.group_type,
                              earlier.c.group_value == later.c.group_value)  # fmt: skip
    return or_(
        and_(later.c.user_id.is_not(None),
             exists().where(*base, earlier.c.user_id == later.c.user_id)),
        and_(later.c.user_id.is_(None),
             exists().where(*base, earlier.c.user_id.is_(None),
                            earlier.c.device_id == later.c.device_id)),
    )  # fmt: skip


def claim_statement(tables: QueueTables, kind: str, limit: int, lease_seconds: float, token: str,
                    after_id: int = 0):  # fmt: skip
    """The claim, as one statement (two on MySQL, which lacks UPDATE … RETURNING).

    Due rows of one kind, oldest first, skipping rows another claim has locked. A row of an
    ordered kind waits while an earlier row of its key is in flight or backing off; an earlier
    row that is due travels in the same batch, ahead of it.
    `after_id` (the keyset floor) starts the index seek past rows a previous claim took: with
    statistics taken while every row was pending, PostgreSQL otherwise walks the primary key
    over every row already claimed (1M events: claims grew 0.2 → 1.7 s through the drain; with
    the floor 26-40 ms flat, bench/README.md finding 3). The same-key check ignores it.
    Returns (select of candidate ids, update of those ids) — the update is `.returning(id)`.
    """
    assert kind in KINDS
    q = tables.queue
    candidate = q.alias("candidate")
    now = utcnow()
    due = and_(
        candidate.c.kind == _lit(kind),
        candidate.c.status == PENDING,
        or_(candidate.c.next_attempt_at.is_(None), candidate.c.next_attempt_at <= now),
    )
    if kind in ORDERED_KINDS:
        blocked = _earlier_of_same_key(q, kind, candidate, lambda earlier: (or_(
            earlier.c.status == IN_FLIGHT,
            and_(earlier.c.status == PENDING, earlier.c.next_attempt_at > now),
        ),))  # fmt: skip
        due = and_(due, ~blocked)
    if after_id:
        due = and_(due, candidate.c.id > after_id)
    pick = (
        select(candidate.c.id)
        .where(due)
        .order_by(candidate.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=candidate)
        .with_hint(candidate, "WITH (ROWLOCK, UPDLOCK, READPAST)", dialect_name="mssql")
    )
    stamp = (
        update(q)
        .values(
            status=IN_FLIGHT,
            claim_token=token,
            locked_until=utcnow_plus(literal_column(str(float(lease_seconds)))),
            attempts=q.c.attempts + 1,
            first_attempt_at=func.coalesce(q.c.first_attempt_at, utcnow()),
        )
    )
    return pick, stamp


def claim(conn: Connection, tables: QueueTables, kind: str, limit: int, lease_seconds: float,
          after_id: int = 0) -> Claim:  # fmt: skip
    """Claim up to `limit` due rows of `kind` with ids above `after_id` under a new token
    (commits)."""
    token = uuid.uuid4().hex
    pick, stamp = claim_statement(tables, kind, limit, lease_seconds, token, after_id)
    q = tables.queue
    with conn.begin():
        if conn.dialect.name in ("mysql", "mariadb"):
            ids = list(conn.execute(pick).scalars())  # locked FOR UPDATE until the commit
            for chunk in _chunks(ids):
                conn.execute(stamp.where(q.c.id.in_(chunk)))
        else:
            statement = stamp.where(q.c.id.in_(pick.scalar_subquery())).returning(q.c.id)
            ids = list(conn.execute(statement).scalars())
    return Claim(token, len(ids), max(ids, default=0))


def compiled_claim(tables: QueueTables, kind: str, limit: int, lease_seconds: float, dialect,
                   after_id: int = 0):  # fmt: skip
    """The claim statement as the given dialect would run it (for review and tests)."""
    pick, stamp = claim_statement(tables, kind, limit, lease_seconds, "0" * 32, after_id)
    q = tables.queue
    statement = stamp.where(q.c.id.in_(pick.scalar_subquery())).returning(q.c.id)
    return statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True})


# --- sweep -------------------------------------------------------------------------------------


def _gave_up(q: Table, why: str) -> ColumnElement:
    """The last_error of a row ampsync stops retrying: the class, why, then the error before."""
    assert "'" not in why
    return func.substring(
        literal_column(f"'{GAVE_UP} {why}; last error: '")
        + func.coalesce(q.c.last_error, literal_column("'none'")),
        1,
        2000,
    )


def sweep_statements(tables: QueueTables, max_attempts: int, max_age_seconds: float = 0):
    """Leases that expired (a worker died or lost its message): the row is due again, or failed
    once its attempts are spent (attempts count at claim, so a row that kills its worker ends).
    With a maximum age, pending rows first tried longer ago than that fail too: a re-send after
    Amplitude's 7-day dedup window could count twice."""
    q = tables.queue
    expired = and_(q.c.status == IN_FLIGHT, q.c.locked_until < utcnow())
    give_up = (
        update(q)
        .where(expired, q.c.attempts >= max_attempts)
        .values(
            status=FAILED,
            claim_token=None,
            locked_until=None,
            last_error=_gave_up(q, f"{max_attempts} attempts: lease expired (the worker died "
                                   "or stopped mid-batch)"),
        )
    )  # fmt: skip
    release = (
        update(q)
        .where(expired, q.c.attempts < max_attempts)
        .values(status=PENDING, claim_token=None, locked_until=None)
    )
    # No claim ever selects a kind it does not know: such a row would stay pending forever.
    unknown_kind = (
        update(q)
        .where(q.c.status == PENDING, _unknown_kind(q))
        .values(
            status=FAILED,
            last_error=literal_column(f"'{INVALID} kind '''") + q.c.kind
            + literal_column(f"''' is not one of {', '.join(KINDS)}'"),
        )
    )  # fmt: skip
    if not max_age_seconds:
        return give_up, release, unknown_kind
    too_old = (
        update(q)
        .where(
            q.c.status == PENDING,
            q.c.first_attempt_at < utcnow_plus(literal_column(str(-float(max_age_seconds)))),
        )
        .values(
            status=FAILED,
            next_attempt_at=None,
            last_error=_gave_up(q, f"{max_age_seconds:g} s: pending longer than "
                                   f"AMPSYNC_MAX_AGE_SECONDS ({max_age_seconds:g} s) since its "
                                   "first attempt"),
        )
    )  # fmt: skip
    return give_up, release, unknown_kind, too_old


def _unknown_kind(q: Table) -> ColumnElement:
    """kind is none of KINDS, written as the ranges between them: the claim index (kind, status,
    id) answers with a few empty seeks instead of reading every pending row."""
    known = sorted(KINDS)
    return or_(
        q.c.kind < _lit(known[0]),
        *(and_(q.c.kind > _lit(a), q.c.kind < _lit(b)) for a, b in itertools.pairwise(known)),
        q.c.kind > _lit(known[-1]),
    )


def sweep(conn: Connection, tables: QueueTables, max_attempts: int,
          max_age_seconds: float = 0, thorough: bool = True) -> tuple[int, int]:  # fmt: skip
    """Run the sweep; returns (rows failed, rows released). Expired leases are released on every
    call; the unsendable-row statements (unknown kind, too old) run only when `thorough`: before
    they were indexed they read every pending row (1 s and more with a million pending)."""
    give_up, release, *unsendable = sweep_statements(tables, max_attempts, max_age_seconds)
    with conn.begin():
        failed = conn.execute(give_up).rowcount
        released = conn.execute(release).rowcount
        if thorough:
            failed += sum(conn.execute(statement).rowcount for statement in unsendable)
    return failed, released


# --- send side: renew, load, acknowledge -------------------------------------------------------

ROW_COLUMNS = (
    "id", "kind", "user_id", "device_id", "event_type", "event_time", "insert_id",
    "group_type", "group_value", "properties", "extra", "attempts", "created_at",
)  # fmt: skip


def renew_statement(tables: QueueTables, token: str, lease_seconds: float):
    q = tables.queue
    return (
        update(q)
        .where(q.c.claim_token == token, q.c.status == IN_FLIGHT)
        .values(locked_until=utcnow_plus(literal_column(str(float(lease_seconds)))))
    )


def renew(conn: Connection, tables: QueueTables, token: str, lease_seconds: float) -> int:
    """Extend the lease of this claim's rows; 0 means the claim is no longer ours."""
    with conn.begin():
        return conn.execute(renew_statement(tables, token, lease_seconds)).rowcount


def send_time_limit(lease_seconds: float) -> int:
    """How long a send task may run (Celery's soft time limit): inside its lease, with a margin
    for the acknowledgement."""
    return max(1, int(lease_seconds - min(10, lease_seconds // 5)))


def renew_and_load(conn: Connection, tables: QueueTables, token: str,
                   lease_seconds: float) -> list:  # fmt: skip
    """The claim's rows in id order, their lease renewed; [] when the claim is no longer ours.

    The lease is written only when what is left would not cover a send of the longest allowed
    time (the message waited in the broker): every UPDATE writes a new version of each row and
    its index entries, and a renewal nobody needs was a third of the database's writes per row.
    """
    q = tables.queue
    left = literal_column(str(float(send_time_limit(lease_seconds))))
    short = (q.c.locked_until < utcnow_plus(left)).label("short")
    with conn.begin():
        rows = conn.execute(load_statement(tables, token).add_columns(short)).all()
    if rows and rows[0].short:  # one claim, one statement: every row has the same lease
        renew(conn, tables, token, lease_seconds)
    return rows


def count_rerun(conn: Connection, tables: QueueTables, token: str, max_attempts: int) -> int:
    """A send task run again because its worker died mid-send (Celery redelivers its message):
    the lost run was an attempt. Without this a batch that kills its worker every time would
    run forever, renewing its own lease. Rows whose attempts are spent fail; the others count
    one more attempt. Returns the number of rows failed."""
    q = tables.queue
    mine = and_(q.c.claim_token == token, q.c.status == IN_FLIGHT)
    with conn.begin():
        failed = conn.execute(
            update(q).where(mine, q.c.attempts >= max_attempts).values(
                status=FAILED, claim_token=None, locked_until=None,
                last_error=_gave_up(q, f"{max_attempts} attempts: the worker sending the "
                                       "batch died (killed, out of memory or crashed); see the "
                                       "worker log"))
        ).rowcount  # fmt: skip
        conn.execute(update(q).where(mine).values(attempts=q.c.attempts + 1))
    return failed


def defer_out_of_order(conn: Connection, tables: QueueTables, kind: str, token: str) -> set[int]:
    """Give back rows whose earlier same-key row is unfinished in another claim (two claims
    raced past each other); they keep their attempt and go out after that row."""
    if kind not in ORDERED_KINDS:
        return set()
    q = tables.queue
    mine = q.alias("mine")
    blocked = select(mine.c.id).where(
        mine.c.claim_token == token,
        _earlier_of_same_key(q, kind, mine, lambda earlier: (
            earlier.c.status.in_([PENDING, IN_FLIGHT]),
            or_(earlier.c.claim_token.is_(None), earlier.c.claim_token != token),
        )),
    )  # fmt: skip
    with conn.begin():
        ids = list(conn.execute(blocked).scalars())
        for chunk in _chunks(ids):
            conn.execute(
                update(q)
                .where(q.c.claim_token == token, q.c.id.in_(chunk))
                .values(status=PENDING, claim_token=None, locked_until=None,
                        attempts=q.c.attempts - 1)
            )  # fmt: skip
    return set(ids)


def load_statement(tables: QueueTables, token: str):
    q = tables.queue
    return (
        select(*(q.c[name] for name in ROW_COLUMNS))
        .where(q.c.claim_token == token, q.c.status == IN_FLIGHT)
        .order_by(q.c.id)
    )


def load(conn: Connection, tables: QueueTables, token: str) -> list:
    with conn.begin():
        return conn.execute(load_statement(tables, token)).all()


# Failure classes that open every last_error (issue: operators filter and retry by class).
INVALID = "invalid row:"
REJECTED = "rejected by Amplitude:"
GAVE_UP = "gave up after"
RETRYING = "will retry:"
FAILURE_CLASSES = {"invalid": INVALID, "rejected": REJECTED, "gave-up": GAVE_UP}


@dataclass
class Acknowledgement:
    """How each row of a claim ended, applied in one transaction."""

    sent: list[int]
    failed: dict[int, str]
    # (delay seconds, refund attempt, reason) -> ids
    retry: dict[tuple[float, bool, str], list[int]]
    # Set by the sender when `sent` holds every row the claim still has.
    all_sent: bool = False


def ack_statements(tables: QueueTables, token: str, ack: Acknowledgement) -> list:
    """One UPDATE per outcome (ids in chunks), never one per row. Every statement is bounded
    by the claim token, so a late or duplicated send task cannot overwrite a newer claim."""
    q = tables.queue
    mine = and_(q.c.claim_token == token, q.c.status == IN_FLIGHT)
    if ack.all_sent:  # the common case: one statement by claim token, no id list
        return [update(q).where(mine).values(
            status=SENT, sent_at=utcnow(), claim_token=None, locked_until=None,
            last_error=None, next_attempt_at=None)]  # fmt: skip
    statements = [
        update(q).where(mine, q.c.id.in_(chunk)).values(
            status=SENT, sent_at=utcnow(), claim_token=None, locked_until=None,
            last_error=None, next_attempt_at=None)
        for chunk in _chunks(ack.sent)
    ]  # fmt: skip
    for chunk in _chunks(sorted(ack.failed)):
        reasons = case({i: ack.failed[i][:2000] for i in chunk}, value=q.c.id)
        statements.append(update(q).where(mine, q.c.id.in_(chunk)).values(
            status=FAILED, last_error=reasons, claim_token=None, locked_until=None))  # fmt: skip
    for (delay, refund, reason), ids in ack.retry.items():
        statements += [
            update(q).where(mine, q.c.id.in_(chunk)).values(
                status=PENDING, claim_token=None, locked_until=None,
                next_attempt_at=utcnow_plus(literal_column(repr(float(delay)))),
                attempts=q.c.attempts - 1 if refund else q.c.attempts,
                last_error=reason[:2000])
            for chunk in _chunks(sorted(ids))
        ]  # fmt: skip
    return statements


def acknowledge(conn: Connection, tables: QueueTables, token: str, ack: Acknowledgement,
                history: dict | None = None) -> int:  # fmt: skip
    """Write the outcome of a claim, and its run-history row, in one transaction; returns the
    number of rows changed."""
    with conn.begin():
        changed = sum(conn.execute(st).rowcount for st in ack_statements(tables, token, ack))
        if history is not None:
            conn.execute(tables.runs.insert().values(**history))
        return changed


def record_run(conn: Connection, tables: QueueTables, history: dict) -> None:
    with conn.begin():
        conn.execute(tables.runs.insert().values(**history))


def prune(conn: Connection, tables: QueueTables, sent_days: float, history_days: float,
          chunk: int = _IDS_PER_STATEMENT) -> tuple[int, int]:  # fmt: skip
    """Delete `sent` rows and run history older than the given days, a chunk at a time so
    no statement holds many locks (SQL Server escalates past ~5000). 0 days = keep."""
    q, runs = tables.queue, tables.runs
    deleted = [0, 0]
    for n, (table, where, days) in enumerate((
        (q, lambda: and_(q.c.status == SENT, q.c.sent_at < utcnow_plus(-sent_days * 86400)), sent_days),
        (runs, lambda: runs.c.finished_at < utcnow_plus(-history_days * 86400), history_days),
    )):  # fmt: skip
        if not days:
            continue
        while True:
            ids = select(table.c.id).where(where()).order_by(table.c.id).limit(chunk)
            with conn.begin():
                batch = list(conn.execute(ids).scalars())
                if batch:
                    conn.execute(table.delete().where(table.c.id.in_(batch)))
            deleted[n] += len(batch)
            if len(batch) < chunk:
                break
    return deleted[0], deleted[1]


def insert_rows(conn: Connection, tables: QueueTables, rows: Sequence[dict]) -> None:
    """Insert rows that may name different columns (as a user's SQL would write them)."""
    columns = sorted({key for row in rows for key in row})
    conn.execute(tables.queue.insert(), [{c: row.get(c) for c in columns} for row in rows])


# --- operator statements -----------------------------------------------------------------------


def retry_failed(
    conn: Connection,
    tables: QueueTables,
    kind: str | None = None,
    ids: Sequence[int] | None = None,
    failure_class: str | None = "gave-up",
    since: datetime | None = None,
    until: datetime | None = None,
) -> int:
    """Put the selected failed rows back to pending as new: attempts and the first-attempt
    clock (AMPSYNC_MAX_AGE_SECONDS) start again. Returns the number of rows."""
    q = tables.queue
    where = _failed_where(q, kind, failure_class, since, until)
    values = dict(status=PENDING, attempts=0, next_attempt_at=None, claim_token=None,
                  locked_until=None, first_attempt_at=None)  # fmt: skip
    with conn.begin():
        return sum(
            conn.execute(update(q).where(*where, *chunk).values(**values)).rowcount
            for chunk in _id_filters(q, ids)
        )


# Amplitude drops a re-sent insert_id for 7 days only; after that a re-send may count twice.
DEDUP_WINDOW_SECONDS = 7 * 24 * 3600


def failed_first_tried_before(
    conn: Connection,
    tables: QueueTables,
    seconds: float = DEDUP_WINDOW_SECONDS,
    kind: str | None = None,
    ids: Sequence[int] | None = None,
    failure_class: str | None = "gave-up",
    since: datetime | None = None,
    until: datetime | None = None,
) -> int:
    """How many of the failed rows `retry_failed` would select were first tried over `seconds`
    ago (by default outside Amplitude's dedup window)."""
    q = tables.queue
    where = _failed_where(q, kind, failure_class, since, until)
    old = q.c.first_attempt_at < utcnow_plus(literal_column(str(-float(seconds))))
    with conn.begin():
        return sum(
            conn.execute(select(func.count()).where(*where, old, *chunk)).scalar_one()
            for chunk in _id_filters(q, ids)
        )


def _failed_where(q: Table, kind: str | None, failure_class: str | None,
                  since: datetime | None, until: datetime | None) -> list:  # fmt: skip
    where = [q.c.status == FAILED]
    if kind:
        where.append(q.c.kind == _lit(kind))
    if failure_class:
        where.append(q.c.last_error.like(FAILURE_CLASSES[failure_class] + "%"))
    if since:
        where.append(q.c.created_at >= since)
    if until:
        where.append(q.c.created_at < until)
    return where


def _id_filters(q: Table, ids: Sequence[int] | None) -> list[list]:
    """One extra condition list per chunk of ids; no condition when ids is not given."""
    if not ids:
        return [[]]
    return [[q.c.id.in_(chunk)] for chunk in _chunks(list(ids))]


def status_counts(conn: Connection, tables: QueueTables) -> list[tuple[str, str, int]]:
    q = tables.queue
    with conn.begin():
        return [
            (k, s, n)
            for k, s, n in conn.execute(
                select(q.c.kind, q.c.status, func.count())
                .group_by(q.c.kind, q.c.status)
                .order_by(q.c.kind, q.c.status)
            )
        ]


def has_due_rows(conn: Connection, tables: QueueTables, kind: str) -> bool:
    q = tables.queue
    with conn.begin():
        return (
            conn.execute(
                select(q.c.id)
                .where(
                    q.c.kind == _lit(kind),
                    q.c.status == PENDING,
                    or_(q.c.next_attempt_at.is_(None), q.c.next_attempt_at <= utcnow()),
                )
                .limit(1)
            ).first()
            is not None
        )


def _chunks(ids: list[int], size: int = _IDS_PER_STATEMENT) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


__all__ = [
    "Claim", "QueueTables", "define_tables", "make_engine", "init_db", "missing_ddl",
    "compile_ddl", "check_table", "claim", "sweep", "renew", "load", "acknowledge",
    "Acknowledgement", "retry_failed", "status_counts", "SQLAlchemyError",
]  # fmt: skip
