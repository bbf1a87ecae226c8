"""`ampsync status`: what the queue table and the endpoints say, for people and scripts."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import func, select

from . import queue
from .settings import Settings, mask_url


def collect(s: Settings, tables: queue.QueueTables, engine) -> dict:
    q, e = tables.queue, tables.endpoints
    now = queue.utcnow()
    with engine.connect() as conn, conn.begin():
        counts = conn.execute(
            select(q.c.kind, q.c.status, func.count()).group_by(q.c.kind, q.c.status)
        ).all()
        db_now, oldest = conn.execute(
            select(now, func.min(q.c.created_at)).where(q.c.status == queue.PENDING)
        ).one()
        backoff = conn.execute(
            select(func.count()).where(q.c.status == queue.PENDING, q.c.next_attempt_at > now)
        ).scalar_one()
        errors = conn.execute(
            select(q.c.last_error, func.count().label("n"))
            .where(q.c.status == queue.FAILED)
            .group_by(q.c.last_error)
            .order_by(func.count().desc())
            .limit(10)
        ).all()
        recent = conn.execute(
            select(q.c.id, q.c.kind, q.c.user_id, q.c.last_error)
            .where(q.c.status == queue.FAILED)
            .order_by(q.c.id.desc())
            .limit(5)
        ).all()
        endpoints = conn.execute(
            select(e.c.endpoint, e.c.paused_until, e.c.failures, e.c.reason)
        ).all()
        runs = last_runs(conn, tables, limit=5)
    by_kind: dict[str, dict[str, int]] = defaultdict(dict)
    for kind, status, n in counts:
        by_kind[kind][status] = n
    return {
        "database": mask_url(s.database_url),
        "queue_table": s.queue_table,
        "broker": mask_url(s.celery_broker_url) if s.celery_broker_url else "embedded (ampsync run)",
        "amplitude": s.server_url,
        "rows": dict(by_kind),
        "oldest_pending_seconds": (db_now - oldest).total_seconds() if oldest else None,
        "waiting_on_backoff": backoff,
        "endpoints": [
            {"endpoint": name, "paused": bool(until and until > db_now),
             "paused_until": until, "failures": failures, "reason": reason}
            for name, until, failures, reason in endpoints
        ],  # fmt: skip
        "last_runs": runs,
        "common_errors": [{"error": err, "rows": n} for err, n in errors],
        "recent_failures": [
            {"id": i, "kind": k, "user_id": u, "error": err} for i, k, u, err in recent
        ],
    }


def last_runs(conn, tables: queue.QueueTables, limit: int = 5) -> list[dict]:
    """The latest syncs, each with what its batches did (run history)."""
    r = tables.runs
    syncs = conn.execute(
        select(r.c.run_id, r.c.started_at, r.c.rows_claimed, r.c.error)
        .where(r.c.task == "sync", r.c.rows_claimed > 0)
        .order_by(r.c.id.desc())
        .limit(limit)
    ).all()
    if not syncs:
        return []
    batches = {
        run_id: (sent, failed, retried, finished)
        for run_id, sent, failed, retried, finished in conn.execute(
            select(r.c.run_id, func.sum(r.c.rows_sent), func.sum(r.c.rows_failed),
                   func.sum(r.c.rows_retried), func.max(r.c.finished_at))
            .where(r.c.task == "batch", r.c.run_id.in_([row.run_id for row in syncs]))
            .group_by(r.c.run_id)
        )
    }  # fmt: skip
    report = []
    for run_id, started, claimed, error in syncs:
        sent, failed, retried, finished = batches.get(run_id, (0, 0, 0, None))
        report.append({"run_id": run_id, "started_at": started, "rows_claimed": claimed,
                       "rows_sent": int(sent or 0), "rows_failed": int(failed or 0),
                       "rows_retried": int(retried or 0), "finished_at": finished,
                       "error": error})  # fmt: skip
    return report


def render(report: dict) -> str:
    lines = [
        f"database   {report['database']}  table {report['queue_table']}",
        f"broker     {report['broker']}",
        f"amplitude  {report['amplitude']}",
        "",
        f"{'kind':<16}{'pending':>10}{'in_flight':>11}{'sent':>10}{'failed':>9}",
    ]
    for kind, statuses in sorted(report["rows"].items()):
        lines.append(
            f"{kind:<16}{statuses.get('pending', 0):>10}{statuses.get('in_flight', 0):>11}"
            f"{statuses.get('sent', 0):>10}{statuses.get('failed', 0):>9}"
        )
    if not report["rows"]:
        lines.append("(the queue table is empty)")
    age = report["oldest_pending_seconds"]
    lines += [
        "",
        f"oldest pending row: {_age(age) if age is not None else 'none'}",
        f"rows waiting on backoff: {report['waiting_on_backoff']}",
    ]
    paused = [e for e in report["endpoints"] if e["paused"]]
    for e in paused:
        lines.append(f"PAUSED {e['endpoint']} until {e['paused_until']:%Y-%m-%d %H:%M:%S} UTC: "
                     f"{e['reason']}")  # fmt: skip
    if not paused:
        lines.append("endpoints: none paused")
    if report.get("last_runs"):
        lines += ["", "last runs (claimed / sent / failed / retried):"]
        lines += [f"  {r['started_at']:%Y-%m-%d %H:%M:%S} {r['run_id']}  {r['rows_claimed']:>7} "
                  f"{r['rows_sent']:>7} {r['rows_failed']:>7} {r['rows_retried']:>7}"
                  for r in report["last_runs"]]  # fmt: skip
    if report["common_errors"]:
        lines += ["", "most common errors of failed rows:"]
        lines += [f"  {e['rows']:>6} × {e['error']}" for e in report["common_errors"]]
    return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
