"""What operators read of the queue table: rows by kind and status (counted here only), the
oldest pending row, rows on backoff, the commonest errors of failed rows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, case, func, select

from ..outcomes import FAILURE_CLASSES, Kind
from . import retry
from .queue import _failed_where, _id_filters
from .schema import QueueTables
from .sql import FAILED, PENDING, SENT, lit, utcnow, utcnow_plus


def row_counts(
    conn: Connection, tables: QueueTables, kind: str | None = None, max_id: int | None = None
) -> dict[str, dict[str, int]]:
    """{kind: {status: rows}}, for one kind and rows up to an id when given."""
    q = tables.queue
    statement = select(q.c.kind, q.c.status, func.count()).group_by(q.c.kind, q.c.status)
    if kind:
        statement = statement.where(q.c.kind == lit(kind))
    if max_id is not None:
        statement = statement.where(q.c.id <= max_id)
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    with conn.begin():
        for k, status, n in conn.execute(statement.order_by(q.c.kind, q.c.status)):
            counts[k][status] = n
    return dict(counts)


def by_status(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """`row_counts` summed over kinds: {status: rows}."""
    totals: dict[str, int] = {}
    for statuses in counts.values():
        for status, n in statuses.items():
            totals[status] = totals.get(status, 0) + n
    return totals


def max_id(conn: Connection, tables: QueueTables, kind: str | None = None) -> int:
    """The highest id in the table (of one kind), 0 when empty."""
    q = tables.queue
    statement = select(func.max(q.c.id))
    if kind:
        statement = statement.where(q.c.kind == lit(kind))
    with conn.begin():
        return int(conn.execute(statement).scalar() or 0)


def pending_overview(conn: Connection, tables: QueueTables) -> dict[str, Any]:
    """The database's time, the oldest pending row's creation time and the rows on backoff."""
    q = tables.queue
    now = utcnow()
    with conn.begin():
        db_now, oldest = conn.execute(
            select(now, func.min(q.c.created_at)).where(q.c.status == PENDING)
        ).one()
        backoff = conn.execute(
            select(func.count()).where(q.c.status == PENDING, q.c.next_attempt_at > now)
        ).scalar_one()
    return {"now": db_now, "oldest_pending": oldest, "waiting_on_backoff": backoff}


def failures(
    conn: Connection, tables: QueueTables, common: int = 10, recent: int = 5
) -> dict[str, list[Any]]:
    """The commonest errors of failed rows with their counts, and the latest failed rows."""
    q = tables.queue
    with conn.begin():
        errors = conn.execute(
            select(q.c.last_error, func.count().label("n"))
            .where(q.c.status == FAILED)
            .group_by(q.c.last_error)
            .order_by(func.count().desc())
            .limit(common)
        ).all()
        latest = conn.execute(
            select(q.c.id, q.c.kind, q.c.user_id, q.c.last_error)
            .where(q.c.status == FAILED)
            .order_by(q.c.id.desc())
            .limit(recent)
        ).all()
    return {"common": [tuple(r) for r in errors], "recent": [tuple(r) for r in latest]}


def busy_users(
    conn: Connection, tables: QueueTables, at_least: int, limit: int = 10
) -> list[tuple[str, int]]:
    """Users with at least `at_least` identify rows sent in the last hour, busiest first:
    Amplitude drops updates past 1,800 an hour (docs/amplitude.md). Reads the last hour's
    sent rows without an index on `sent_at`: a status query, not a worker's."""
    q = tables.queue
    n = func.count().label("n")
    statement = (
        select(q.c.user_id, n)
        .where(
            q.c.kind == lit(Kind.IDENTIFY),
            q.c.status == SENT,
            q.c.user_id.is_not(None),
            q.c.sent_at > utcnow_plus(-3600),
        )
        .group_by(q.c.user_id)
        .having(func.count() >= at_least)
        .order_by(n.desc())
        .limit(limit)
    )
    with conn.begin():
        return [(user, int(count)) for user, count in conn.execute(statement)]


def failed_rows(conn: Connection, tables: QueueTables) -> list[tuple[int, str]]:
    """(id, last_error) of every failed row (the demo's few)."""
    q = tables.queue
    with conn.begin():
        return [
            tuple(r)
            for r in conn.execute(
                select(q.c.id, q.c.last_error).where(q.c.status == FAILED).order_by(q.c.id)
            )
        ]


def db_now(conn: Connection) -> datetime:
    """The database's current UTC time."""
    with conn.begin():
        return conn.execute(select(utcnow())).scalar_one()


def failed_by_class_statements(
    tables: QueueTables,
    kind: str | None = None,
    ids: Sequence[int] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Select[Any]]:
    """Failed rows of `retry-failed`'s selection (any class): all of them, then each class's
    (the prefix of `last_error`, tasks/outcomes.py), one statement per chunk of ids."""
    q = tables.queue
    where = _failed_where(q, kind, None, since, until)
    per_class = [
        func.sum(case((q.c.last_error.like(prefix + "%"), 1), else_=0))
        for prefix in FAILURE_CLASSES.values()
    ]
    columns: list[Any] = [func.count(), *per_class]
    return [select(*columns).where(*where, *chunk) for chunk in _id_filters(q, ids)]


def failed_by_class(
    conn: Connection,
    tables: QueueTables,
    kind: str | None = None,
    ids: Sequence[int] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, int]:
    """{failure class: failed rows} of the selection, classes without rows left out; rows
    whose error opens with no known class count as `other`."""
    statements = failed_by_class_statements(tables, kind, ids, since, until)
    totals = [0] * (len(FAILURE_CLASSES) + 1)
    for row in retry.transaction(conn, lambda c: [c.execute(st).one() for st in statements]):
        totals = [t + int(n or 0) for t, n in zip(totals, row, strict=True)]
    counts = dict(zip(FAILURE_CLASSES, totals[1:], strict=True))
    counts["other"] = totals[0] - sum(totals[1:])
    return {name: n for name, n in counts.items() if n}
