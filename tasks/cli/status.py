"""`ampsync status`: what the queue table and the endpoints say, for people and scripts."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any, TextIO

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from .. import broker
from ..db import endpoints, history, reports
from ..db import engine as db_engine
from ..db.schema import QueueTables
from ..settings import Settings, SettingsError, mask_url
from ..worker import presence
from .manual import require_table

# Amplitude drops property updates of a user updated over 1,800 times an hour
# (docs/amplitude.md): `status` names users past this share of it.
UPDATE_LIMIT_PER_HOUR = 1800
NEAR_UPDATE_LIMIT = UPDATE_LIMIT_PER_HOUR * 3 // 4


# Beat dispatches a sync every AMPSYNC_SYNC_INTERVAL: a last tick older than this many
# intervals (plus a margin for a busy machine) means beat is not running.
BEAT_LATE_INTERVALS = 2
BEAT_LATE_MARGIN_SECONDS = 15.0


def command(
    s: Settings,
    tables: QueueTables,
    engine: Engine,
    as_json: bool = False,
    out: TextIO | None = None,
) -> int:
    """`ampsync status [--json]`: one line and exit 2 when the queue table is missing or the
    database unreachable; otherwise the report."""
    require_table(s, tables, engine)
    try:
        report = collect(s, tables, engine)
    except SQLAlchemyError as exc:
        raise SettingsError(
            "AMPSYNC_DATABASE_URL: " + db_engine.describe_db_error(exc, s.database_url)
        ) from None
    text = json.dumps(report, indent=2, default=_json_default) if as_json else render(report)
    print(text, file=out or sys.stdout)
    return 0


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat() + "Z"
    return str(value)


def liveness(s: Settings) -> dict[str, Any]:
    """Live workers, beat's last tick and the last sync, from the broker's Redis
    (tasks/worker/presence.py); `broker_error` says why they are unknown."""
    report: dict[str, Any] = {"workers": [], "beat": None, "last_sync": None, "broker_error": None}
    client = broker.redis_client(s.celery_broker_url)
    if client is None:
        report["broker_error"] = broker.NO_BROKER
        return report
    try:
        workers = presence.live_workers(client)
        beat = presence.beat_state(client)
        last = presence.last_sync(client)
    except redis.RedisError as exc:
        report["broker_error"] = (
            f"cannot reach Redis at {mask_url(s.celery_broker_url or '')}: {exc}"
        )
        return report
    finally:
        client.close()
    report["workers"] = [
        {
            "name": w.name,
            "queues": list(w.queues),
            "concurrency": w.concurrency,
            "pid": w.pid,
            "last_heartbeat_seconds_ago": round(w.heartbeat_age, 1),
        }
        for w in workers
    ]
    if beat is not None:
        late_after = BEAT_LATE_INTERVALS * s.sync_interval + BEAT_LATE_MARGIN_SECONDS
        report["beat"] = {
            "last_tick_seconds_ago": round(beat["age"], 1),
            "last_entry": beat.get("entry"),
            "host": beat.get("host"),
            "pid": beat.get("pid"),
            "late": beat["age"] > late_after,
        }
    if last is not None:
        report["last_sync"] = {
            "seconds_ago": round(last["age"], 1),
            "run_id": last.get("run_id"),
            "rows_claimed": last.get("rows_claimed"),
            "batches_enqueued": last.get("batches_enqueued"),
        }
    return report


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
        "amplitude": mask_url(s.server_url),
        **liveness(s),
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
        *render_liveness(report),
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


def render_liveness(report: dict) -> list[str]:
    """The workers, beat and last-sync lines of the text report."""
    if report.get("broker_error"):
        return [f"workers    unknown: {report['broker_error']}"]
    workers = report["workers"]
    lines = [
        f"workers    {len(workers)} live"
        if workers
        else f"workers    NONE: no heartbeat in the last {presence.WORKER_TTL_SECONDS} s; start "
        "one with `ampsync run` or `celery -A tasks worker`"
    ]
    for w in workers:
        processes = f", {w['concurrency']} processes" if w["concurrency"] else ""
        lines.append(
            f"  {w['name']}  heartbeat {_age(w['last_heartbeat_seconds_ago'])} ago  "
            f"queues {', '.join(w['queues'])}{processes}"
        )
    beat = report["beat"]
    if beat is None:
        lines.append("beat       never ticked on this broker")
    else:
        late = " — LATE: is beat running?" if beat["late"] else ""
        lines.append(
            f"beat       last tick {_age(beat['last_tick_seconds_ago'])} ago "
            f"({beat['last_entry']} from {beat['host']} pid {beat['pid']}){late}"
        )
    last = report["last_sync"]
    lines.append(
        "last sync  none yet"
        if last is None
        else f"last sync  {_age(last['seconds_ago'])} ago: run {last['run_id']}, "
        f"{last['rows_claimed']} rows claimed in {last['batches_enqueued']} batches"
    )
    return lines


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
