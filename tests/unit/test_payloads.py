"""Queue rows → Amplitude items (tasks/amplitude/payloads.py): packing into requests, times in
milliseconds, and which rows fail alone as invalid."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import quote_plus

import pytest

from tasks.amplitude.limits import MAX_GROUP_PROPERTIES, MAX_ITEMS, Endpoint
from tasks.amplitude.payloads import (
    LIBRARY,
    ROW_COLUMNS,
    Builder,
    Prepared,
    Row,
    epoch_ms,
    pack,
)
from tasks.outcomes import INVALID

# --- pack --------------------------------------------------------------------------------------


def items(n: int, size: int = 9) -> list[Prepared]:
    """n items whose blobs are `size` bytes (each costs size + 1 with its comma)."""
    return [Prepared(i, b"x" * size, f"user-{i}", None) for i in range(n)]


def ids(runs: list[list[Prepared]]) -> list[list[int]]:
    return [[i.row_id for i in run] for run in runs]


@pytest.mark.parametrize(
    ("n", "endpoint", "max_items", "sizes"),
    [
        (5, Endpoint.BATCH, 2, [2, 2, 1]),
        (6, Endpoint.BATCH, 3, [3, 3]),
        (3, Endpoint.BATCH, 10, [3]),
        (4, Endpoint.HTTP_V2, 1, [1, 1, 1, 1]),
        (1030, Endpoint.IDENTIFY, 5000, [1024, 6]),
        (1030, Endpoint.GROUP_IDENTIFY, 2000, [1024, 6]),
        (2001, Endpoint.BATCH, 5000, [2000, 1]),
        (0, Endpoint.BATCH, 5, []),
    ],
    ids=[
        "five by two",
        "exact multiple",
        "fewer than the limit",
        "one per request",
        "identify capped at its 1024",
        "groupidentify capped at its 1024",
        "batch capped at its 2000",
        "nothing to pack",
    ],
)
def test_given_items_when_packed_by_count_then_runs_respect_the_smaller_limit_in_order(
    n, endpoint, max_items, sizes
):
    given = items(n)
    runs = list(pack(given, endpoint, max_items))
    assert [len(r) for r in runs] == sizes
    assert [i.row_id for r in runs for i in r] == [i.row_id for i in given]


@pytest.mark.parametrize(
    ("sizes", "max_bytes", "expected"),
    [
        # limit = max_bytes - 200 (envelope); an item costs len(blob) + 1
        ([99] * 7, 500, [[0, 1, 2], [3, 4, 5], [6]]),
        ([99] * 3, 500, [[0, 1, 2]]),  # exactly the limit fits
        ([99, 99, 100], 500, [[0, 1], [2]]),  # one byte over goes to the next run
        ([49, 249, 49, 49], 500, [[0, 1], [2, 3]]),
        ([999, 9, 9], 500, [[0], [1, 2]]),  # an oversized item still goes, alone
        ([9, 999, 9], 500, [[0], [1], [2]]),
    ],
    ids=[
        "three per run",
        "exactly the limit",
        "one byte over",
        "mixed sizes",
        "oversized first item alone",
        "oversized middle item alone",
    ],
)
def test_given_items_when_packed_by_bytes_then_each_run_stays_under_the_limit_minus_the_envelope(
    sizes, max_bytes, expected
):
    given = [Prepared(n, b"x" * size, None, f"dev-{n}") for n, size in enumerate(sizes)]
    assert ids(list(pack(given, Endpoint.BATCH, 2000, max_bytes))) == expected


@pytest.mark.parametrize("endpoint", [Endpoint.IDENTIFY, Endpoint.GROUP_IDENTIFY], ids=str)
@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ([99] * 7, [[0, 1, 2], [3, 4, 5], [6]]),
        ([99, 99, 100], [[0, 1], [2]]),
        ([249, 49, 49], [[0, 1], [2]]),
        ([999, 9], [[0], [1]]),
    ],
    ids=["three per run", "one byte over", "mixed sizes", "oversized item alone"],
)
def test_given_form_items_when_packed_by_bytes_then_their_url_encoded_size_counts_not_the_json(
    endpoint, wire, expected
):
    # Each blob is 9 bytes of JSON: by its JSON every item would fit in one run.
    given = [Prepared(n, b"x" * 9, f"user-{n}", None, size=w) for n, w in enumerate(wire)]
    assert ids(list(pack(given, endpoint, 1024, 500))) == expected


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ([512, 512, 512], [[0, 1], [2]]),
        ([600, 600], [[0], [1]]),
        ([1000, 24, 1], [[0, 1], [2]]),
        ([MAX_GROUP_PROPERTIES + 50, 1, 1], [[0], [1, 2]]),
        ([1] * 1030, [list(range(1024)), list(range(1024, 1030))]),
        ([0] * 3, [[0, 1, 2]]),
    ],
    ids=[
        "two of 512 fill a request",
        "one over the limit goes to the next",
        "exactly 1024",
        "an item over the limit goes alone",
        "one property each: the row count caps first",
        "no count given",
    ],
)
def test_given_group_rows_when_packed_for_groupidentify_then_a_request_holds_at_most_1024_group_properties(
    properties, expected
):
    given = [Prepared(n, b"{}", None, None, properties=k) for n, k in enumerate(properties)]
    assert ids(list(pack(given, Endpoint.GROUP_IDENTIFY, 5000))) == expected


@pytest.mark.parametrize("endpoint", [Endpoint.IDENTIFY, Endpoint.BATCH, Endpoint.HTTP_V2], ids=str)
def test_given_a_property_count_when_packed_for_another_endpoint_then_it_is_not_limited(endpoint):
    given = [Prepared(n, b"{}", f"user-{n}", None, properties=600) for n in range(3)]
    assert ids(list(pack(given, endpoint, 5000))) == [[0, 1, 2]]


def test_given_the_documented_group_property_limit_then_it_is_1024():
    assert MAX_GROUP_PROPERTIES == 1024


def test_given_no_byte_limit_when_packed_then_the_endpoints_own_ceiling_applies():
    # http_v2 accepts 1,000,000 bytes: two 400 kB items fit under 999,800, a third does not.
    given = items(3, size=400_000)
    assert ids(list(pack(given, Endpoint.HTTP_V2, 2000))) == [[0, 1], [2]]
    # batch accepts 20 MB: all three go together.
    assert ids(list(pack(given, Endpoint.BATCH, 2000))) == [[0, 1, 2]]


# --- epoch_ms ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(1970, 1, 1), 0),
        (datetime(2024, 1, 1, 0, 0, 0, 123_000), 1_704_067_200_123),
        (datetime(2024, 1, 1, 0, 0, 0, 123_999), 1_704_067_200_123),
        (datetime(1969, 12, 31, 23, 59, 59, 999_500), -1),
        (datetime(2024, 1, 1, tzinfo=UTC), 1_704_067_200_000),
        (datetime(2024, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2))), 1_704_067_200_000),
        (datetime(2023, 12, 31, 19, 0, tzinfo=timezone(timedelta(hours=-5))), 1_704_067_200_000),
    ],
    ids=[
        "epoch",
        "naive is UTC",
        "microseconds cut, not rounded",
        "before 1970: the earlier millisecond",
        "aware UTC",
        "aware +02:00",
        "aware -05:00",
    ],
)
def test_given_a_datetime_when_converted_then_it_is_milliseconds_since_1970_utc(value, expected):
    assert epoch_ms(value) == expected


# --- Builder.prepare ---------------------------------------------------------------------------

NOW = datetime(2025, 6, 1, 12, 0, 0)
CREATED = datetime(2025, 6, 1, 11, 0, 0)


def make_row(row_id: int = 1, **values) -> Row:
    fields = {
        "id": row_id,
        "kind": "identify",
        "user_id": "user-0001",
        "device_id": None,
        "event_type": None,
        "event_time": None,
        "insert_id": None,
        "group_type": None,
        "group_value": None,
        "properties": '{"plan": "gold"}',
        "extra": None,
        "attempts": 1,
        "created_at": CREATED,
    }
    fields.update(values)
    return Row(**fields)


def builder(endpoint: str = Endpoint.BATCH, min_id_length: int = 5) -> Builder:
    return Builder(endpoint, min_id_length, max_future_seconds=3600, now=NOW)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        (
            Endpoint.BATCH,
            {
                "event_type": "$identify",
                "user_id": "user-0001",
                "time": epoch_ms(CREATED),
                "insert_id": f"ampsync-1-{epoch_ms(CREATED)}",
                "user_properties": {"$set": {"plan": "gold"}},
                "library": LIBRARY,
            },
        ),
        (
            Endpoint.IDENTIFY,
            {"user_id": "user-0001", "user_properties": {"$set": {"plan": "gold"}}},
        ),
    ],
    ids=["as an $identify event naming ampsync", "through the form API, no library"],
)
def test_given_a_valid_identify_row_when_prepared_then_it_sets_its_properties_and_an_event_names_ampsync(
    endpoint, expected
):
    prepared = builder(endpoint).prepare([make_row()])
    assert prepared.invalid == {}
    (one,) = prepared.items
    assert (one.row_id, one.user_id, one.device_id) == (1, "user-0001", None)
    assert json.loads(one.blob) == expected


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"properties": '{"plan": '}, "properties is not valid JSON"),
        ({"extra": "{oops}"}, "extra is not valid JSON"),
        ({"properties": '["gold"]'}, "properties must be a JSON object"),
        ({"user_id": None, "device_id": None}, "user_id and device_id are both empty"),
        ({"user_id": "", "device_id": ""}, "user_id and device_id are both empty"),
        ({"user_id": "abc"}, "user_id 'abc' is shorter than Amplitude's minimum of 5"),
        ({"user_id": "null"}, "user_id 'null' is a placeholder Amplitude rejects"),
        ({"properties": "{}"}, "properties is empty: an identify row needs properties"),
        ({"kind": "event", "event_type": None}, "event_type is empty"),
        ({"kind": "event", "event_type": ""}, "event_type is empty"),
        ({"kind": "event", "event_type": "$identify"}, "event_type '$identify' is reserved"),
        (
            {"kind": "event", "event_type": "e", "event_time": NOW + timedelta(hours=2)},
            "is in the future beyond AMPSYNC_MAX_FUTURE_SECONDS",
        ),
        ({"kind": "page_view"}, "kind 'page_view' is not one of"),
        ({"extra": '{"user_id": "x"}'}, "extra sets user_id, which the row's columns fill"),
        (
            {"kind": "group_identify", "group_type": "org", "group_value": None},
            "group_value is empty",
        ),
    ],
    ids=[
        "properties not JSON",
        "extra not JSON",
        "properties not an object",
        "no user_id nor device_id",
        "empty user_id and device_id",
        "user_id too short",
        "placeholder user_id",
        "identify with nothing to set",
        "event without event_type",
        "event with empty event_type",
        "reserved event_type",
        "event time too far ahead",
        "unknown kind",
        "extra sets a column's field",
        "group without group_value",
    ],
)
def test_given_a_bad_row_among_good_ones_when_prepared_then_it_alone_fails_as_invalid_naming_why(
    values, reason
):
    rows = [make_row(1), make_row(2, **values), make_row(3, user_id="user-0003")]
    prepared = builder().prepare(rows)
    assert [i.row_id for i in prepared.items] == [1, 3]
    assert list(prepared.invalid) == [2]
    assert prepared.invalid[2].startswith(f"{INVALID} ")
    assert reason in prepared.invalid[2]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"kind": "event", "event_type": "Signed Up", "properties": '{"a": 1}'},
            {"event_type": "Signed Up", "event_properties": {"a": 1}},
        ),
        (
            {"kind": "event", "event_type": "e", "user_id": None, "device_id": "device-01"},
            {"event_type": "e", "device_id": "device-01"},
        ),
        (
            {"kind": "event", "event_type": "e", "insert_id": "mine-1"},
            {"event_type": "e", "insert_id": "mine-1"},
        ),
        (
            {"kind": "event", "event_type": "e", "event_time": datetime(2025, 6, 1, 10)},
            {"time": epoch_ms(datetime(2025, 6, 1, 10))},
        ),
        (
            {"kind": "event", "event_type": "e", "event_time": NOW + timedelta(seconds=3600)},
            {"time": epoch_ms(NOW) + 3_600_000},
        ),
    ],
    ids=[
        "event with properties",
        "event by device only",
        "the row's insert_id is kept",
        "event_time is the time",
        "exactly max_future ahead is allowed",
    ],
)
def test_given_a_valid_event_row_when_prepared_then_its_columns_fill_the_event(values, expected):
    prepared = builder().prepare([make_row(7, **values)])
    assert prepared.invalid == {}
    (one,) = prepared.items
    blob = json.loads(one.blob)
    assert blob | expected == blob  # every expected field, with its value


def test_given_a_loaded_row_with_extra_columns_when_prepared_then_only_the_row_columns_are_read():
    # the load's own `oversized` (None: properties and extra were loaded), then `short`
    loaded = (*(getattr(make_row(4), name) for name in ROW_COLUMNS), None, True)
    prepared = builder().prepare([loaded])
    assert prepared.invalid == {}
    assert [i.row_id for i in prepared.items] == [4]


def test_given_min_id_length_when_prepared_then_ids_at_the_minimum_pass_and_shorter_fail():
    rows = [make_row(1, user_id="abc"), make_row(2, user_id="ab")]
    prepared = builder(min_id_length=3).prepare(rows)
    assert [i.row_id for i in prepared.items] == [1]
    assert "shorter than Amplitude's minimum of 3" in prepared.invalid[2]


def test_given_a_row_too_large_for_one_request_when_prepared_then_it_fails_as_invalid():
    big = json.dumps({"k": ["x" * 1000] * 1000})  # ~1 MB: over http_v2's limit
    prepared = builder(Endpoint.HTTP_V2).prepare(
        [make_row(1, kind="event", event_type="e", properties=big), make_row(2)]
    )
    assert [i.row_id for i in prepared.items] == [2]
    assert prepared.invalid[1].startswith(f"{INVALID} the row is ")
    assert "bytes Amplitude accepts in one request" in prepared.invalid[1]


def test_given_the_documented_limits_then_pack_caps_form_apis_at_1024_and_event_apis_at_2000():
    """Guards the count cases above: they assume these documented limits."""
    assert MAX_ITEMS == {"http_v2": 2000, "batch": 2000, "identify": 1024, "groupidentify": 1024}


# --- who sent it: library ----------------------------------------------------------------------


def test_given_the_installed_package_then_library_is_ampsync_slash_its_version():
    try:
        expected = version("ampsync")
    except PackageNotFoundError:
        expected = "0"
    assert f"ampsync/{expected}" == LIBRARY


GROUP = {"kind": "group_identify", "group_type": "org", "group_value": "acme-01"}
EVENT = {"kind": "event", "event_type": "Signed Up"}


@pytest.mark.parametrize(
    ("values", "endpoint", "event_type"),
    [
        (EVENT, Endpoint.BATCH, "Signed Up"),
        (EVENT, Endpoint.HTTP_V2, "Signed Up"),
        ({}, Endpoint.BATCH, "$identify"),
        ({}, Endpoint.HTTP_V2, "$identify"),
        (GROUP, Endpoint.BATCH, "$groupidentify"),
        (GROUP, Endpoint.HTTP_V2, "$groupidentify"),
    ],
    ids=[
        "event, batch",
        "event, http_v2",
        "identify, batch",
        "identify, http_v2",
        "group, batch",
        "group, http_v2",
    ],
)
def test_given_a_row_sent_as_an_event_when_prepared_then_it_names_ampsync_as_its_library(
    values, endpoint, event_type
):
    prepared = builder(endpoint).prepare([make_row(3, **values)])
    assert prepared.invalid == {}
    blob = json.loads(prepared.items[0].blob)
    assert blob["event_type"] == event_type
    assert blob["library"] == LIBRARY


@pytest.mark.parametrize(
    ("values", "endpoint"),
    [({}, Endpoint.IDENTIFY), (GROUP, Endpoint.GROUP_IDENTIFY)],
    ids=["identify", "groupidentify"],
)
def test_given_a_row_sent_through_a_form_api_when_prepared_then_it_is_an_identification_without_library(
    values, endpoint
):
    prepared = builder(endpoint).prepare([make_row(3, **values)])
    assert prepared.invalid == {}
    blob = json.loads(prepared.items[0].blob)
    assert "library" not in blob and "event_type" not in blob and "insert_id" not in blob


def test_given_a_row_whose_extra_sets_library_when_prepared_then_the_rows_value_wins():
    prepared = builder().prepare([make_row(3, **EVENT, extra='{"library": "crm-export/2"}')])
    assert json.loads(prepared.items[0].blob)["library"] == "crm-export/2"


# --- group rows: $groupidentify events or form identifications ---------------------------------


@pytest.mark.parametrize("endpoint", [Endpoint.BATCH, Endpoint.HTTP_V2], ids=str)
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"properties": '{"plan": "gold", "$add": {"seats": 3}}'},
            {
                "event_type": "$groupidentify",
                "user_id": "user-0001",
                "groups": {"org": "acme-01"},
                "group_properties": {"$add": {"seats": 3}, "$set": {"plan": "gold"}},
                "time": epoch_ms(CREATED),
                "insert_id": f"ampsync-5-{epoch_ms(CREATED)}",
                "library": LIBRARY,
            },
        ),
        (
            {
                "user_id": None,
                "insert_id": "grp-42",
                "event_time": datetime(2025, 6, 1, 10),
            },
            {
                "event_type": "$groupidentify",
                "groups": {"org": "acme-01"},
                "group_properties": {"$set": {"plan": "gold"}},
                "time": epoch_ms(datetime(2025, 6, 1, 10)),
                "insert_id": "grp-42",
                "library": LIBRARY,
            },
        ),
    ],
    ids=["with a user, operations beside plain keys", "no user nor device, own insert_id and time"],
)
def test_given_a_group_row_through_an_event_api_when_prepared_then_it_is_a_groupidentify_event_with_its_insert_id(
    values, expected, endpoint
):
    prepared = builder(endpoint).prepare([make_row(5, **GROUP, **values)])
    assert prepared.invalid == {}
    (one,) = prepared.items
    assert json.loads(one.blob) == expected
    assert (one.size, one.properties) == (0, 0)
    assert one.wire_size == len(one.blob)


def test_given_a_group_row_sent_twice_when_prepared_then_its_insert_id_is_the_same():
    """A re-send after a 500 carries the same insert_id: Amplitude applies it once."""
    first = builder().prepare([make_row(5, **GROUP)]).items[0]
    again = builder().prepare([make_row(5, **GROUP, attempts=2)]).items[0]
    assert json.loads(first.blob)["insert_id"] == json.loads(again.blob)["insert_id"]


def test_given_a_group_row_through_the_form_api_when_prepared_then_it_stays_an_identification():
    row = make_row(5, **GROUP, properties='{"plan": "gold", "$add": {"seats": 3, "bots": 1}}')
    (one,) = builder(Endpoint.GROUP_IDENTIFY).prepare([row]).items
    assert json.loads(one.blob) == {
        "group_type": "org",
        "group_value": "acme-01",
        "group_properties": {"$add": {"seats": 3, "bots": 1}, "$set": {"plan": "gold"}},
    }
    assert one.properties == 3
    assert one.size == len(quote_plus(one.blob)) > len(one.blob)
    assert one.wire_size == one.size


@pytest.mark.parametrize(
    ("properties", "count"),
    [
        ('{"a": 1}', 1),
        ('{"a": 1, "b": 2, "c": 3}', 3),
        ('{"$setOnce": {"a": 1}, "$unset": {"b": "-", "c": "-"}}', 3),
        ('{"a": 1, "$append": {"tags": "x"}}', 2),
    ],
    ids=["one plain key", "three plain keys", "operations", "plain and operation"],
)
def test_given_a_group_row_for_groupidentify_when_prepared_then_its_group_properties_are_counted(
    properties, count
):
    (one,) = (
        builder(Endpoint.GROUP_IDENTIFY)
        .prepare([make_row(5, **GROUP, properties=properties)])
        .items
    )
    assert one.properties == count


def test_given_an_identify_row_for_the_form_api_when_prepared_then_its_size_is_url_encoded():
    (one,) = builder(Endpoint.IDENTIFY).prepare([make_row(1, properties='{"a b": "c&d"}')]).items
    assert one.size == len(quote_plus(one.blob))
    assert one.properties == 0


# --- $skip_user_properties_sync -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "endpoint"),
    [(EVENT, Endpoint.BATCH), (EVENT, Endpoint.HTTP_V2), ({}, Endpoint.BATCH)],
    ids=["event, batch", "event, http_v2", "identify as $identify"],
)
def test_given_extra_sets_skip_user_properties_sync_when_prepared_then_the_item_carries_it(
    values, endpoint
):
    row = make_row(2, **values, extra='{"$skip_user_properties_sync": true}')
    prepared = builder(endpoint).prepare([row])
    assert prepared.invalid == {}
    assert json.loads(prepared.items[0].blob)["$skip_user_properties_sync"] is True
