"""No row can sink its batch (issue 15, points 6 and 7), with a real worker on a real database.

A row that breaks the building of its payload, a time the database hands over as text, a row
too large for any request: each fails alone with its reason while the good rows of its batch
are delivered by the first send, and nothing stays in flight to be claimed again.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from support import PG_URL, event, poll_until

pytestmark = pytest.mark.reliability

IN_TWO_DAYS = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=2)


def good_events(n: int) -> list[dict]:
    return [event(f"good-{i:05d}", "Order Picked Up", {"seq": i}) for i in range(n)]


def settle(stack, timeout: float = 60) -> dict[int, dict]:
    """After one sync: wait until no row is in flight or pending, and return every row's
    outcome (read without its times: some hold text no time type parses)."""
    done = poll_until(lambda: not ({"in_flight", "pending"} & set(stack.counts())), timeout=timeout)
    assert done, f"rows still waiting: {stack.counts()}\n{stack.log_tail()}"
    q = stack.tables.queue
    columns = (q.c.id, q.c.user_id, q.c.status, q.c.attempts, q.c.last_error)
    with stack.engine.connect() as conn:
        return {r.id: dict(r._mapping) for r in conn.execute(select(*columns))}


def set_column(stack, row_id: int, column: str, value) -> None:
    q = stack.tables.queue
    with stack.engine.begin() as conn:
        conn.execute(update(q).where(q.c.id == row_id).values({column: value}))


def assert_one_go(stack, rows: dict[int, dict], bad: dict[int, str], path: str) -> None:
    """Good rows sent by one request, bad rows failed with their reason, each tried once."""
    for row_id, reason in bad.items():
        row = rows[row_id]
        assert row["status"] == "failed", (reason, row)
        assert row["last_error"].startswith("invalid row: ") and reason in row["last_error"], (
            reason,
            row["last_error"],
        )
    good = [r for i, r in rows.items() if i not in bad]
    assert {r["status"] for r in good} == {"sent"}
    # nothing re-claimed: every row was claimed once, by the one sync
    assert {r["attempts"] for r in rows.values()} == {1}
    received = stack.state()["counts"]["requests"]
    assert received == {path: {"200": 1}}, received
    arrived = {e["user_id"] for e in stack.state()["events"]}
    assert arrived == {r["user_id"] for r in good}


def test_given_an_event_whose_time_is_a_future_created_at_and_a_row_too_large_for_a_request_when_one_sync_runs_then_only_they_fail_with_their_reason(
    make_stack,
):
    # given, on PostgreSQL through HTTP V2 (1 MB a request), good events around two bad rows:
    # no event_time and a created_at two days ahead (formatting its error raised TypeError and
    # sank the batch), and properties of 1.2 MB, over any request HTTP V2 accepts
    stack = make_stack(PG_URL, AMPSYNC_EVENT_API="http_v2")
    rows = good_events(6)
    rows.insert(1, event("future-0001", "Order Picked Up", {}))
    too_large = json.dumps({"note": ["x" * 1000] * 1200})
    rows.insert(3, {**event("large-0001", "Order Picked Up"), "properties": too_large})
    ids = stack.insert(rows)
    set_column(stack, ids[1], "created_at", IN_TWO_DAYS)
    bad = {
        ids[1]: (
            f"created_at (event_time is NULL) {IN_TWO_DAYS:%Y-%m-%d %H:%M:%S} is in the future "
            "beyond AMPSYNC_MAX_FUTURE_SECONDS"
        ),
        # measured by the database: the size as stored, not the JSON the worker built
        ids[3]: f"properties and extra are {len(too_large):,} bytes, over the 1,000,000 bytes "
        "Amplitude accepts in one request (http_v2)",
    }
    stack.start_worker(concurrency=1)
    # when one sync claims them all in one batch
    summary = stack.sync(kind="event")
    assert summary["batches_enqueued"] == 1 and summary["rows_claimed"] == len(ids)
    # then the good rows went in one request and the bad ones failed alone, each tried once
    assert_one_go(stack, settle(stack), bad, "/2/httpapi")


# A non-date text in a time column: SQLite stores any text there, and reading it back as a
# time raised ValueError for the whole load.
NOT_A_DATE = {"event_time": "yesterday", "created_at": "not a date"}


def test_given_text_that_is_no_date_in_a_sqlite_time_column_when_one_sync_runs_then_only_its_row_fails_with_its_reason(
    make_stack, tmp_path
):
    # given, on SQLite, good events around one row with text for event_time and one with text
    # for created_at
    stack = make_stack(f"sqlite:///{tmp_path / 'queue.db'}")
    ids = stack.insert(good_events(7))
    broken = {ids[2]: "event_time", ids[4]: "created_at"}
    with stack.engine.begin() as conn:  # as text: the time type would refuse it
        for row_id, column in broken.items():
            conn.exec_driver_sql(
                f"UPDATE {stack.table} SET {column} = '{NOT_A_DATE[column]}' WHERE id = {row_id}"
            )
    bad = {
        row_id: f"{column} '{NOT_A_DATE[column]}' is not a date and time"
        for row_id, column in broken.items()
    }
    stack.start_worker(concurrency=1)
    # when one sync claims them all in one batch
    summary = stack.sync(kind="event")
    assert summary["batches_enqueued"] == 1 and summary["rows_claimed"] == len(ids)
    # then the good rows went in one request and the two bad ones failed alone
    assert_one_go(stack, settle(stack), bad, "/batch")
