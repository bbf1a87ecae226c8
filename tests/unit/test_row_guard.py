"""No row can sink its batch (issue 15, point 6): whatever goes wrong building one row's payload
fails that row alone, with a reason a person can act on; the rows around it are built."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from tasks.amplitude.limits import Endpoint
from tasks.amplitude.payloads import Builder, Row

NOW = datetime(2026, 5, 1, 12, 0, 0)


def row(row_id: int, **values) -> Row:
    fields = {
        "id": row_id,
        "kind": "event",
        "user_id": f"user-{row_id:04d}",
        "device_id": None,
        "event_type": "Order Picked Up",
        "event_time": None,
        "insert_id": None,
        "group_type": None,
        "group_value": None,
        "properties": '{"order": 7}',
        "extra": None,
        "attempts": 1,
        "created_at": NOW - timedelta(minutes=5),
    }
    return Row(**(fields | values))


def prepare(*rows: Row, endpoint: str = Endpoint.BATCH):
    return Builder(endpoint, 5, max_future_seconds=3600, now=NOW).prepare(list(rows))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            {"created_at": NOW + timedelta(days=2)},
            "invalid row: created_at (event_time is NULL) 2026-05-03 12:00:00 is in the future "
            "beyond AMPSYNC_MAX_FUTURE_SECONDS: write times in UTC (SYSUTCDATETIME())",
        ),
        (
            {"event_time": NOW + timedelta(days=2)},
            "invalid row: event_time 2026-05-03 12:00:00 is in the future beyond "
            "AMPSYNC_MAX_FUTURE_SECONDS",
        ),
        (
            {"event_time": "yesterday"},
            "invalid row: event_time 'yesterday' is not a date and time: write a UTC time such "
            "as '2024-05-01 12:30:00' (SYSUTCDATETIME())",
        ),
        ({"created_at": "not a date"}, "invalid row: created_at 'not a date' is not a date"),
        ({"created_at": "0000-00-00 00:00:00"}, "invalid row: created_at '0000-00-00 00:00:00'"),
        (
            {"oversized": 21_000_000},
            "invalid row: properties and extra are 21,000,000 bytes, over the 20,000,000 bytes "
            "Amplitude accepts in one request (batch): shrink properties/extra",
        ),
        # SQLite stores any value in any column: an id that is a number, not text
        (
            {"user_id": 12345},
            "invalid row: it could not be built: AttributeError: 'int' object has no attribute",
        ),
    ],
    ids=[
        "future created_at standing in for a NULL event_time",
        "future event_time",
        "text in event_time",
        "text in created_at",
        "MariaDB's zero date, handed over as text",
        "JSON stored over the request size (not loaded)",
        "a value no rule foresaw",
    ],
)
def test_given_a_bad_row_between_good_ones_when_built_then_it_alone_fails_with_its_reason(
    bad, reason
):
    # given a bad row between two good rows
    rows = (row(1), row(2, **bad), row(3))
    # when the batch is built
    prepared = prepare(*rows)
    # then the bad row fails with its reason and the good ones are built
    assert list(prepared.invalid) == [2]
    assert prepared.invalid[2].startswith(reason), prepared.invalid[2]
    assert "\n" not in prepared.invalid[2]
    assert [i.row_id for i in prepared.items] == [1, 3]


def test_given_an_unexpected_error_with_a_long_message_when_built_then_the_reason_is_one_short_line():
    class Odd(str):
        """A value whose every use fails with a long, multi-line message."""

        def strip(self, *args):
            raise RuntimeError("first line " + "x" * 500 + "\nsecond line")

    prepared = prepare(row(1, user_id=Odd("user-0001")), row(2))
    reason = prepared.invalid[1]
    assert reason.startswith("invalid row: it could not be built: RuntimeError: first line x")
    assert "second line" not in reason and len(reason) < 400
    assert [i.row_id for i in prepared.items] == [2]


def test_given_identify_rows_merged_for_a_user_when_a_later_one_fails_then_the_merge_keeps_the_others():
    rows = [
        row(1, kind="identify", properties='{"plan": "gold"}'),
        row(2, kind="identify", properties='{"tier": 2}', event_time="later"),
        row(3, kind="identify", properties='{"seats": 5}'),
    ]
    for r in rows:
        r.user_id = "user-0001"
    prepared = prepare(*rows)
    assert list(prepared.invalid) == [2]
    (item,) = prepared.items
    assert item.ids() == (1, 3)
