"""Amplitude drops updates of a user updated over 1,800 times an hour: several pending
`$set`-only identify rows of one user in one batch go as one update (later values win), each
row acknowledged; and a 200 whose `events_ingested` is short is counted."""

from __future__ import annotations

import json
from datetime import datetime

import orjson
import pytest

from tasks.amplitude.answers import not_ingested
from tasks.amplitude.client import Answer
from tasks.amplitude.limits import Endpoint
from tasks.amplitude.payloads import Builder, Prepared, Row

NOW = datetime(2025, 6, 1, 12, 0, 0)
CREATED = datetime(2025, 6, 1, 11, 0, 0)


def row(row_id: int, user: str | None, props: dict | str, **values) -> Row:
    fields = {
        "id": row_id,
        "kind": "identify",
        "user_id": user,
        "device_id": None,
        "event_type": None,
        "event_time": None,
        "insert_id": None,
        "group_type": None,
        "group_value": None,
        "properties": props if isinstance(props, str) else json.dumps(props),
        "extra": None,
        "attempts": 1,
        "created_at": CREATED,
    }
    fields.update(values)
    return Row(**fields)


def prepare(rows: list[Row], endpoint: str = Endpoint.BATCH):
    return Builder(endpoint, 5, max_future_seconds=3600, now=NOW).prepare(rows)


def sent(items: list[Prepared]) -> list[tuple[tuple[int, ...], dict]]:
    return [(item.ids(), orjson.loads(item.blob)) for item in items]


@pytest.mark.parametrize("endpoint", [Endpoint.BATCH, Endpoint.HTTP_V2, Endpoint.IDENTIFY])
def test_given_set_only_rows_of_one_user_when_prepared_then_one_item_carries_the_later_values(
    endpoint,
):
    result = prepare(
        [
            row(1, "user-0001", {"tier": "bronze", "level": 1}),
            row(2, "user-0001", {"$set": {"tier": "silver"}}),
            row(3, "user-0001", {"tier": "gold", "score": 9}, insert_id="crm-3"),
        ],
        endpoint,
    )
    ((ids, payload),) = sent(result.items)
    assert ids == (1, 2, 3)
    assert payload["user_properties"] == {"$set": {"tier": "gold", "level": 1, "score": 9}}
    if endpoint != Endpoint.IDENTIFY:
        assert payload["insert_id"] == "crm-3"  # the later row's


@pytest.mark.parametrize(
    ("rows", "expected_ids"),
    [
        (
            [
                row(1, "user-0001", {"a": 1}),
                row(2, "user-0002", {"a": 2}),
                row(3, "user-0001", {"a": 3}),
            ],
            [(1, 3), (2,)],
        ),
        (
            [
                row(1, "user-0001", {"a": 1}),
                row(2, "user-0001", {"$add": {"n": 1}}),
                row(3, "user-0001", {"a": 3}),
            ],
            [(1,), (2,), (3,)],
        ),
        (
            [
                row(1, "user-0001", {"a": 1}),
                row(2, "user-0001", {"a": 2}, extra='{"platform": "Web"}'),
            ],
            [(1,), (2,)],
        ),
        (
            [
                row(1, "user-0001", {"a": 1}),
                row(2, "user-0001", "{broken"),
                row(3, "user-0001", {"a": 3}),
            ],
            [(1, 3)],
        ),
        (
            [
                row(1, None, {"a": 1}, device_id="device-01"),
                row(2, None, {"a": 2}, device_id="device-01"),
            ],
            [(1, 2)],
        ),
        (
            [
                row(1, None, {"a": 1}, device_id="device-01"),
                row(2, None, {"a": 2}, device_id="device-02"),
            ],
            [(1,), (2,)],
        ),
    ],
    ids=[
        "another user's row between: still merged",
        "an $add between: not merged across it",
        "a row with extra: not merged",
        "an invalid row between: merged, it never reaches Amplitude",
        "one device: merged",
        "two devices: not merged",
    ],
)
def test_given_rows_when_prepared_then_only_consecutive_set_only_rows_of_one_key_merge(
    rows, expected_ids
):
    result = prepare(rows)
    assert [item.ids() for item in result.items] == expected_ids


@pytest.mark.parametrize(
    ("body", "endpoint", "expected"),
    [
        ({"code": 200, "events_ingested": 3}, Endpoint.BATCH, 0),
        ({"code": 200, "events_ingested": 1}, Endpoint.BATCH, 2),
        ({"code": 200, "events_ingested": 0}, Endpoint.HTTP_V2, 3),
        ({"code": 200}, Endpoint.BATCH, 0),
        ({"code": 200, "events_ingested": "3"}, Endpoint.BATCH, 0),
        (None, Endpoint.IDENTIFY, 0),
    ],
    ids=["all", "one of three", "none", "no count", "not a number", "form API"],
)
def test_given_a_200_when_read_then_events_not_ingested_are_counted(body, endpoint, expected):
    items = [Prepared(i, b"{}", f"user-{i:04d}", None) for i in range(3)]
    answer = Answer(200, body, "success" if body is None else "")
    assert not_ingested(answer, items, endpoint) == expected
