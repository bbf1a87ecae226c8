"""Row values → Amplitude fields, where the arithmetic is ours."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tasks.amplitude.payloads import Builder, Row, RowError, epoch_ms


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(1970, 1, 1), 0),
        (
            datetime(2026, 11, 29, 12, 0, 0, 999_999),
            1_795_953_600_999,
        ),  # microseconds cut, not rounded
        (datetime(1969, 12, 31, 23, 59, 59, 999_500), -1),  # before 1970: the earlier millisecond
        (datetime(2026, 11, 29, 17, 0, tzinfo=timezone(timedelta(hours=5))), 1_795_953_600_000),
        (datetime(2026, 11, 29, 12, 0, tzinfo=UTC), 1_795_953_600_000),
    ],
    ids=["epoch", "naive UTC", "before 1970", "aware, +05:00", "aware UTC"],
)
def test_times_become_milliseconds_since_1970_in_utc(value, expected):
    assert epoch_ms(value) == expected


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"l": value}
    return value


@pytest.mark.parametrize(
    ("kind", "depth", "allowed"),
    [
        ("event", 40, True),
        ("event", 41, False),
        ("identify", 39, True),
        ("identify", 40, False),  # plain keys go one level deeper, under $set
    ],
)
def test_short_rows_skip_no_depth_check_amplitude_would_fail(kind, depth, allowed):
    # given a property object nested `depth` levels deep, short enough (< 1024 characters)
    # for the quick path that skips walking small trees
    text = json.dumps({"deep": _nested(depth - 1)})
    assert len(text) < 1024
    row = Row(
        id=1,
        kind=kind,
        user_id="user-00001",
        device_id=None,
        event_type="Viewed" if kind == "event" else None,
        event_time=None,
        insert_id=None,
        group_type=None,
        group_value=None,
        properties=text,
        extra=None,
        attempts=0,
        created_at=datetime(2026, 1, 1),
    )
    builder = Builder("batch", 5, 86400, datetime(2026, 1, 1))
    # when it is built, then it passes exactly when Amplitude's 40 levels allow it
    if allowed:
        assert builder.payload(row)
    else:
        with pytest.raises(RowError, match="nests deeper than Amplitude's 40 levels"):
            builder.payload(row)
