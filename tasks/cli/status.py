"""`ampsync status`: what the queue table and the endpoints say, for people and scripts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from ..db import endpoints, history, reports
from ..db.schema import QueueTables
from ..settings import Settings, mask_url

# Amplitude drops property updates of a user updated over 1,800 times an hour
# (docs/amplitude.md): `status` names users past this share of it.
UPDATE_LIMIT_PER_HOUR = 1800
NEAR_UPDATE_LIMIT = UPDATE_LIMIT_PER_HOUR * 3 // 4


def collect(s: Settings, tables: QueueTables, engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = reports.row_counts(conn, tables)
        pending = reports.pending_overview(conn, tables)
        failures = reports.failures(conn, tables)
        states = endpoints.read_all(conn, tables)
        runs = history.last_runs(conn, tables, limit=5)
        busy = reports.busy_users(conn, tables, NEAR_UPDATE_LIMIT)
    oldest = pending["oldest_pending"]
    return {
        "database": mask_url(s.database_url),
        "queue_table": s.queue_table,
        "broker": mask_url(s.celery_broker_url)
        if s.celery_broker_url
        else "embedded (ampsync run)",
        "amplitude": s.server_url,
        "rows": rows,
        "oldest_pending_seconds": (pending["now"] - oldest).total_seconds() if oldest else None,
        "waiting_on_backoff": pending["waiting_on_backoff"],
        "endpoints": [
            {
                "endpoint": e.endpoint,
                "paused": e.paused,
                "paused_until": e.paused_until,
                "failures": e.failures,
                "reason": e.reason,
            }
            for e in states
        ],
        "last_runs": runs,
        "users_near_update_limit": [{"user_id": u, "updates_last_hour": n} for u, n in busy],
        "common_errors": [{"error": err, "rows": n} for err, n in failures["common"]],
        "recent_failures": [
            {"id": i, "kind": k, "user_id": u, "error": err} for i, k, u, err in failures["recent"]
        ],
    }


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
        lines.append(
            f"PAUSED {e['endpoint']} until {e['paused_until']:%Y-%m-%d %H:%M:%S} UTC: {e['reason']}"
        )
    if not paused:
        lines.append("endpoints: none paused")
    if report.get("last_runs"):
        lines += ["", "last runs (claimed / sent / failed / retried):"]
        lines += [
            f"  {r['started_at']:%Y-%m-%d %H:%M:%S} {r['run_id']}  {r['rows_claimed']:>7} "
            f"{r['rows_sent']:>7} {r['rows_failed']:>7} {r['rows_retried']:>7}"
            for r in report["last_runs"]
        ]
    if report.get("users_near_update_limit"):
        lines += [
            "",
            f"users near Amplitude's {UPDATE_LIMIT_PER_HOUR} updates an hour (identify rows sent in the last hour):",
        ]
        lines += [
            f"  {u['updates_last_hour']:>6} {u['user_id']}"
            for u in report["users_near_update_limit"]
        ]
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
