"""The seed article's delivery loop, as the benchmark's baseline.

"Request a record to send → send it → mark in the queue that it was sent" (the
hand-edited script teams run today, bench/README.md): select one pending row, send it in its own request — an identify row to the
form Identify API, an event row to HTTP V2 — mark it sent and commit, repeat. Like the article
it marks the row sent whatever the answer; unlike it, it reuses one keep-alive HTTP session and
finds the next row through ampsync's claim index, both in the baseline's favour.
"""

from __future__ import annotations

import calendar
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import requests
from sqlalchemy import text


@dataclass
class BaselineResult:
    rows: int
    seconds: float
    requests: int
    not_ok: int  # answers other than 2xx (the loop marks those rows sent all the same)
    drained: bool

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def run(
    engine, table_name: str, base_url: str, api_key: str, budget_seconds: float
) -> BaselineResult:
    """Drain `table_name` row by row until it is empty or `budget_seconds` have passed."""
    pick = text(
        f"SELECT id, kind, user_id, event_type, event_time, properties FROM {table_name} "
        "WHERE status = 'pending' ORDER BY id LIMIT 1"
    )
    mark = text(f"UPDATE {table_name} SET status = 'sent', sent_at = :now WHERE id = :id")
    session = requests.Session()
    rows = not_ok = 0
    drained = False
    started = time.perf_counter()
    deadline = started + budget_seconds
    with engine.connect() as conn:
        while time.perf_counter() < deadline:
            row = conn.execute(pick).first()
            conn.commit()
            if row is None:
                drained = True
                break
            answer = _send(session, base_url, api_key, row)
            not_ok += not 200 <= answer.status_code < 300
            conn.execute(mark, {"id": row.id, "now": _utc_now()})
            conn.commit()
            rows += 1
    seconds = time.perf_counter() - started
    session.close()
    return BaselineResult(rows, seconds, rows, not_ok, drained)


def _send(session: requests.Session, base_url: str, api_key: str, row) -> requests.Response:
    props = json.loads(row.properties)
    if row.kind == "identify":
        identification = {"user_id": row.user_id, "user_properties": props}
        return session.post(
            base_url + "/identify",
            timeout=30,
            data={"api_key": api_key, "identification": json.dumps(identification)},
        )
    when = row.event_time
    if isinstance(when, str):  # SQLite hands back text
        when = datetime.fromisoformat(when)
    event = {
        "user_id": row.user_id,
        "event_type": row.event_type,
        "time": calendar.timegm(when.utctimetuple()) * 1000,
        "event_properties": props,
    }
    return session.post(
        base_url + "/2/httpapi", json={"api_key": api_key, "events": [event]}, timeout=30
    )


def _utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
