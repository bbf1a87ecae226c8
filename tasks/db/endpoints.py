"""The endpoint-pause table: a row per Amplitude endpoint that failed, shared by every worker
and read by `ampsync status`. When and for how long to pause is `delivery/policy.py`'s; this
module only reads and writes the state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select, update

from .schema import QueueTables
from .sql import utcnow, utcnow_plus


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
    def pause_left_seconds(self) -> float:
        if self.paused_until is None or self.now is None:
            return 0.0
        return max(0.0, (self.paused_until - self.now).total_seconds())


def read(conn: Connection, tables: QueueTables, endpoint: str) -> EndpointState:
    """The endpoint's state; no failures and no pause when it has no row."""
    t = tables.endpoints
    with conn.begin():
        row = conn.execute(
            select(t.c.failures, t.c.reason, t.c.paused_until, utcnow()).where(
                t.c.endpoint == endpoint
            )
        ).first()
    if row is None:  # no statement more on the hot path: a healthy endpoint has no row
        return EndpointState(endpoint, 0, None, None)
    return EndpointState(endpoint, row[0], row[1], row[2], row[3])


def read_all(conn: Connection, tables: QueueTables) -> list[EndpointState]:
    t = tables.endpoints
    with conn.begin():
        rows = conn.execute(
            select(t.c.endpoint, t.c.failures, t.c.reason, t.c.paused_until, utcnow())
        ).all()
    return [EndpointState(*row) for row in rows]


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
    t = tables.endpoints
    with conn.begin():
        row = conn.execute(select(t.c.failures).where(t.c.endpoint == endpoint)).first()
        failures = (row[0] if row else 0) + count
        pause = pause_for(failures)
        values = dict(
            failures=failures,
            reason=reason[:2000],
            updated_at=utcnow(),
            paused_until=utcnow_plus(pause) if pause else None,
        )
        if row:
            conn.execute(update(t).where(t.c.endpoint == endpoint).values(**values))
        else:
            conn.execute(t.insert().values(endpoint=endpoint, **values))
    return pause


def clear_failures(conn: Connection, tables: QueueTables, endpoint: str) -> None:
    t = tables.endpoints
    with conn.begin():
        conn.execute(
            update(t)
            .where(t.c.endpoint == endpoint, t.c.failures > 0)
            .values(failures=0, paused_until=None, reason=None, updated_at=utcnow())
        )
