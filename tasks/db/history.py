"""Run history: one row per sync and per batch, written with the acknowledgement, read by
`ampsync status` ("what happened last night" is a query)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Insert, Select, func, select

from . import retry
from .schema import QueueTables
from .sql import lit, varchar

SYNC, BATCH = "sync", "batch"  # the `task` column's values


def record_statement(tables: QueueTables, history: dict[str, Any]) -> Insert:
    # inline: no OUTPUT inserted.id on SQL Server (it fails once the table has a trigger)
    return tables.runs.insert().values(**history).inline()


def record_run(conn: Connection, tables: QueueTables, history: dict[str, Any]) -> None:
    statement = record_statement(tables, history)
    retry.transaction(conn, lambda c: c.execute(statement))


def last_runs_statements(
    tables: QueueTables, limit: int = 5, run_ids: list[str] | None = None
) -> list[Select[Any]]:
    """The latest syncs, then what the batches of the given syncs did. `task` and `run_id`
    are VARCHAR: compared with plain literals (db/sql.py)."""
    r = tables.runs
    syncs = (
        select(r.c.run_id, r.c.started_at, r.c.rows_claimed, r.c.error)
        .where(r.c.task == lit(SYNC), r.c.rows_claimed > 0)
        .order_by(r.c.id.desc())
        .limit(limit)
    )
    batches = (
        select(
            r.c.run_id,
            func.sum(r.c.rows_sent),
            func.sum(r.c.rows_failed),
            func.sum(r.c.rows_retried),
            func.max(r.c.finished_at),
        )
        .where(r.c.task == lit(BATCH), r.c.run_id.in_([varchar(i) for i in run_ids or []]))
        .group_by(r.c.run_id)
    )
    return [syncs, batches]


def last_runs(conn: Connection, tables: QueueTables, limit: int = 5) -> list[dict[str, Any]]:
    """The latest syncs that claimed rows, each with what its batches did."""
    syncs = retry.transaction(
        conn, lambda c: c.execute(last_runs_statements(tables, limit)[0]).all()
    )
    if not syncs:
        return []
    by_run = last_runs_statements(tables, limit, [row.run_id for row in syncs])[1]
    batches = {
        run_id: (sent, failed, retried, finished)
        for run_id, sent, failed, retried, finished in retry.transaction(
            conn, lambda c: c.execute(by_run).all()
        )
    }
    report = []
    for run_id, started, claimed, error in syncs:
        sent, failed, retried, finished = batches.get(run_id, (0, 0, 0, None))
        report.append(
            {
                "run_id": run_id,
                "started_at": started,
                "rows_claimed": claimed,
                "rows_sent": int(sent or 0),
                "rows_failed": int(failed or 0),
                "rows_retried": int(retried or 0),
                "finished_at": finished,
                "error": error,
            }
        )
    return report
