"""The endpoint-pause table: a row per Amplitude endpoint that failed, shared by every worker
and read by `ampsync status`. When and for how long to pause is `delivery/policy.py`'s; this
module only reads and writes the state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, Update, select, update
from sqlalchemy.exc import IntegrityError

from . import retry
from .schema import QueueTables
from .sql import utcnow, utcnow_plus, varchar


@dataclass(frozen=True)
class EndpointState:
    endpoint: str
    failures: int
    reason: str | None
    paused_until: datetime | None
    now: datetime | None = None  # the database's time when read; None with no row

    @property
    def paused(self) -> bool:
        return (
            self.paused_until is not None and self.now is not None and self.paused_until > self.now
        )

    @property
    def probe_due(self) -> bool:
        """A pause ended and nothing went through since: one request probes before everyone
        resumes (a success clears `paused_until`)."""
        return (
            self.paused_until is not None and self.now is not None and self.paused_until <= self.now
        )

    @property
    def pause_left_seconds(self) -> float:
        if self.paused_until is None or self.now is None:
            return 0.0
        return max(0.0, (self.paused_until - self.now).total_seconds())


def read_statement(tables: QueueTables, endpoint: str) -> Select[Any]:
    t = tables.endpoints
    # `endpoint` is VARCHAR: compared with a plain literal, never pymssql's N'…'
    return select(t.c.failures, t.c.reason, t.c.paused_until, utcnow()).where(
        t.c.endpoint == varchar(endpoint)
    )


def read(conn: Connection, tables: QueueTables, endpoint: str) -> EndpointState:
    """The endpoint's state; no failures and no pause when it has no row."""
    statement = read_statement(tables, endpoint)
    row = retry.transaction(conn, lambda c: c.execute(statement).first())
    if row is None:  # no statement more on the hot path: a healthy endpoint has no row
        return EndpointState(endpoint, 0, None, None)
    return EndpointState(endpoint, row[0], row[1], row[2], row[3])


def read_all_statement(tables: QueueTables) -> Select[Any]:
    t = tables.endpoints
    return select(t.c.endpoint, t.c.failures, t.c.reason, t.c.paused_until, utcnow())


def read_all(conn: Connection, tables: QueueTables) -> list[EndpointState]:
    statement = read_all_statement(tables)
    rows = retry.transaction(conn, lambda c: c.execute(statement).all())
    return [EndpointState(*row) for row in rows]


def failure_statements(
    tables: QueueTables, endpoint: str, failures: int, reason: str, pause: float, exists: bool
) -> list[Any]:
    """The tally's read, then its write: an UPDATE of the endpoint's row, or its INSERT."""
    t = tables.endpoints
    values = dict(
        failures=failures,
        reason=reason[:2000],
        updated_at=utcnow(),
        paused_until=utcnow_plus(pause) if pause else None,
    )
    key = t.c.endpoint == varchar(endpoint)
    write = (
        update(t).where(key).values(**values)
        if exists
        else t.insert().values(endpoint=endpoint, **values)
    )
    return [select(t.c.failures).where(key), write]


def record_failure(
    conn: Connection,
    tables: QueueTables,
    endpoint: str,
    count: int,
    reason: str,
    pause_for: Callable[[int], float],
) -> float:
    """Add `count` failures to the endpoint's tally and pause it for `pause_for(failures)`
    seconds (0: not paused), in one transaction; returns that pause."""

    def run(c: Connection) -> float:
        read_tally = failure_statements(tables, endpoint, 0, reason, 0, False)[0]
        row = c.execute(read_tally).first()
        failures = (row[0] if row else 0) + count
        pause = pause_for(failures)
        write = failure_statements(tables, endpoint, failures, reason, pause, row is not None)[1]
        c.execute(write)
        return pause

    try:
        return retry.transaction(conn, run)
    except IntegrityError:
        # Two workers' first failures raced to insert the endpoint's row: the other one's is
        # there now, so the tally is read and updated. Raised, it would crash the send and
        # strand its rows in flight until their lease expired.
        return retry.transaction(conn, run)


def clear_statement(tables: QueueTables, endpoint: str) -> Update:
    t = tables.endpoints
    return (
        update(t)
        .where(t.c.endpoint == varchar(endpoint), t.c.failures > 0)
        .values(failures=0, paused_until=None, reason=None, updated_at=utcnow())
    )


def clear_failures(conn: Connection, tables: QueueTables, endpoint: str) -> None:
    statement = clear_statement(tables, endpoint)
    retry.transaction(conn, lambda c: c.execute(statement))
