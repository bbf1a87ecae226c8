"""Every table ampsync reads or writes, defined once: the user's queue table, ampsync's own
tables named after it (endpoint pauses, run history, feed cursors and state), their columns'
types per database, and their indexes. `init-db` creates what is missing of these
(`db/setup.py`); docs/architecture.md says how to add a column or a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Unicode,
    UnicodeText,
    and_,
    text,
)
from sqlalchemy.dialects import mssql, mysql
from sqlalchemy.sql.expression import ColumnElement

from .sql import IN_FLIGHT, PENDING, SENT, Id, lit, utcnow

# BIGINT (INTEGER on SQLite, which autoincrements only INTEGER keys); values compared with it
# are written CAST(… AS BIGINT) on SQL Server (db/sql.py, `Id`).
_ID = Id()
TIME = (
    DateTime()
    .with_variant(mssql.DATETIME2(), "mssql")
    .with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
)
# A feed's entity (a user id, a device, a group value): case matters (db/feeds.py).
ENTITY = (
    Unicode(300)
    .with_variant(mssql.NVARCHAR(300, collation="Latin1_General_BIN2"), "mssql")
    .with_variant(
        mysql.VARCHAR(300, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )
)
# NVARCHAR(MAX) on SQL Server (UnicodeText would give the deprecated NTEXT).
JSON_TEXT = (
    UnicodeText()
    .with_variant(mssql.NVARCHAR(), "mssql")
    .with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
)


@dataclass(frozen=True)
class QueueTables:
    """The queue table and ampsync's own tables beside it, named after it."""

    metadata: MetaData
    queue: Table
    endpoints: Table
    runs: Table
    feeds: Table
    feed_state: Table

    @property
    def own_columns(self) -> list[str]:
        return [c.name for c in self.queue.columns if c.info.get("owner") == "ampsync"]


def _partial(index: Index, where: ColumnElement[bool]) -> Index:
    index.dialect_options["postgresql"]["where"] = where
    index.dialect_options["sqlite"]["where"] = where
    return index


def _own(column: Column[Any]) -> Column[Any]:
    column.info["owner"] = "ampsync"
    return column


def define_tables(table_name: str) -> QueueTables:
    prefix, _, name = table_name.rpartition(".")
    schema = prefix or None
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
        Column("event_time", TIME),
        Column("insert_id", Unicode(255)),
        Column("group_type", Unicode(255)),
        Column("group_value", Unicode(255)),
        Column("properties", JSON_TEXT),
        Column("extra", JSON_TEXT),
        # written by ampsync
        Column("status", String(16), nullable=False, server_default="pending"),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("next_attempt_at", TIME),
        Column("locked_until", TIME),
        Column("last_error", Unicode(2000)),
        Column("created_at", TIME, nullable=False, server_default=utcnow()),
        Column("sent_at", TIME),
        # ampsync's own additions (init-db adds them to an existing table)
        _own(Column("claim_token", String(32))),
        _own(Column("first_attempt_at", TIME)),
    )
    # Indexes are partial where the database allows (PostgreSQL, SQLite): every claim, renewal
    # and acknowledgement changes `status`, so each update writes every index the row is in; a
    # row outside an index's predicate costs it nothing. Not on SQL Server: filtered indexes
    # make every writer (the user's SQL too) need QUOTED_IDENTIFIER ON.
    # Claim: equality on kind and status, then id order. Sent rows are left out (elsewhere they
    # sit in their own part of the index), so history does not slow the claim down and an
    # acknowledgement writes no entry here: with the key indexes below also left to unfinished
    # rows, acknowledging an identify row costs the database far less CPU (bench/README.md,
    # finding 9).
    _partial(Index(f"ix_{name}_claim", q.c.kind, q.c.status, q.c.id), q.c.status != SENT)
    _partial(Index(f"ix_{name}_lease", q.c.status, q.c.locked_until), q.c.status == IN_FLIGHT)
    _partial(Index(f"ix_{name}_claim_token", q.c.claim_token), q.c.claim_token.is_not(None))
    # The maximum-age sweep: only retried rows are in it on PostgreSQL/SQLite (without it every
    # full sweep read the whole table, bench/README.md, finding 4).
    _partial(
        Index(f"ix_{name}_age", q.c.first_attempt_at),
        and_(q.c.status == PENDING, q.c.first_attempt_at.is_not(None)),
    )
    # Per-key order of identify / group_identify rows: only unfinished rows can hold a later
    # one back. The key leads: PostgreSQL leaves a column its partial predicate fixes out of
    # the index condition, so a leading `kind` turned each lookup into a scan of the whole
    # index (commit 77e34d0).
    # On SQL Server these hold every row of the key (no filtered indexes there): they INCLUDE
    # what the per-key probe reads, so it never looks the rows up (docs/sqlserver.md).
    unfinished = q.c.status.in_([PENDING, IN_FLIGHT])
    probe: dict[str, Any] = {"mssql_include": ["status", "next_attempt_at"]}
    _partial(
        Index(f"ix_{name}_user", q.c.user_id, q.c.kind, q.c.id, **probe),
        and_(q.c.kind == lit("identify"), unfinished),
    )
    _partial(
        Index(f"ix_{name}_device", q.c.device_id, q.c.kind, q.c.id, **probe),
        and_(q.c.kind == lit("identify"), q.c.user_id.is_(None), unfinished),
    )
    _partial(
        Index(f"ix_{name}_group", q.c.group_type, q.c.group_value, q.c.kind, q.c.id, **probe),
        and_(q.c.kind == lit("group_identify"), unfinished),
    )

    endpoints = Table(
        f"{name}_endpoints",
        md,
        Column("endpoint", String(32), primary_key=True),
        Column("paused_until", TIME),
        Column("failures", Integer, nullable=False, server_default=text("0")),
        Column("reason", Unicode(2000)),
        Column("updated_at", TIME, nullable=False, server_default=utcnow()),
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
        Column("started_at", TIME, nullable=False),
        Column("finished_at", TIME, nullable=False, server_default=utcnow()),
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
    feeds, feed_state = _define_feed_tables(md, name)
    return QueueTables(md, q, endpoints, runs, feeds, feed_state)


def _define_feed_tables(md: MetaData, queue_name: str) -> tuple[Table, Table]:
    """Add the feed tables, named after the queue table, to the queue's MetaData, so
    `ampsync init-db` creates them and `--print-sql` shows them."""
    feeds = Table(
        f"{queue_name}_feeds",
        md,
        Column("feed", Unicode(100), primary_key=True),
        # Bumped by every run that enqueues: two runs of a feed never both commit.
        Column("version", Integer, nullable=False, server_default="0"),
        Column("cursor_value", Unicode(255)),  # event feeds: JSON
        Column("seen", JSON_TEXT),  # event feeds, overlap mode: insert_ids in the window
        Column("last_run_at", TIME),
        Column("last_result", JSON_TEXT),
        Column("last_error", Unicode(2000)),
    )
    state = Table(
        f"{queue_name}_feed_state",
        md,
        Column("feed", Unicode(100), primary_key=True),
        # user id, "@device:" + device id, or group value; 300 keeps the key within SQL
        # Server's 900-byte index limit. Compared in a binary collation: Amplitude tells
        # "Alice" from "alice", a case-insensitive default collation would not.
        Column("entity", ENTITY, primary_key=True),
        Column("accepted", JSON_TEXT),  # properties Amplitude accepted: {name: value|null}
        Column("pending", JSON_TEXT),  # enqueued, not yet confirmed: {queue id: {name: value}}
        Column("updated_at", TIME, nullable=False, server_default=utcnow()),
    )
    return feeds, state
