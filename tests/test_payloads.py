"""Row values → Amplitude fields, where the arithmetic is ours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from tasks.payloads import epoch_ms


@pytest.mark.parametrize(("value", "expected"), [
    (datetime(1970, 1, 1), 0),
    (datetime(2026, 11, 29, 12, 0, 0, 999_999), 1_795_953_600_999),  # microseconds cut, not rounded
    (datetime(1969, 12, 31, 23, 59, 59, 999_500), -1),  # before 1970: the earlier millisecond
    (datetime(2026, 11, 29, 17, 0, tzinfo=timezone(timedelta(hours=5))), 1_795_953_600_000),
    (datetime(2026, 11, 29, 12, 0, tzinfo=UTC), 1_795_953_600_000),
], ids=["epoch", "naive UTC", "before 1970", "aware, +05:00", "aware UTC"])  # fmt: skip
def test_times_become_milliseconds_since_1970_in_utc(value, expected):
    assert epoch_ms(value) == expected
