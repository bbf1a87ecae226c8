"""What `ampsync metrics` reads at each scrape besides the status report's counts: the oldest
pending row of each kind, and the batches that finished since a time (their rows sent, failed
and retried and Amplitude's answers, from the run history). Both read indexed ranges only:
pending rows through the claim index, batches through `ix_<queue>_runs_finished`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, func, select

from . import retry
from .history import BATCH
from .schema import QueueTables
from .sql import PENDING, lit, utcnow


@dataclass(frozen=True)
class FinishedBatch:
    id: int
    kind: str
    finished_at: datetime
    rows_sent: int
    rows_failed: int
    rows_retried: int
    answers: str | None  # JSON {HTTP status: requests}, as tasks/delivery/send.py writes it


def oldest_pending_statement(tables: QueueTables) -> Select[Any]:
    q = tables.queue
    return (
        select(q.c.kind, func.min(q.c.created_at))
        .where(q.c.status == PENDING)
        .group_by(q.c.kind)
        .order_by(q.c.kind)
    )


def oldest_pending(conn: Connection, tables: QueueTables) -> tuple[datetime, dict[str, datetime]]:
    """The database's time and the creation time of each kind's oldest pending row."""
    statement = oldest_pending_statement(tables)

    def run(c: Connection) -> tuple[datetime, dict[str, datetime]]:
        now: datetime = c.execute(select(utcnow())).scalar_one()
        return now, {kind: oldest for kind, oldest in c.execute(statement)}

    return retry.transaction(conn, run)


def finished_batches_statement(tables: QueueTables, since: datetime) -> Select[Any]:
    r = tables.runs
    return (
        select(
            r.c.id,
            r.c.kind,
            r.c.finished_at,
            r.c.rows_sent,
            r.c.rows_failed,
            r.c.rows_retried,
            r.c.answers,
        )
        .where(r.c.finished_at >= since, r.c.task == lit(BATCH))
        .order_by(r.c.id)
    )


def finished_batches(
    conn: Connection, tables: QueueTables, since: datetime
) -> tuple[datetime, list[FinishedBatch]]:
    """The database's time and every batch whose history row says it finished at `since` or
    later. `finished_at` is stamped inside the acknowledgement's transaction, so a batch can
    become visible a little after that time: callers read with an overlap."""
    statement = finished_batches_statement(tables, since)

    def run(c: Connection) -> tuple[datetime, list[FinishedBatch]]:
        now: datetime = c.execute(select(utcnow())).scalar_one()
        return now, [FinishedBatch(*row) for row in c.execute(statement)]

    return retry.transaction(conn, run)
