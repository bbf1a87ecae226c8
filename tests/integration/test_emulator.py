"""The local Amplitude emulator validates, limits, answers and misbehaves as docs/amplitude.md says.

Every test talks HTTP (requests) to a real emulator started on a free port.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import orjson
import pytest
import requests

from ampsync_emulator import Emulator, Faults

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-0123456789abcdef"
V2 = "/2/httpapi"
BATCH = "/batch"
EVENT_PATHS = [V2, BATCH]


class Amp:
    """A started emulator plus a keep-alive session and small helpers."""

    def __init__(self, emu: Emulator, url: str):
        self.emu = emu
        self.url = url
        self.s = requests.Session()

    def post_events(self, path, events, api_key=KEY, options=None, **kw):
        body = {"api_key": api_key, "events": events}
        if options is not None:
            body["options"] = options
        return self.s.post(self.url + path, json=body, timeout=5, **kw)

    def post_raw(self, path, data, content_type="application/json", **kw):
        return self.s.post(
            self.url + path, data=data, headers={"Content-Type": content_type}, timeout=5, **kw
        )

    def identify(self, identification, api_key=KEY, path="/identify", **kw):
        if not isinstance(identification, str):
            identification = orjson.dumps(identification).decode()
        data = {"api_key": api_key, "identification": identification}
        return self.s.post(self.url + path, data=data, timeout=5, **kw)

    def state(self, **params):
        return self.s.get(self.url + "/_emulator/state", params=params, timeout=5).json()

    def counts(self):
        return self.state(events=0)["counts"]

    def props(self, user_id):
        return self.state(events=0)["users"][user_id]["user_properties"]


def make_amp(faults=None, **kw):
    emu = Emulator(faults, **kw)
    return Amp(emu, emu.start())


@pytest.fixture
def amp():
    a = make_amp()
    yield a
    a.s.close()
    a.emu.stop()


def ev(i=0, **fields):
    e = {"event_type": "Order Picked Up", "user_id": f"user-{i:04d}", "insert_id": f"ins-{i}"}
    e.update(fields)
    return e


def assert_nothing_ingested(amp):
    c = amp.counts()
    assert c["events_received"] == 0 and c["events_unique"] == 0
    assert amp.state(events=0)["users"] == {}


# ----------------------------------------------------------------------------------------------
# HTTP V2 / Batch validation
# ----------------------------------------------------------------------------------------------

VALIDATION_CASES = [
    pytest.param(
        {"events": [ev()]},
        {"code": 400, "error": "Request missing required field", "missing_field": "api_key"},
        id="missing-api-key",
    ),
    pytest.param(
        {"api_key": KEY},
        {"code": 400, "error": "Request missing required field", "missing_field": "events"},
        id="missing-events",
    ),
    pytest.param(
        {"api_key": KEY, "Events": [ev()]},
        {"code": 400, "error": "Request missing required field", "missing_field": "events"},
        id="events-key-is-case-sensitive",
    ),
    pytest.param(
        {"events": [ev(0), ev(1), ev(2), {"user_id": "user-3"}]},
        {
            "code": 400,
            "error": "Request missing required field",
            "missing_field": "api_key",
            "events_with_missing_fields": {"event_type": [3]},
        },
        id="missing-api-key-also-lists-bad-events",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0), {"event_type": "x", "user_id": "user-1"}, {}]},
        {
            "code": 400,
            "error": "Request missing required field",
            "events_with_missing_fields": {"event_type": [2], "user_id": [2], "device_id": [2]},
        },
        id="event-missing-type-and-both-ids",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0), ev(1, time=1700000000000.5)]},
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"time": [1]},
        },
        id="float-time",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0, time="2024-01-01T00:00:00Z")]},
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"time": [0]},
        },
        id="iso-string-time",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0, user_id=12345678)]},
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"user_id": [0]},
        },
        id="numeric-user-id",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0, device_id="d" * 1025)]},
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"device_id": [0]},
        },
        id="device-id-over-1024-chars",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0, event_type="[Amplitude] Revenue")]},
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"event_type": [0]},
        },
        id="reserved-event-type",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0, event_properties={"note": "x" * 1025})]},
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"event_properties": [0]},
        },
        id="property-string-over-1024-chars",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0, event_properties=["not", "an", "object"])]},
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"event_properties": [0]},
        },
        id="event-properties-not-an-object",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0, user_properties="plan=gold")]},
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"user_properties": [0]},
        },
        id="user-properties-not-an-object",
    ),
    pytest.param(
        {
            "api_key": KEY,
            "events": [
                ev(0, event_type="$identify", user_properties={"$set": {"a": 1}, "plain": 2})
            ],
        },
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"user_properties": [0]},
        },
        id="identify-mixes-operations-and-plain-keys",
    ),
    pytest.param(
        {
            "api_key": KEY,
            "events": [ev(0, event_type="$identify", user_properties={"$add": {"visits": "many"}})],
        },
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"user_properties": [0]},
        },
        id="identify-add-non-numeric",
    ),
    pytest.param(
        {"api_key": KEY, "events": [{"event_type": "$groupidentify", "insert_id": "g1"}]},
        {
            "code": 400,
            "error": "Request missing required field",
            "events_with_missing_fields": {"groups": [0], "group_properties": [0]},
        },
        id="groupidentify-event-needs-groups-and-properties",
    ),
    pytest.param(
        {
            "api_key": KEY,
            "events": [
                {
                    "event_type": "$groupidentify",
                    "groups": {"org": "Acme"},
                    "group_properties": {"$remove": {"tags": "x"}},
                }
            ],
        },
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"group_properties": [0]},
        },
        id="groupidentify-event-op-not-allowed",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0, user_id="abc")]},
        {
            "code": 400,
            "error": "Invalid id length for user_id or device_id",
            "events_with_invalid_id_lengths": {"user_id": [0]},
        },
        id="user-id-shorter-than-5",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(0), ev(1, user_id="abc")], "options": {"min_id_length": 8}},
        {
            "code": 400,
            "error": "Invalid id length for user_id or device_id",
            "events_with_invalid_id_lengths": {"user_id": [1]},
        },
        id="min-id-length-option-raises-the-minimum",
    ),
    pytest.param(
        {"api_key": "invalid", "events": [ev()]},
        {"code": 400, "error": "Invalid API key: invalid"},
        id="invalid-api-key",
    ),
    pytest.param(
        {"api_key": KEY, "events": [ev(), "not-an-event"]},
        {
            "code": 400,
            "error": "Invalid field values on some events",
            "events_with_invalid_fields": {"event": [1]},
        },
        id="event-not-an-object",
    ),
]


@pytest.mark.parametrize("path", EVENT_PATHS)
@pytest.mark.parametrize(("body", "expected"), VALIDATION_CASES)
def test_given_invalid_request_when_posted_then_400_body_is_exact_and_nothing_ingested(
    amp, path, body, expected
):
    r = amp.s.post(amp.url + path, json=body, timeout=5)
    assert r.status_code == 400
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == expected
    assert_nothing_ingested(amp)


REJECTED_IDS = [
    "anonymous",
    "nil",
    "none",
    "null",
    "n/a",
    "na",
    "undefined",
    "unknown",
    "",
    "00000000-0000-0000-0000-000000000000",
    "{}",
    "lmy47d",
    "0",
    "-1",
    "NULL",
    "Undefined",
    "LMY47D",
]


@pytest.mark.parametrize("bad_id", REJECTED_IDS)
@pytest.mark.parametrize("field", ["user_id", "device_id"])
def test_given_rejected_placeholder_id_when_posted_then_invalid_field(amp, bad_id, field):
    event = {"event_type": "x", "user_id": "user-0001", "device_id": "device-0001"}
    event[field] = bad_id
    r = amp.post_events(V2, [ev(0), event])
    assert r.status_code == 400
    assert r.json() == {
        "code": 400,
        "error": "Invalid field values on some events",
        "events_with_invalid_fields": {field: [1]},
    }


def test_given_properties_nested_deeper_than_40_when_posted_then_invalid_field(amp):
    deep = leaf = {}
    for _ in range(40):
        leaf["x"] = {}
        leaf = leaf["x"]
    ok = {}
    leaf = ok
    for _ in range(39):
        leaf["x"] = {}
        leaf = leaf["x"]
    r = amp.post_events(V2, [ev(0, event_properties=ok), ev(1, event_properties=deep)])
    assert r.json()["events_with_invalid_fields"] == {"event_properties": [1]}


def test_given_min_id_length_option_when_short_ids_sent_then_accepted(amp):
    r = amp.post_events(
        BATCH,
        [ev(0, user_id="ab"), ev(1, device_id="d1", user_id=None)],
        options={"min_id_length": 2},
    )
    assert r.status_code == 200
    assert amp.counts()["events_unique"] == 2


CONTENT_TYPE_ERROR = "Invalid request: Content-Type must be application/json"


@pytest.mark.parametrize("path", EVENT_PATHS)
@pytest.mark.parametrize(
    ("data", "content_type", "error"),
    [
        (b"{not json", "application/json", "Invalid JSON request body"),
        (b"[1, 2]", "application/json", "Invalid JSON request body"),
        (b"", "application/json", "Missing request body"),
        (orjson.dumps({"api_key": KEY, "events": [ev()]}), "text/plain", CONTENT_TYPE_ERROR),
        (b"api_key=x&events=y", "application/x-www-form-urlencoded", "Invalid JSON request body"),
        (b"<events/>", "text/xml", "Invalid JSON request body"),
    ],
    ids=["non-json", "json-not-object", "empty-body", "text-plain", "form-encoded", "xml"],
)
def test_given_malformed_body_or_content_type_when_posted_then_400_json(
    amp, path, data, content_type, error
):
    r = amp.post_raw(path, data, content_type)
    assert r.status_code == 400
    assert r.json() == {"code": 400, "error": error}
    assert_nothing_ingested(amp)


# Request-wide 400s: they name no event, whatever the body holds. (method, path, body,
# Content-Type or None for no header, error)
VALID_BATCH_BODY = orjson.dumps({"api_key": KEY, "events": [ev()]})
REQUEST_WIDE_400_CASES = [
    pytest.param(
        "POST",
        "/httpapi",
        VALID_BATCH_BODY,
        "application/json",
        "Invalid request path",
        id="v1-path",
    ),
    pytest.param(
        "POST",
        "/2/httpapi/batch",
        VALID_BATCH_BODY,
        "application/json",
        "Invalid request path",
        id="api-path-with-a-tail",
    ),
    pytest.param(
        "POST",
        "/proxy/batch",
        VALID_BATCH_BODY,
        "application/json",
        "Invalid request path",
        id="base-url-carrying-a-path",
    ),
    pytest.param("GET", "/2/httpapi/v3", b"", None, "Invalid request path", id="get-unknown"),
    pytest.param(
        "POST", "/", VALID_BATCH_BODY, "application/json", "Invalid request path", id="post-to-root"
    ),
    *(
        pytest.param(
            "POST",
            path,
            b"",
            None,
            "Missing request body",
            id=f"no-body-{path.strip('/').replace('/', '-')}",
        )
        for path in (V2, BATCH, "/identify", "/groupidentify")
    ),
    pytest.param(
        "POST",
        V2,
        b"not json at all",
        None,
        "Invalid JSON request body",
        id="v2-text-without-content-type",
    ),
    pytest.param(
        "POST",
        BATCH,
        b'{"api_key": "k", "events": [',
        "application/json",
        "Invalid JSON request body",
        id="batch-truncated-json",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "data", "content_type", "error"), REQUEST_WIDE_400_CASES
)
def test_given_request_wide_problem_when_sent_then_400_json_naming_no_event(
    amp, method, path, data, content_type, error
):
    headers = {"Content-Type": content_type} if content_type else {}
    r = amp.s.request(method, amp.url + path, data=data, headers=headers, timeout=5)
    assert r.status_code == 400
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"code": 400, "error": error}
    assert_nothing_ingested(amp)
    assert amp.state()["rejected"][-1]["error"].startswith(error)


def test_given_wrong_path_when_called_then_counted_and_listed_with_the_path(amp):
    amp.s.post(amp.url + "/proxy/batch", data=VALID_BATCH_BODY, timeout=5)
    state = amp.state()
    assert state["counts"]["requests"] == {"(invalid path)": {"400": 1}}
    assert state["rejected"][-1]["error"] == "Invalid request path: POST /proxy/batch"
    assert amp.s.get(amp.url + "/favicon.ico", timeout=5).status_code == 404


def test_given_charset_suffix_in_content_type_when_posted_then_accepted(amp):
    r = amp.post_raw(
        V2, orjson.dumps({"api_key": KEY, "events": [ev()]}), "application/json; charset=UTF-8"
    )
    assert r.status_code == 200


def test_given_api_key_set_when_other_key_used_then_invalid_api_key():
    a = make_amp(api_keys={"good-key"})
    try:
        assert a.post_events(V2, [ev()], api_key="good-key").status_code == 200
        r = a.post_events(V2, [ev(1)], api_key="other-key")
        assert r.status_code == 400
        assert r.json() == {"code": 400, "error": "Invalid API key: other-key"}
    finally:
        a.emu.stop()


@pytest.mark.parametrize("path", EVENT_PATHS)
def test_given_valid_events_when_posted_then_200_body_and_trailing_slash_accepted(amp, path):
    events = [ev(i) for i in range(3)]
    raw = orjson.dumps({"api_key": KEY, "events": events})
    before = int(time.time() * 1000)
    r = amp.post_raw(path + "/", raw)
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and body["events_ingested"] == 3
    assert body["payload_size_bytes"] == len(raw)
    assert before <= body["server_upload_time"] <= int(time.time() * 1000)
    assert r.raw.version == 11 and "Content-Length" in r.headers
    state = amp.state()
    assert state["events"] == events
    assert state["counts"]["requests"][path] == {"200": 1}


# ----------------------------------------------------------------------------------------------
# 413
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EVENT_PATHS)
def test_given_2001_events_when_posted_then_413_and_2000_accepted(amp, path):
    r = amp.post_events(path, [ev(i) for i in range(2001)])
    assert r.status_code == 413
    assert r.json() == {"code": 413, "error": "Payload too large"}
    assert_nothing_ingested(amp)
    assert amp.post_events(path, [ev(i) for i in range(2000)]).status_code == 200


def padded(size: int) -> bytes:
    raw = orjson.dumps({"api_key": KEY, "events": [ev()]})
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_given_v2_body_over_1000000_bytes_when_posted_then_413_but_batch_accepts(amp):
    assert amp.post_raw(V2, padded(1_000_000)).status_code == 200
    r = amp.post_raw(V2, padded(1_000_001))
    assert r.status_code == 413
    assert r.json() == {"code": 413, "error": "Payload too large"}
    assert amp.post_raw(BATCH, padded(1_000_001)).status_code == 200


def test_given_batch_body_over_20_mb_when_posted_then_413(amp):
    r = amp.post_raw(BATCH, padded(20_000_001))
    assert r.status_code == 413
    assert r.json() == {"code": 413, "error": "Payload too large"}


@pytest.mark.parametrize("path", EVENT_PATHS)
def test_given_lowered_limits_when_exceeded_then_413(amp, path):
    amp.emu.set_faults(max_events_per_request=10)
    assert amp.post_events(path, [ev(i) for i in range(11)]).status_code == 413
    assert amp.post_events(path, [ev(i) for i in range(10)]).status_code == 200
    amp.emu.set_faults(max_events_per_request=None, max_bytes_per_request=300)
    assert amp.post_events(path, [ev(i) for i in range(10, 20)]).status_code == 413
    assert amp.post_events(path, [ev(99)]).status_code == 200


# ----------------------------------------------------------------------------------------------
# 429
# ----------------------------------------------------------------------------------------------


def test_given_throttled_user_fault_when_posted_then_429_exact_body_and_nothing_ingested(amp):
    amp.emu.set_faults(
        throttled_users={"user-0001": time.time() + 60, "device-0042": time.time() + 60}
    )
    events = [ev(0), ev(1), ev(2), ev(3, user_id=None, device_id="device-0042"), ev(1)]
    r = amp.post_events(V2, events)
    assert r.status_code == 429
    assert r.json() == {
        "code": 429,
        "error": "Too many requests for some devices and users",
        "eps_threshold": 30,
        "throttled_devices": {"device-0042": 31},
        "throttled_users": {"user-0001": 31},
        "throttled_events": [1, 3, 4],
    }
    assert_nothing_ingested(amp)


def test_given_throttle_expired_when_posted_then_accepted(amp):
    amp.emu.set_faults(throttled_users={"user-0001": time.time() - 1})
    assert amp.post_events(V2, [ev(1)]).status_code == 200


def test_given_v2_user_over_30_eps_when_posted_again_then_429_for_that_user_only(amp):
    hot = [ev(i, user_id="hot-user") for i in range(200)]
    assert amp.post_events(V2, hot).status_code == 200
    second = [ev(1000 + i, user_id="hot-user") for i in range(200)] + [ev(5000)]
    r = amp.post_events(V2, second)
    assert r.status_code == 429
    body = r.json()
    assert body["eps_threshold"] == 30
    assert body["throttled_users"] == {"hot-user": 40}  # 400 events in a 10 s window
    assert body["throttled_devices"] == {}
    assert body["throttled_events"] == list(range(200))
    assert amp.counts()["events_received"] == 200
    assert amp.post_events(V2, [ev(5000)]).status_code == 200


def test_given_batch_user_over_1000_eps_over_30s_when_posted_then_429(amp):
    for r in range(15):  # 30,000 events = 1000/s over 30 s: still allowed
        events = [ev(r * 2000 + i, user_id="bulk-user") for i in range(2000)]
        assert amp.post_events(BATCH, events).status_code == 200
    r = amp.post_events(BATCH, [ev(99_999, user_id="bulk-user")])
    assert r.status_code == 429
    body = r.json()
    assert body["eps_threshold"] == 1000
    assert body["throttled_users"] == {"bulk-user": 1001}
    assert body["throttled_events"] == [0]
    assert body["exceeded_daily_quota_users"] == {}


def send_for_one_id(amp, path, id_field, n):
    """One request: n events (identifications on /identify) of one hot id, then a bystander's."""
    hot = "hot-user" if id_field == "user_id" else "hot-device"
    if path == "/identify":
        return amp.identify([{id_field: hot} for _ in range(n)] + [{"user_id": "user-0001"}])
    ids = {"user_id": None, id_field: hot}
    events = [ev(i, **ids) for i in range(n)] + [ev(99_999)]
    return amp.post_events(path, events)


# (path, id field, events of that id in one request, eps_threshold, reported rate or None = 200)
ONE_REQUEST_THROTTLE_CASES = [
    pytest.param(V2, "user_id", 301, 30, 31, id="v2-user-301"),
    pytest.param(V2, "device_id", 301, 30, 31, id="v2-device-301"),
    pytest.param(V2, "user_id", 300, 30, None, id="v2-user-300-accepted"),
    pytest.param("/identify", "user_id", 301, 30, 31, id="identify-user-301"),
    pytest.param("/identify", "user_id", 300, 30, None, id="identify-user-300-accepted"),
    pytest.param(BATCH, "user_id", 30_001, 1000, 1001, id="batch-user-30001"),
    pytest.param(BATCH, "device_id", 30_000, 1000, None, id="batch-device-30000-accepted"),
]


@pytest.mark.parametrize(("path", "id_field", "n", "threshold", "rate"), ONE_REQUEST_THROTTLE_CASES)
def test_given_one_request_over_threshold_x_window_for_one_id_when_posted_to_empty_window_then_429(
    amp, path, id_field, n, threshold, rate
):
    amp.emu.set_faults(max_events_per_request=40_000)
    r = send_for_one_id(amp, path, id_field, n)
    if rate is None:  # at or under threshold x window: a request is never throttled by itself
        assert r.status_code == 200
        return
    assert r.status_code == 429
    body = r.json()
    hot = "hot-user" if id_field == "user_id" else "hot-device"
    throttled = "throttled_users" if id_field == "user_id" else "throttled_devices"
    other = "throttled_devices" if id_field == "user_id" else "throttled_users"
    assert (body["code"], body["eps_threshold"]) == (429, threshold)
    assert (body[throttled], body[other]) == ({hot: rate}, {})
    assert body["throttled_events"] == list(range(n))  # the bystander's event is not listed
    assert_nothing_ingested(amp)
    assert send_for_one_id(amp, path, id_field, n).status_code == 429  # every time: split it


def test_given_eps_limit_disabled_when_bursting_then_accepted(amp):
    amp.emu.set_faults(per_user_eps_limit=False)
    for r in range(3):
        events = [ev(r * 500 + i, user_id="hot-user") for i in range(500)]
        assert amp.post_events(V2, events).status_code == 200


def test_given_daily_quota_user_when_batch_posted_then_429_with_exceeded_maps(amp):
    amp.emu.set_faults(daily_quota_users=["quota-user", "quota-device"])
    events = [
        ev(0),
        ev(1, user_id="quota-user"),
        ev(2, user_id="quota-user"),
        ev(3, user_id=None, device_id="quota-device"),
    ]
    r = amp.post_events(BATCH, events)
    assert r.status_code == 429
    assert r.json() == {
        "code": 429,
        "error": "Too many requests for some devices and users",
        "eps_threshold": 1000,
        "throttled_devices": {},
        "throttled_users": {},
        "exceeded_daily_quota_users": {"quota-user": 500_002},
        "exceeded_daily_quota_devices": {"quota-device": 500_001},
        "throttled_events": [1, 2, 3],
    }
    assert_nothing_ingested(amp)


def test_given_throttled_user_when_identified_through_form_api_then_429(amp):
    amp.emu.set_faults(throttled_users={"user-0007": time.time() + 60})
    r = amp.identify([{"user_id": "user-0001"}, {"user_id": "user-0007"}])
    assert r.status_code == 429
    assert r.json()["throttled_users"] == {"user-0007": 31}
    assert r.json()["throttled_events"] == [1]


# ----------------------------------------------------------------------------------------------
# Dedup
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EVENT_PATHS)
def test_given_same_insert_id_twice_when_posted_then_stored_once_counted_raw(amp, path):
    first = amp.post_events(path, [ev(0), ev(1)])
    again = amp.post_events(path, [ev(1), ev(2), ev(2)])
    assert first.json()["events_ingested"] == 2
    assert again.status_code == 200 and again.json()["events_ingested"] == 3
    c = amp.counts()
    assert (c["events_received"], c["events_unique"], c["duplicates"]) == (5, 3, 2)
    assert [e["insert_id"] for e in amp.state()["events"]] == ["ins-0", "ins-1", "ins-2"]
    assert amp.state()["users"]["user-0002"]["events"] == 1


def test_given_same_insert_id_on_other_device_or_key_when_posted_then_not_duplicate(amp):
    base = {"event_type": "x", "insert_id": "same"}
    amp.post_events(V2, [{**base, "device_id": "device-1"}])
    amp.post_events(V2, [{**base, "device_id": "device-2"}])
    amp.post_events(V2, [{**base, "device_id": "device-1"}], api_key="other-project")
    amp.post_events(V2, [{**base, "user_id": "user-0001"}])
    amp.post_events(V2, [{**base, "device_id": "device-1", "user_id": "user-0009"}])
    c = amp.counts()
    assert (c["events_unique"], c["duplicates"]) == (4, 1)


D1 = {"device_id": "device-0001"}
D2 = {"device_id": "device-0002"}
# (first path, first ids, second path, second ids, second api key, second is a duplicate)
INSERT_ID_SCOPE_CASES = [
    pytest.param(BATCH, D1, BATCH, D2, KEY, True, id="batch-other-device"),
    pytest.param(
        BATCH,
        {"user_id": "user-0001"},
        BATCH,
        {"user_id": "user-0002"},
        KEY,
        True,
        id="batch-other-user",
    ),
    pytest.param(BATCH, D1, BATCH, D2, "other-project", False, id="batch-other-project"),
    pytest.param(V2, D1, V2, D1, KEY, True, id="v2-same-device"),
    pytest.param(V2, D1, V2, D2, KEY, False, id="v2-other-device"),
    pytest.param(
        V2, {"user_id": "user-0001"}, V2, {"user_id": "user-0002"}, KEY, False, id="v2-other-user"
    ),
    pytest.param(V2, D1, BATCH, D2, KEY, True, id="v2-then-batch-other-device"),
    pytest.param(BATCH, D1, V2, D1, KEY, True, id="batch-then-v2-same-device"),
    pytest.param(BATCH, D1, V2, D2, KEY, False, id="batch-then-v2-other-device"),
]


@pytest.mark.parametrize(
    ("first_path", "first_ids", "second_path", "second_ids", "second_key", "duplicate"),
    INSERT_ID_SCOPE_CASES,
)
def test_given_insert_id_seen_when_sent_again_then_batch_dedups_per_project_v2_per_device(
    amp, first_path, first_ids, second_path, second_ids, second_key, duplicate
):
    base = {"event_type": "Order Picked Up", "insert_id": "order-1"}
    assert amp.post_events(first_path, [{**base, **first_ids}]).status_code == 200
    r = amp.post_events(second_path, [{**base, **second_ids}], api_key=second_key)
    assert r.status_code == 200 and r.json()["events_ingested"] == 1
    c = amp.counts()
    assert (c["events_unique"], c["duplicates"]) == ((1, 1) if duplicate else (2, 0))


def test_given_events_without_insert_id_when_resent_then_each_stored(amp):
    e = {"event_type": "x", "user_id": "user-0001"}
    amp.post_events(V2, [e, e])
    assert amp.counts()["events_unique"] == 2


# ----------------------------------------------------------------------------------------------
# Identify semantics
# ----------------------------------------------------------------------------------------------

OPS_CASES = [
    ({"a": 1}, {"$set": {"a": 2}}, {"a": 2}),
    ({"a": 1}, {"a": 3, "b": 4}, {"a": 3, "b": 4}),  # plain keys mean $set
    ({"a": 1}, {"$setOnce": {"a": 2, "b": 3}}, {"a": 1, "b": 3}),
    ({"n": 2}, {"$add": {"n": 3, "m": 1.5}}, {"n": 5, "m": 1.5}),
    ({"n": 2}, {"$add": {"n": -5}}, {"n": -3}),
    ({"l": [1]}, {"$append": {"l": [2, 3], "new": "x"}}, {"l": [1, 2, 3], "new": ["x"]}),
    ({"l": "a"}, {"$append": {"l": "b"}}, {"l": ["a", "b"]}),
    ({"l": [2]}, {"$prepend": {"l": [0, 1]}}, {"l": [0, 1, 2]}),
    ({"a": 1, "b": 2}, {"$unset": {"a": "-"}}, {"b": 2}),
    ({"l": [1, 2]}, {"$preInsert": {"l": [2, 0]}}, {"l": [0, 1, 2]}),
    ({"l": [1, 2]}, {"$postInsert": {"l": [1, 3, 3]}}, {"l": [1, 2, 3]}),
    ({"l": [1, 2, 1, 3]}, {"$remove": {"l": 1}}, {"l": [2, 3]}),
    ({"l": [1, 2, 3]}, {"$remove": {"l": [1, 3]}}, {"l": [2]}),
    ({"a": 1}, {"$clearAll": "-"}, {}),
    ({"a": 1}, {"$clearAll": "-", "$set": {"b": 2}}, {"b": 2}),  # $clearAll first
    ({"a": 1}, {"$unset": {"a": "-"}, "$setOnce": {"a": 9}}, {"a": 9}),  # $unset before $setOnce
    ({}, {"$set": {"n": 1}, "$add": {"n": 1}}, {"n": 2}),  # $set before $add
]


@pytest.mark.parametrize(("before", "ops", "after"), OPS_CASES)
def test_given_user_properties_when_identify_operation_applied_then_result(amp, before, ops, after):
    assert (
        amp.identify({"user_id": "user-0001", "user_properties": {"$set": before}}).text
        == "success"
    )
    r = amp.identify({"user_id": "user-0001", "user_properties": ops})
    assert (r.status_code, r.text) == (200, "success")
    assert amp.props("user-0001") == after


@pytest.mark.parametrize(("before", "ops", "after"), OPS_CASES)
def test_given_user_properties_when_identify_event_applied_then_same_result(
    amp, before, ops, after
):
    amp.post_events(
        BATCH,
        [
            {
                "event_type": "$identify",
                "user_id": "user-0001",
                "insert_id": "i1",
                "user_properties": {"$set": before},
            }
        ],
    )
    r = amp.post_events(
        BATCH,
        [
            {
                "event_type": "$identify",
                "user_id": "user-0001",
                "insert_id": "i2",
                "user_properties": ops,
            }
        ],
    )
    assert r.status_code == 200
    assert amp.props("user-0001") == after


def test_given_add_when_resent_through_identify_api_then_applied_twice(amp):
    amp.emu.set_faults(fail_next=[{"code": 500, "after_ingest": True, "path": "/identify"}])
    ident = {"user_id": "user-0001", "user_properties": {"$add": {"orders": 1}}}
    assert amp.identify(ident).status_code == 500
    assert amp.identify(ident).status_code == 200
    assert amp.props("user-0001") == {"orders": 2}
    assert amp.counts()["identifications"] == 2


def test_given_add_when_resent_as_identify_event_with_same_insert_id_then_applied_once(amp):
    amp.emu.set_faults(fail_next=[{"code": 500, "after_ingest": True}])
    event = {
        "event_type": "$identify",
        "user_id": "user-0001",
        "insert_id": "row-1",
        "user_properties": {"$add": {"orders": 1}},
    }
    assert amp.post_events(BATCH, [event]).status_code == 500
    assert amp.post_events(BATCH, [event]).status_code == 200
    assert amp.props("user-0001") == {"orders": 1}
    c = amp.counts()
    assert (c["events_received"], c["events_unique"], c["duplicates"]) == (2, 1, 1)


def test_given_identify_only_when_state_read_then_user_not_active_until_event(amp):
    amp.identify({"user_id": "user-0001", "user_properties": {"plan": "gold"}})
    amp.post_events(
        V2,
        [
            {
                "event_type": "$identify",
                "user_id": "user-0002",
                "user_properties": {"$set": {"plan": "silver"}},
            }
        ],
    )
    users = amp.state()["users"]
    assert users["user-0001"] == {"user_properties": {"plan": "gold"}, "active": False, "events": 0}
    assert users["user-0002"]["active"] is False
    amp.post_events(V2, [ev(1)])
    users = amp.state()["users"]
    assert users["user-0001"] == {"user_properties": {"plan": "gold"}, "active": True, "events": 1}


def test_given_event_user_properties_when_ingested_then_user_store_updated(amp):
    amp.post_events(
        V2,
        [
            ev(1, user_properties={"plan": "gold"}),
            ev(2, user_id="user-0001", user_properties={"$add": {"visits": 2}}),
            ev(
                3,
                user_id="user-0001",
                user_properties={"ignored": 1},
                **{"$skip_user_properties_sync": True},
            ),
        ],
    )
    user = amp.state()["users"]["user-0001"]
    assert user == {"user_properties": {"plan": "gold", "visits": 2}, "active": True, "events": 3}


def test_given_device_only_identify_when_applied_then_keyed_by_device_id(amp):
    amp.identify({"device_id": "device-0001", "user_properties": {"$set": {"os": "ios"}}})
    assert amp.props("device-0001") == {"os": "ios"}


@pytest.mark.parametrize(
    ("form", "status", "text"),
    [
        ({"api_key": KEY}, 400, "missing_event"),
        ({"api_key": KEY, "identification": "{oops"}, 400, "missing_event"),
        ({"api_key": KEY, "identification": "[]"}, 400, "missing_event"),
        ({"api_key": KEY, "identification": '"just a string"'}, 400, "missing_event"),
        (
            {"api_key": "invalid", "identification": '{"user_id": "user-0001"}'},
            400,
            "invalid_api_key",
        ),
        ({"identification": '{"user_id": "user-0001"}'}, 400, "invalid_api_key"),
        (
            {"api_key": KEY, "identification": '{"user_properties": {"a": 1}}'},
            400,
            "user_id or device_id",
        ),
        ({"api_key": KEY, "identification": '{"user_id": "null"}'}, 400, "user_id"),
        (
            {
                "api_key": KEY,
                "identification": '{"user_id": "user-0001", "user_properties": {"$set": {"a": 1}, "b": 2}}',
            },
            400,
            "cannot be mixed",
        ),
        (
            {
                "api_key": KEY,
                "identification": '{"user_id": "user-0001", "user_properties": {"$explode": {"a": 1}, "b": 2}}',
            },
            200,
            "success",
        ),  # unknown $-keys are plain property names
    ],
    ids=[
        "no-identification",
        "malformed-json",
        "empty-array",
        "not-an-object",
        "invalid-key",
        "missing-key",
        "no-ids",
        "placeholder-id",
        "mixed-ops",
        "dollar-plain",
    ],
)
def test_given_identify_form_when_posted_then_plain_text_answer(amp, form, status, text):
    r = amp.s.post(amp.url + "/identify", data=form, timeout=5)
    assert r.status_code == status
    assert r.headers["Content-Type"].startswith("text/plain")
    assert text in r.text


def test_given_identify_as_json_body_when_posted_then_400_and_nothing_applied(amp):
    r = amp.s.post(
        amp.url + "/identify",
        json={"api_key": KEY, "identification": {"user_id": "user-0001"}},
        timeout=5,
    )
    assert r.status_code == 400 and "missing_event" in r.text
    assert amp.state()["users"] == {}


def test_given_identification_array_multipart_or_get_when_sent_then_all_applied(amp):
    ident = orjson.dumps(
        [
            {"user_id": "user-0001", "user_properties": {"a": 1}},
            {"user_id": "user-0002", "user_properties": {"b": 2}},
        ]
    ).decode()
    r = amp.s.post(
        amp.url + "/identify/",
        files={"api_key": (None, KEY), "identification": (None, ident)},
        timeout=5,
    )
    assert (r.status_code, r.text) == (200, "success")
    r = amp.s.get(
        amp.url + "/identify",
        timeout=5,
        params={
            "api_key": KEY,
            "identification": '{"user_id": "user-0003", "user_properties": {"c": 3}}',
        },
    )
    assert (r.status_code, r.text) == (200, "success")
    users = amp.state()["users"]
    assert {u: users[u]["user_properties"] for u in users} == {
        "user-0001": {"a": 1},
        "user-0002": {"b": 2},
        "user-0003": {"c": 3},
    }


def test_given_2001_identifications_when_posted_then_413(amp):
    r = amp.identify([{"user_id": f"user-{i:05d}"} for i in range(2001)])
    assert r.status_code == 413 and r.json() == {"code": 413, "error": "Payload too large"}


# ----------------------------------------------------------------------------------------------
# Property-update budget (1,800 updates per user per hour, then dropped with a 200)
# ----------------------------------------------------------------------------------------------

ADD_ONE = {"$add": {"n": 1}}


def identify_api(amp, uid, i):
    r = amp.identify({"user_id": uid, "user_properties": ADD_ONE})
    assert (r.status_code, r.text) == (200, "success")


def identify_event(path):
    def send(amp, uid, i):
        e = {"event_type": "$identify", "user_id": uid, "insert_id": f"{uid}-{i}"}
        r = amp.post_events(path, [{**e, "user_properties": ADD_ONE}])
        assert (r.status_code, r.json()["events_ingested"]) == (200, 1)

    return send


def event_with_user_properties(amp, uid, i):
    r = amp.post_events(
        BATCH, [ev(i, user_id=uid, insert_id=f"{uid}-{i}", user_properties=ADD_ONE)]
    )
    assert (r.status_code, r.json()["events_ingested"]) == (200, 1)


UPDATE_KINDS = [
    pytest.param(identify_api, id="identify-api"),
    pytest.param(identify_event(BATCH), id="identify-event-batch"),
    pytest.param(identify_event(V2), id="identify-event-v2"),
    pytest.param(event_with_user_properties, id="event-with-user-properties"),
]


@pytest.mark.parametrize("send", UPDATE_KINDS)
def test_given_user_at_hourly_update_limit_when_updated_again_then_200_and_update_dropped(
    amp, send
):
    amp.s.post(amp.url + "/_emulator/faults", json={"user_updates_per_hour": 3}, timeout=5)
    for i in range(4):
        send(amp, "busy-user", i)
    send(amp, "calm-user", 0)
    state = amp.state()
    assert state["users"]["busy-user"]["user_properties"] == {"n": 3}
    assert state["users"]["calm-user"]["user_properties"] == {"n": 1}
    assert state["counts"]["user_updates_dropped"] == 1
    assert state["counts"]["user_updates_dropped_by_user"] == {"busy-user": 1}
    if send is event_with_user_properties:  # the event itself still counts
        assert state["users"]["busy-user"]["events"] == 4


def test_given_updates_of_every_kind_when_over_the_limit_then_they_share_one_budget(amp):
    amp.emu.set_faults(user_updates_per_hour=4)
    uid = "busy-user"
    identify_api(amp, uid, 0)  # 1
    identify_event(BATCH)(amp, uid, 1)  # 2
    event_with_user_properties(amp, uid, 2)  # 3
    amp.post_events(BATCH, [ev(3, user_id=uid)])  # no user_properties: not an update
    amp.post_events(
        BATCH,
        [ev(4, user_id=uid, user_properties=ADD_ONE, **{"$skip_user_properties_sync": True})],
    )  # skipped sync: not an update
    identify_event(BATCH)(amp, uid, 1)  # a duplicate insert_id: not an update
    identify_event(V2)(amp, uid, 5)  # 4
    identify_api(amp, uid, 6)  # dropped
    event_with_user_properties(amp, uid, 7)  # dropped
    state = amp.state()
    assert state["users"][uid]["user_properties"] == {"n": 4}
    assert state["users"][uid]["events"] == 4
    assert state["counts"]["user_updates_dropped_by_user"] == {uid: 2}


def test_given_default_limit_when_1801_updates_in_one_request_then_1800_applied(amp):
    assert Faults().user_updates_per_hour == 1800
    events = [
        {
            "event_type": "$identify",
            "user_id": "busy-user",
            "insert_id": f"i{i}",
            "user_properties": ADD_ONE,
        }
        for i in range(1801)
    ]
    assert amp.post_events(BATCH, events).status_code == 200
    assert amp.props("busy-user") == {"n": 1800}
    assert amp.counts()["user_updates_dropped"] == 1


def test_given_updates_older_than_an_hour_when_updated_then_budget_freed(amp):
    clock = [1000.0]
    amp.emu._clock = lambda: clock[0]  # the emulator's hour, moved by hand
    amp.emu.set_faults(user_updates_per_hour=2)
    for t, expected_n in [
        (1000.0, 1),
        (2000.0, 2),
        (4599.0, 2),  # two in the last hour: dropped
        (4600.5, 3),  # the one at 1000 is over an hour old
        (4601.0, 3),  # dropped updates did not count, but 2000 and 4600.5 still do
        (5600.5, 4),
    ]:
        clock[0] = t
        identify_api(amp, "busy-user", 0)
        assert amp.props("busy-user") == {"n": expected_n}, t
    assert amp.counts()["user_updates_dropped"] == 2


def test_given_dropped_updates_when_page_loaded_then_counts_and_user_rows_show_them(amp):
    amp.emu.set_faults(user_updates_per_hour=1)
    for i in range(3):
        identify_api(amp, "busy-user", i)
    identify_api(amp, "calm-user", 0)
    p = _Tables()
    p.feed(amp.s.get(amp.url + "/", timeout=5).text)
    counts = next(cells for _, cells in p.tables["counts"] if cells)
    assert counts["user-updates-dropped"] == "2"
    users = {a["data-user-id"]: c for a, c in p.tables["users"] if "data-user-id" in a}
    assert {u: c["updates-dropped"] for u, c in users.items()} == {
        "busy-user": "2",
        "calm-user": "0",
    }
    over = {a["data-user-id"]: c for a, c in p.tables["updates-dropped"] if "data-user-id" in a}
    assert {u: c["updates-dropped"] for u, c in over.items()} == {"busy-user": "2"}


# ----------------------------------------------------------------------------------------------
# Group identify
# ----------------------------------------------------------------------------------------------


def gid(value="Acme", props=None, gtype="org"):
    return {
        "group_type": gtype,
        "group_value": value,
        "group_properties": props if props is not None else {"plan": "enterprise"},
    }


def test_given_group_identify_when_posted_then_group_store_updated_and_add_twice_on_resend(amp):
    assert amp.identify(gid(), path="/groupidentify").text == "success"
    ops = {"$add": {"seats": 5}, "$append": {"tags": "vip"}, "$setOnce": {"plan": "free"}}
    amp.identify([gid(props=ops)], path="/groupidentify")
    amp.identify([gid(props=ops)], path="/groupidentify")
    groups = amp.state()["groups"]
    assert groups == {"org": {"Acme": {"plan": "enterprise", "seats": 10, "tags": ["vip", "vip"]}}}


@pytest.mark.parametrize(
    ("ident", "fragment"),
    [
        ({"group_value": "Acme", "group_properties": {"a": 1}}, "group_type"),
        ({"group_type": "org", "group_properties": {"a": 1}}, "group_value"),
        ({"group_type": "org", "group_value": "Acme"}, "group_properties"),
        (gid(props={"$remove": {"tags": "x"}}), "$remove"),
        (gid(props={"$preInsert": {"tags": "x"}}), "$preInsert"),
        (gid(props={"$clearAll": "-"}), "$clearAll"),
        (gid(props={"$set": {"a": 1}, "b": 2}), "cannot be mixed"),
    ],
)
def test_given_invalid_group_identification_when_posted_then_400(amp, ident, fragment):
    r = amp.identify([gid("Other"), ident], path="/groupidentify")
    assert r.status_code == 400
    assert fragment in r.text and "identification 1" in r.text
    assert amp.state()["groups"] == {}


def test_given_group_identify_over_limits_when_posted_then_413(amp):
    too_many = [gid(f"g{i}") for i in range(1025)]
    assert amp.identify(too_many, path="/groupidentify").status_code == 413
    ok = [gid(f"g{i}") for i in range(1024)]
    assert amp.identify(ok, path="/groupidentify").status_code == 200
    many_props = [
        gid("a", {f"p{i}": i for i in range(600)}),
        gid("b", {"$set": {f"p{i}": i for i in range(425)}}),
    ]
    assert amp.identify(many_props, path="/groupidentify").status_code == 413
    big = [gid(f"g{i}", {"note": "x" * 1000}) for i in range(1000)]
    r = amp.identify(big, path="/groupidentify")
    assert r.status_code == 413 and r.json()["code"] == 413


def test_given_groupidentify_event_when_ingested_then_each_group_value_updated(amp):
    r = amp.post_events(
        BATCH,
        [
            {
                "event_type": "$groupidentify",
                "insert_id": "g1",
                "groups": {"org": ["Acme", "Beta"], "team": "red"},
                "group_properties": {"$set": {"tier": 2}},
            }
        ],
    )
    assert r.status_code == 200
    assert amp.state()["groups"] == {
        "org": {"Acme": {"tier": 2}, "Beta": {"tier": 2}},
        "team": {"red": {"tier": 2}},
    }


@pytest.mark.parametrize("path", EVENT_PATHS)
def test_given_groupidentify_event_resent_after_500_after_ingest_when_posted_then_applied_once(
    amp, path
):
    amp.emu.set_faults(fail_next=[{"code": 500, "after_ingest": True}])
    event = {
        "event_type": "$groupidentify",
        "insert_id": "group-row-1",
        "groups": {"company": "Acme Ltd"},
        "group_properties": {"$add": {"seats": 5}, "$append": {"tags": "vip"}},
    }
    assert amp.post_events(path, [event]).status_code == 500
    assert amp.post_events(path, [event]).status_code == 200
    state = amp.state()
    assert state["groups"] == {"company": {"Acme Ltd": {"seats": 5, "tags": ["vip"]}}}
    assert state["users"] == {}  # no user or device id needed, none created
    c = state["counts"]
    assert (c["events_unique"], c["duplicates"], c["identifications"]) == (1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Faults
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [V2, BATCH, "/identify"])
def test_given_fail_before_when_posted_then_error_code_and_nothing_ingested(amp, path):
    amp.emu.set_faults(fail_before_rate=1.0, fail_codes=[503])
    if path == "/identify":
        r = amp.identify({"user_id": "user-0001", "user_properties": {"a": 1}})
    else:
        r = amp.post_events(path, [ev()])
    assert r.status_code == 503 and r.json()["code"] == 503
    assert_nothing_ingested(amp)
    assert amp.counts()["requests"][path] == {"503": 1}


def test_given_fail_after_when_posted_then_500_but_ingested_and_resend_is_duplicate(amp):
    amp.emu.set_faults(fail_after_rate=1.0)
    r = amp.post_events(BATCH, [ev(0), ev(1)])
    assert r.status_code == 500 and r.json()["code"] == 500
    assert amp.counts()["events_unique"] == 2
    amp.emu.set_faults(fail_after_rate=0.0)
    assert amp.post_events(BATCH, [ev(0), ev(1)]).status_code == 200
    c = amp.counts()
    assert (c["events_unique"], c["duplicates"]) == (2, 2)


def test_given_fail_after_when_request_invalid_then_still_400(amp):
    amp.emu.set_faults(fail_after_rate=1.0)
    assert amp.post_events(V2, [{"event_type": "x"}]).status_code == 400


def test_given_html_error_when_posted_then_non_json_502_page_and_nothing_ingested(amp):
    amp.emu.set_faults(html_error_rate=1.0)
    r = amp.post_events(V2, [ev()])
    assert r.status_code == 502
    assert r.headers["Content-Type"].startswith("text/html")
    assert "<center>nginx</center>" in r.text
    with pytest.raises(ValueError):
        r.json()
    assert_nothing_ingested(amp)


def test_given_reset_fault_when_posted_then_connection_error_and_nothing_ingested(amp):
    amp.emu.set_faults(reset_rate=1.0)
    with pytest.raises(requests.ConnectionError):
        amp.post_events(BATCH, [ev()])
    assert_nothing_ingested(amp)
    assert amp.counts()["requests"][BATCH] == {"reset": 1}


def test_given_slow_fault_when_client_times_out_then_not_ingested(amp):
    amp.emu.set_faults(slow_rate=1.0, slow_seconds=0.4)
    with pytest.raises(requests.Timeout):
        amp.s.post(amp.url + BATCH, json={"api_key": KEY, "events": [ev()]}, timeout=0.1)
    time.sleep(0.5)
    assert_nothing_ingested(amp)
    assert amp.counts()["requests"][BATCH] == {"504": 1}


def test_given_latency_when_posted_then_answer_is_delayed(amp):
    amp.emu.set_faults(latency_ms=150)
    t0 = time.perf_counter()
    assert amp.post_events(V2, [ev()]).status_code == 200
    assert time.perf_counter() - t0 >= 0.15


def test_given_fail_next_queue_when_requests_arrive_then_consumed_in_order_with_path_filter(amp):
    amp.emu.set_faults(
        fail_next=[
            {"code": 500, "after_ingest": True, "path": "/batch"},
            {"code": 403},
            {"html": True},
            {"reset": True},
        ]
    )
    r = amp.post_events(V2, [ev(0)])  # skips the /batch-only entry
    assert (r.status_code, r.json()) == (403, {"code": 403, "error": "Forbidden"})
    r = amp.post_events(BATCH, [ev(1)])
    assert r.status_code == 500
    assert amp.counts()["events_unique"] == 1  # ingested before the 500
    r = amp.post_events(V2, [ev(2)])
    assert r.status_code == 502 and r.headers["Content-Type"].startswith("text/html")
    with pytest.raises(requests.ConnectionError):
        amp.post_events(V2, [ev(3)])
    assert amp.post_events(V2, [ev(4)]).status_code == 200
    assert amp.emu.faults.fail_next == []
    assert amp.counts()["events_unique"] == 2


def test_given_fail_next_429_when_posted_then_throttle_shaped_body(amp):
    amp.emu.set_faults(fail_next=[{"code": 429}])
    r = amp.post_events(V2, [ev()])
    assert r.status_code == 429
    assert r.json()["throttled_events"] == [] and r.json()["code"] == 429


def test_given_down_when_any_api_called_then_503_until_turned_off(amp):
    amp.emu.set_faults(down=True)
    assert amp.post_events(V2, [ev()]).status_code == 503
    assert amp.post_events(BATCH, [ev()]).json() == {"code": 503, "error": "Service Unavailable"}
    assert amp.identify({"user_id": "user-0001"}).status_code == 503
    assert amp.identify(gid(), path="/groupidentify").status_code == 503
    assert_nothing_ingested(amp)
    amp.emu.set_faults(down=False)
    assert amp.post_events(V2, [ev()]).status_code == 200


def send_valid(amp, path, note="plain"):
    """One valid request to `path` whose body carries `note`."""
    if path == "/identify":
        return amp.identify({"user_id": "user-0001", "user_properties": {"note": note}})
    if path == "/groupidentify":
        return amp.identify(gid(props={"note": note}), path=path)
    return amp.post_events(path, [ev(0, event_properties={"note": note}), ev(1)])


def assert_html_page_not_ingested(amp, r, status, title):
    assert r.status_code == status
    assert r.headers["Content-Type"].startswith("text/html")
    assert f"<title>{title}</title>" in r.text
    with pytest.raises(ValueError):
        r.json()
    assert_nothing_ingested(amp)
    assert amp.state()["groups"] == {}


API_PATHS = [V2, BATCH, "/identify", "/groupidentify"]


@pytest.mark.parametrize("path", API_PATHS)
def test_given_gateway_html_400_rate_when_posted_then_nginx_400_page_and_nothing_ingested(
    amp, path
):
    r = amp.s.post(amp.url + "/_emulator/faults", json={"gateway_html_400_rate": 1.0}, timeout=5)
    assert r.json()["gateway_html_400_rate"] == 1.0
    r = send_valid(amp, path)
    assert_html_page_not_ingested(amp, r, 400, "400 Bad Request")
    assert "<center>nginx</center>" in r.text
    assert amp.counts()["requests"][path] == {"400": 1}
    assert "gateway_html_400" in amp.state()["rejected"][-1]["error"]
    amp.emu.set_faults(gateway_html_400_rate=0.0)
    assert send_valid(amp, path).status_code == 200


def test_given_fail_next_html_400_when_posted_then_one_gateway_page_then_accepted(amp):
    amp.emu.set_faults(fail_next=[{"code": 400, "html": True, "path": BATCH}])
    assert_html_page_not_ingested(amp, send_valid(amp, BATCH), 400, "400 Bad Request")
    assert send_valid(amp, BATCH).status_code == 200


BLOCKED = ["DROP TABLE", "<script>"]
# (path, the note a row carries, blocked?)
FIREWALL_CASES = [
    pytest.param(BATCH, "x'; DROP TABLE users; --", True, id="batch-sql"),
    pytest.param(V2, "<script>alert(1)</script>", True, id="v2-script"),
    pytest.param(V2, "drop table (other case)", False, id="v2-case-differs"),
    pytest.param(BATCH, "an ordinary note", False, id="batch-clean"),
    pytest.param("/identify", "<script>x</script>", True, id="identify-form-url-encoded"),
    pytest.param("/groupidentify", "DROP TABLE groups", True, id="groupidentify-form"),
    pytest.param("/identify", "an ordinary note", False, id="identify-clean"),
]


@pytest.mark.parametrize(("path", "note", "blocked"), FIREWALL_CASES)
def test_given_firewall_block_when_body_carries_blocked_text_then_html_403_and_nothing_ingested(
    amp, path, note, blocked
):
    amp.s.post(amp.url + "/_emulator/faults", json={"firewall_block": BLOCKED}, timeout=5)
    r = send_valid(amp, path, note)
    if not blocked:
        assert r.status_code == 200
        return
    assert_html_page_not_ingested(amp, r, 403, "403 Forbidden")
    rejected = amp.state()["rejected"][-1]
    assert (rejected["path"], rejected["status"]) == (path, 403)
    assert rejected["detail"]["matched"] in BLOCKED
    assert send_valid(amp, path, "an ordinary note").status_code == 200  # other rows go through


def test_given_firewall_block_all_when_any_api_called_then_html_403_until_turned_off(amp):
    amp.s.post(amp.url + "/_emulator/faults", json={"firewall_block_all": True}, timeout=5)
    for path in API_PATHS:  # (the emulator's own /_emulator pages stay reachable)
        assert_html_page_not_ingested(amp, send_valid(amp, path), 403, "403 Forbidden")
    assert amp.counts()["requests"] == {p: {"403": 1} for p in API_PATHS}
    amp.emu.set_faults(firewall_block_all=False)
    assert all(send_valid(amp, path).status_code == 200 for path in API_PATHS)


def test_given_fail_next_firewall_when_posted_then_one_html_403(amp):
    amp.emu.set_faults(fail_next=[{"firewall": True}])
    assert_html_page_not_ingested(amp, send_valid(amp, V2), 403, "403 Forbidden")
    assert send_valid(amp, V2).status_code == 200


@pytest.mark.parametrize(
    "change",
    [
        {"gateway_html_400_rate": 1.5},
        {"firewall_block": "DROP TABLE"},
        {"firewall_block": [""]},
        {"firewall_block": [7]},
        {"firewall_block_all": "yes"},
        {"user_updates_per_hour": -1},
        {"user_updates_per_hour": True},
        {"fail_next": [{"waf": True}]},
    ],
    ids=str,
)
def test_given_bad_value_for_a_new_fault_when_posted_then_400_and_faults_unchanged(amp, change):
    before = amp.s.get(amp.url + "/_emulator/faults", timeout=5).json()
    r = amp.s.post(amp.url + "/_emulator/faults", json=change, timeout=5)
    assert r.status_code == 400 and "error" in r.json()
    assert amp.s.get(amp.url + "/_emulator/faults", timeout=5).json() == before


def test_given_new_faults_when_read_then_defaults_and_settable_through_control_endpoint(amp):
    got = amp.s.get(amp.url + "/_emulator/faults", timeout=5).json()
    assert (
        got["gateway_html_400_rate"],
        got["firewall_block"],
        got["firewall_block_all"],
        got["user_updates_per_hour"],
    ) == (0.0, [], False, 1800)
    change = {"firewall_block": ["x"], "firewall_block_all": True, "user_updates_per_hour": None}
    got = amp.s.post(amp.url + "/_emulator/faults", json=change, timeout=5).json()
    assert {k: got[k] for k in change} == change


def test_given_same_seed_when_random_faults_then_same_sequence():
    def run():
        a = make_amp(Faults(fail_before_rate=0.5, seed=7))
        try:
            return [a.post_events(V2, [ev(i)]).status_code for i in range(20)]
        finally:
            a.emu.stop()

    first, second = run(), run()
    assert first == second
    assert 200 in first and any(code >= 500 for code in first)


def test_given_faults_endpoint_when_posted_then_merged_and_returned(amp):
    r = amp.s.post(
        amp.url + "/_emulator/faults", json={"latency_ms": 5, "fail_codes": [502]}, timeout=5
    )
    assert r.status_code == 200
    assert r.json()["latency_ms"] == 5 and r.json()["fail_codes"] == [502]
    r = amp.s.post(amp.url + "/_emulator/faults", json={"down": True}, timeout=5)
    got = amp.s.get(amp.url + "/_emulator/faults", timeout=5).json()
    assert got["down"] is True and got["latency_ms"] == 5
    bad = amp.s.post(amp.url + "/_emulator/faults", json={"no_such_fault": 1}, timeout=5)
    assert bad.status_code == 400 and "no_such_fault" in bad.json()["error"]
    bad = amp.s.post(amp.url + "/_emulator/faults", json={"fail_before_rate": 2}, timeout=5)
    assert bad.status_code == 400


# ----------------------------------------------------------------------------------------------
# State, reset, page
# ----------------------------------------------------------------------------------------------


def test_given_requests_with_api_key_when_state_and_page_read_then_key_never_shown(amp):
    secret = "sk-SECRET-4f9c2d71b8e6"
    amp.post_events(V2, [ev(0)], api_key=secret)
    amp.post_events(V2, [{"event_type": "x"}], api_key=secret)
    amp.identify({"user_id": "user-0002"}, api_key=secret)
    bad = make_amp(api_keys={"other"})
    try:
        r = bad.post_events(V2, [ev(0)], api_key=secret)
        assert r.json()["error"] == f"Invalid API key: {secret}"  # the API answer echoes it
        for a in (amp, bad):
            assert secret not in a.s.get(a.url + "/_emulator/state", timeout=5).text
            assert secret not in a.s.get(a.url + "/", timeout=5).text
            assert secret[:8] not in a.s.get(a.url + "/_emulator/state", timeout=5).text
        assert bad.state()["rejected"][0]["error"] == "Invalid API key: sk-S…"
    finally:
        bad.emu.stop()


def test_given_rejected_requests_when_state_read_then_reasons_listed(amp):
    amp.post_events(V2, [ev(0), {"event_type": "x"}])
    amp.post_events(V2, [ev(i) for i in range(2001)])
    rejected = amp.state()["rejected"]
    assert [(r["path"], r["status"]) for r in rejected] == [(V2, 400), (V2, 413)]
    assert rejected[0]["error"] == "Request missing required field"
    assert rejected[0]["detail"]["events_with_missing_fields"] == {"user_id": [1], "device_id": [1]}
    assert amp.counts()["requests"][V2] == {"400": 1, "413": 1}


def test_given_events_param_zero_when_state_read_then_event_list_omitted(amp):
    amp.post_events(V2, [ev(i) for i in range(5)])
    assert "events" not in amp.state(events=0)
    assert len(amp.state(events=2)["events"]) == 2
    assert len(amp.state()["events"]) == 5


def test_given_keep_events_when_many_sent_then_list_capped_but_counts_complete():
    a = make_amp(keep_events=3)
    try:
        a.post_events(BATCH, [ev(i) for i in range(10)])
        a.post_events(BATCH, [ev(i) for i in range(10)])
        state = a.state()
        assert [e["insert_id"] for e in state["events"]] == ["ins-7", "ins-8", "ins-9"]
        assert (state["counts"]["events_unique"], state["counts"]["duplicates"]) == (10, 10)
        assert len(a.emu.snapshot()["users"]) == 10
    finally:
        a.emu.stop()


def test_given_received_data_when_reset_endpoint_called_then_forgotten_but_faults_kept(amp):
    amp.post_events(V2, [ev(0, user_properties={"a": 1})])
    amp.identify(gid(), path="/groupidentify")
    amp.emu.set_faults(latency_ms=1)
    r = amp.s.post(amp.url + "/_emulator/reset", json={}, timeout=5)
    assert r.status_code == 200
    state = amp.state()
    assert state["users"] == {} and state["groups"] == {} and state["events"] == []
    assert state["counts"]["requests"] == {} and state["rejected"] == []
    assert state["faults"]["latency_ms"] == 1
    assert amp.post_events(V2, [ev(0)]).status_code == 200  # dedup memory forgotten too
    assert amp.counts()["events_unique"] == 1


class _Tables(HTMLParser):
    """Collect rows of the page's tables: {table_id: [(row_attrs, {cell_class: text})]}."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list] = {}
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = (a, {})
            self.tables[self._table].append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = a.get("class", "")
            self._row[1][self._cell] = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._row[1][self._cell] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "table":
            self._table = self._row = None


def test_given_received_data_when_page_loaded_then_tables_show_it_escaped(amp):
    evil = "<script>alert('x')</script> & co"
    amp.post_events(V2, [ev(1, user_properties={"note": evil}), ev(2), ev(3, event_type="Login")])
    amp.post_events(V2, [{"event_type": "x"}])
    r = amp.s.get(amp.url + "/", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "<script>" not in r.text and "&lt;script&gt;" in r.text
    p = _Tables()
    p.feed(r.text)
    users = {a["data-user-id"]: cells for a, cells in p.tables["users"] if "data-user-id" in a}
    assert set(users) == {"user-0001", "user-0002", "user-0003"}
    assert orjson.loads(users["user-0001"]["props"]) == {"note": evil}
    types = {
        a["data-event-type"]: cells
        for a, cells in p.tables["event-types"]
        if "data-event-type" in a
    }
    assert types["Order Picked Up"]["count"] == "2" and types["Login"]["count"] == "1"
    rejected = [cells for a, cells in p.tables["rejected"] if a.get("class") == "rejected"]
    assert len(rejected) == 1 and rejected[0]["error"] == "Request missing required field"


# ----------------------------------------------------------------------------------------------
# Standing apart, CLI
# ----------------------------------------------------------------------------------------------


def test_emulator_package_imports_nothing_from_the_tasks_package():
    imported = set()
    for path in (ROOT / "ampsync_emulator").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module or "")
    assert not [m for m in imported if m == "tasks" or m.startswith("tasks.")]
    assert "orjson" in imported


def test_given_cli_when_started_then_prints_url_serves_and_exits_0_on_ctrl_c():
    code = "import sys; from ampsync_emulator import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--max-events", "3"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("ampsync emulator listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        r = requests.post(
            url + "/batch", json={"api_key": KEY, "events": [ev(i) for i in range(4)]}, timeout=5
        )
        assert r.status_code == 413
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_given_faults_object_when_changed_after_start_then_applied_live():
    faults = Faults()
    a = make_amp(faults)
    try:
        faults.down = True
        assert a.post_events(V2, [ev()]).status_code == 503
        faults.down = False
        assert a.post_events(V2, [ev()]).status_code == 200
    finally:
        a.emu.stop()


def test_given_api_key_inside_an_event_when_stored_then_dropped_from_state(amp):
    amp.post_events(V2, [ev(0, api_key="sk-inside-event-123")])
    state = amp.s.get(amp.url + "/_emulator/state", timeout=5).text
    assert "sk-inside-event-123" not in state
    assert amp.state()["events"] == [ev(0)]


# ----------------------------------------------------------------------------------------------
# Control endpoints: this machine only, JSON only
# ----------------------------------------------------------------------------------------------

CONTROL_REQUESTS = [
    pytest.param("GET", "/_emulator/state", id="read what it holds"),
    pytest.param("GET", "/", id="the page"),
    pytest.param("POST", "/_emulator/faults", id="change the faults"),
    pytest.param("POST", "/_emulator/reset", id="forget what it holds"),
]


def _port(amp):
    return amp.url.rsplit(":", 1)[1]


def _held_and_faults(amp):
    return amp.emu.snapshot(events=False)["counts"]["events_received"], amp.emu.faults


@pytest.mark.parametrize(("method", "path"), CONTROL_REQUESTS)
def test_given_a_host_name_that_is_not_this_machine_when_a_control_endpoint_is_asked_then_403_and_nothing_changes(
    amp, method, path
):
    """DNS rebinding: a page's own host name resolves to 127.0.0.1, the browser sends it."""
    amp.post_events(V2, [ev(0)])
    before = _held_and_faults(amp)
    r = amp.s.request(
        method,
        amp.url + path,
        json={"down": True} if method == "POST" else None,
        headers={"Host": f"attacker.example:{_port(amp)}"},
        timeout=5,
    )
    assert r.status_code == 403
    assert "this machine only" in r.json()["error"]
    assert "user-0000" not in r.text  # nothing of what it holds
    assert _held_and_faults(amp) == before


@pytest.mark.parametrize("origin", ["http://attacker.example", "null", "https://10.0.0.5:8087"])
@pytest.mark.parametrize(("method", "path"), CONTROL_REQUESTS)
def test_given_a_cross_site_origin_when_a_control_endpoint_is_asked_then_403_and_nothing_changes(
    amp, method, path, origin
):
    amp.post_events(V2, [ev(0)])
    before = _held_and_faults(amp)
    r = amp.s.request(
        method,
        amp.url + path,
        json={"down": True} if method == "POST" else None,
        headers={"Origin": origin},
        timeout=5,
    )
    assert r.status_code == 403
    assert "cross-site" in r.json()["error"]
    assert _held_and_faults(amp) == before


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"down=true"),
        ("text/plain", b'{"down": true}'),
        ("multipart/form-data; boundary=x", b'--x\r\n\r\n{"down": true}\r\n--x--\r\n'),
        (None, b""),
    ],
    ids=["form", "text/plain JSON", "multipart", "no body, no type"],
)
@pytest.mark.parametrize("path", ["/_emulator/faults", "/_emulator/reset"])
def test_given_a_body_a_cross_site_form_can_send_when_posted_to_a_control_endpoint_then_415_and_nothing_changes(
    amp, path, content_type, body
):
    """A cross-site page can post these types without a CORS preflight; JSON needs one."""
    amp.post_events(V2, [ev(0)])
    before = _held_and_faults(amp)
    headers = {"Content-Type": content_type} if content_type else {}
    r = amp.s.post(amp.url + path, data=body, headers=headers, timeout=5)
    assert r.status_code == 415
    assert "application/json" in r.json()["error"]
    assert _held_and_faults(amp) == before


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "127.0.0.2", "[::1]"], ids=lambda h: h.strip("[]")
)
def test_given_this_machine_as_host_and_origin_when_control_endpoints_are_used_then_they_work(
    amp, host
):
    port = _port(amp)
    headers = {"Host": f"{host}:{port}", "Origin": f"http://{host}:{port}"}
    amp.post_events(V2, [ev(0)])
    assert amp.s.get(amp.url + "/", headers=headers, timeout=5).status_code == 200
    r = amp.s.post(amp.url + "/_emulator/faults", json={"down": True}, headers=headers, timeout=5)
    assert r.status_code == 200 and r.json()["down"] is True
    assert amp.emu.faults.down is True
    r = amp.s.post(amp.url + "/_emulator/reset", json={}, headers=headers, timeout=5)
    assert r.status_code == 200
    assert amp.emu.snapshot(events=False)["counts"]["events_received"] == 0


def test_given_a_reset_with_a_json_body_that_is_not_an_object_when_posted_then_400_and_nothing_is_forgotten(
    amp,
):
    amp.post_events(V2, [ev(0)])
    r = amp.post_raw("/_emulator/reset", b"[1]")
    assert r.status_code == 400
    assert amp.counts()["events_received"] == 1


def test_given_the_service_name_as_host_when_an_api_path_is_called_then_it_answers_as_amplitude(
    amp,
):
    """Workers reach the compose trial's emulator as http://emulator:8087: the API paths
    answer whatever the Host, only the page and the control endpoints are this machine's."""
    r = amp.s.post(
        amp.url + BATCH,
        json={"api_key": KEY, "events": [ev(0)]},
        headers={"Host": f"emulator:{_port(amp)}"},
        timeout=5,
    )
    assert r.status_code == 200
    assert amp.counts()["events_received"] == 1
