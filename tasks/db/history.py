"""Run history: one row per sync and per batch, written with the acknowledgement, read by
`ampsync status` ("what happened last night" is a query)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, select

from .schema import QueueTables

SYNC, BATCH = "sync", "batch"  # the `task` column's values


def record_run(conn: Connection, tables: QueueTables, history: dict[str, Any]) -> None:
    with conn.begin():
        conn.execute(tables.runs.insert().values(**history))


def last_runs(conn: Connection, tables: QueueTables, limit: int = 5) -> list[dict[str, Any]]:
    """The latest syncs that claimed rows, each with what its batches did."""
    r = tables.runs
    syncs = conn.execute(
        select(r.c.run_id, r.c.started_at, r.c.rows_claimed, r.c.error)
        .where(r.c.task == SYNC, r.c.rows_claimed > 0)
        .order_by(r.c.id.desc())
        .limit(limit)
    ).all()
    if not syncs:
        return []
    batches = {
        run_id: (sent, failed, retried, finished)
        for run_id, sent, failed, retried, finished in conn.execute(
            select(
                r.c.run_id,
                func.sum(r.c.rows_sent),
                func.sum(r.c.rows_failed),
                func.sum(r.c.rows_retried),
                func.max(r.c.finished_at),
            )
            .where(r.c.task == BATCH, r.c.run_id.in_([row.run_id for row in syncs]))
            .group_by(r.c.run_id)
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
