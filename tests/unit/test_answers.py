"""What each answer of Amplitude means for the rows of a request (tasks/amplitude/answers.read):
one verdict per answer, with the rows it names."""

from __future__ import annotations

import pytest

from tasks.amplitude.answers import Verdict, read
from tasks.amplitude.client import Answer
from tasks.amplitude.limits import Endpoint
from tasks.amplitude.payloads import Prepared

EVENT_ENDPOINTS = [Endpoint.BATCH, Endpoint.HTTP_V2]
FORM_ENDPOINTS = [Endpoint.IDENTIFY, Endpoint.GROUP_IDENTIFY]
ALL_ENDPOINTS = EVENT_ENDPOINTS + FORM_ENDPOINTS


def request(n: int = 4) -> list[Prepared]:
    """n items with distinct users u-0… and devices d-0…; item 3 has a device only."""
    return [
        Prepared(
            row_id=100 + i,
            blob=b'{"event_type":"e"}',
            user_id=None if i == 3 else f"u-{i}",
            device_id=f"d-{i}",
        )
        for i in range(n)
    ]


def answer(status: int, body: dict | None = None, text: str | None = None) -> Answer:
    """As the client builds it: a JSON body's text is its `error`."""
    if text is None:
        text = str(body.get("error", "")) if body is not None else ""
    return Answer(status, body, text)


# --- 2xx ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("the_answer", "endpoint"),
    [
        (answer(200, {"code": 200, "events_ingested": 4}), Endpoint.BATCH),
        (answer(200, {"code": 200, "events_ingested": 4}), Endpoint.HTTP_V2),
        (answer(200, {"code": 200}), Endpoint.IDENTIFY),
        (answer(202, {}), Endpoint.BATCH),
        (answer(200, {"code": "ok"}), Endpoint.HTTP_V2),
        (answer(200, None, "success"), Endpoint.IDENTIFY),
        (answer(200, None, "success"), Endpoint.GROUP_IDENTIFY),
        (answer(200, None, " Success\n"), Endpoint.IDENTIFY),
    ],
    ids=[
        "batch JSON 200",
        "http_v2 JSON 200",
        "identify JSON 200",
        "202 without code",
        "non-integer body code",
        "identify plain success",
        "groupidentify plain success",
        "form success in any case, padded",
    ],
)
def test_given_a_2xx_acceptance_when_read_then_the_whole_request_is_sent(the_answer, endpoint):
    reading = read(the_answer, request(), endpoint)
    assert reading.verdict is Verdict.SENT
    assert (reading.rejected, reading.throttled, reading.daily_quota) == ({}, set(), set())


@pytest.mark.parametrize("endpoint", EVENT_ENDPOINTS, ids=str)
@pytest.mark.parametrize(
    "text", ["success", "<html>proxy ok</html>", ""], ids=["success", "html", "empty"]
)
def test_given_a_2xx_non_json_answer_on_an_event_endpoint_when_read_then_it_is_transient(
    endpoint, text
):
    reading = read(answer(200, None, text), request(), endpoint)
    assert reading.verdict is Verdict.TRANSIENT
    assert reading.reason.startswith("HTTP 200 with a non-JSON body")


@pytest.mark.parametrize("endpoint", FORM_ENDPOINTS, ids=str)
@pytest.mark.parametrize(
    ("status", "text"),
    [
        (200, ""),
        (200, "ok"),
        (200, "successful"),
        (200, "<html><body>success</body></html>"),
        (202, "Accepted"),
    ],
    ids=["empty", "ok", "successful", "html page saying success", "202 other text"],
)
def test_given_a_2xx_form_answer_other_than_success_when_read_then_it_is_transient_not_sent(
    endpoint, status, text
):
    """The form APIs answer exactly `success`: any other 2xx text is a proxy's, and nothing
    says Amplitude got the rows."""
    reading = read(answer(status, None, text), request(), endpoint)
    assert reading.verdict is Verdict.TRANSIENT
    assert reading.reason == f"HTTP {status} with a non-JSON body: {text}"


@pytest.mark.parametrize(
    ("code", "body_extra", "verdict"),
    [
        (400, {}, Verdict.SPLIT),
        (400, {"events_with_invalid_fields": {"time": [1]}}, Verdict.REJECTED_ROWS),
        (413, {}, Verdict.TOO_LARGE),
        (429, {"throttled_users": {"u-0": 40}}, Verdict.THROTTLED),
        (500, {}, Verdict.TRANSIENT),
        (403, {}, Verdict.BLOCKED),
        (404, {}, Verdict.PAUSE),
    ],
    ids=["400", "400 naming a row", "413", "429", "500", "403", "404"],
)
def test_given_a_2xx_whose_body_code_is_not_2xx_when_read_then_the_body_code_decides(
    code, body_extra, verdict
):
    body = {"code": code, "error": "from the body", **body_extra}
    reading = read(answer(200, body), request(), Endpoint.BATCH)
    assert reading.verdict is verdict


# --- 400 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    ["Invalid API key: abc", "invalid api key", "INVALID API KEY", "error: invalid_api_key"],
    ids=["capitalised", "lower", "upper", "snake case anywhere"],
)
@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
def test_given_a_400_invalid_api_key_when_read_then_the_endpoint_pauses(error, endpoint):
    body = {"code": 400, "error": error, "events_with_invalid_fields": {"time": [0]}}
    reading = read(answer(400, body), request(), endpoint)
    assert reading.verdict is Verdict.PAUSE
    assert "AMPLITUDE_API_KEY" in reading.reason
    assert reading.rejected == {}


ERR = "Request missing required field"
ROWS_1 = {"events_with_invalid_fields": {"time": [9]}}  # an index past every request here


@pytest.mark.parametrize(
    ("fields", "rejected"),
    [
        (
            {"events_with_invalid_fields": {"time": [0, 2]}},
            {0: f"time: invalid fields ({ERR})", 2: f"time: invalid fields ({ERR})"},
        ),
        (
            {"events_with_missing_fields": {"event_type": [1]}},
            {1: f"event_type: missing fields ({ERR})"},
        ),
        (
            {"events_with_invalid_id_lengths": {"user_id": [3], "device_id": [0]}},
            {
                3: f"user_id: invalid id lengths ({ERR})",
                0: f"device_id: invalid id lengths ({ERR})",
            },
        ),
        (
            {"silenced_events": [1, 2]},
            {
                1: f"device silenced by Amplitude ({ERR})",
                2: f"device silenced by Amplitude ({ERR})",
            },
        ),
        (
            {"events_with_invalid_fields": {"time": 2}},
            {2: f"time: invalid fields ({ERR})"},
        ),
        (
            {
                "events_with_missing_fields": {"event_type": [1]},
                "events_with_invalid_fields": {"time": [1, 2]},
                "silenced_events": [2, 3],
            },
            {
                1: f"event_type: missing fields ({ERR})",
                2: f"time: invalid fields ({ERR})",
                3: f"device silenced by Amplitude ({ERR})",
            },
        ),
        (
            {"events_with_invalid_fields": {"time": [1, 4, -1, 99, "2", None]}},
            {1: f"time: invalid fields ({ERR})"},
        ),
    ],
    ids=[
        "invalid fields",
        "missing fields",
        "invalid id lengths, two fields",
        "silenced events",
        "a bare index",
        "first listed reason wins per row",
        "out-of-range and non-integer indexes ignored",
    ],
)
@pytest.mark.parametrize("endpoint", EVENT_ENDPOINTS, ids=str)
def test_given_a_400_naming_rows_when_read_then_exactly_those_rows_are_rejected_with_reasons(
    fields, rejected, endpoint
):
    body = {"code": 400, "error": ERR, **fields}
    reading = read(answer(400, body), request(4), endpoint)
    assert reading.verdict is Verdict.REJECTED_ROWS
    assert reading.rejected == rejected
    assert reading.reason == ERR


@pytest.mark.parametrize(
    ("the_answer", "reason"),
    [
        (answer(400, {"code": 400, "error": ERR}), f"HTTP 400: {ERR}"),
        (answer(400, {"code": 400, "error": ERR, "silenced_events": []}), f"HTTP 400: {ERR}"),
        (
            answer(400, {"code": 400, "error": ERR, "events_with_invalid_fields": {"t": [4, 9]}}),
            f"HTTP 400: {ERR}",
        ),
        (
            answer(400, {"code": 400, "error": ERR, "missing_field": "event_type", **ROWS_1}),
            f"HTTP 400: {ERR}",
        ),
    ],
    ids=[
        "no index lists",
        "empty silenced list",
        "only indexes past the request",
        "missing_field with event indexes past the request",
    ],
)
@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
def test_given_a_json_400_naming_no_row_of_the_request_when_read_then_the_request_is_split(
    the_answer, reason, endpoint
):
    reading = read(the_answer, request(4), endpoint)
    assert reading.verdict is Verdict.SPLIT
    assert reading.reason == reason
    assert reading.rejected == {}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Bad Request", "HTTP 400: Bad Request"),
        ("", "HTTP 400: HTTP 400"),
        ("invalid user_id: short", "HTTP 400: invalid user_id: short"),
    ],
    ids=["plain text", "empty", "plain text about a field"],
)
@pytest.mark.parametrize("endpoint", FORM_ENDPOINTS, ids=str)
def test_given_a_plain_text_400_on_a_form_endpoint_when_read_then_the_request_is_split(
    text, reason, endpoint
):
    """The form APIs answer plain text: a text 400 is Amplitude's, about some row."""
    reading = read(answer(400, None, text), request(4), endpoint)
    assert reading.verdict is Verdict.SPLIT
    assert reading.reason == reason
    assert reading.rejected == {}


@pytest.mark.parametrize(
    "error",
    [
        "Invalid request path",
        "Missing request body",
        "Invalid JSON request body",
        "INVALID REQUEST PATH: /x/batch",
        "invalid json request body: expecting value",
    ],
    ids=["path", "no body", "non-JSON body", "upper case, with detail", "lower case, with detail"],
)
@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
def test_given_a_400_about_the_whole_request_when_read_then_the_endpoint_pauses_failing_no_row(
    error, as_json, endpoint
):
    body = {"code": 400, "error": error, **ROWS_1} if as_json else None
    reading = read(answer(400, body, error), request(4), endpoint)
    assert reading.verdict is Verdict.PAUSE
    assert reading.rejected == {}
    if as_json or endpoint in FORM_ENDPOINTS:
        assert reading.reason == (
            f"HTTP 400 for the whole request, not a row: {error} (check AMPLITUDE_SERVER_URL "
            "and any proxy in the way)"
        )
    else:  # the event APIs answer JSON: this text is a page from something in between
        assert reading.reason.startswith("HTTP 400 with a page that is not Amplitude's answer")
        assert reading.reason.endswith(f": {error}")


@pytest.mark.parametrize(
    ("field", "extra"),
    [
        ("api_key", {}),
        ("events", {"silenced_events": []}),
        ("api_key", {"events_with_invalid_fields": {}}),
    ],
    ids=["api_key", "events, empty silenced list", "empty index map"],
)
@pytest.mark.parametrize("endpoint", EVENT_ENDPOINTS, ids=str)
def test_given_a_400_missing_field_naming_no_event_when_read_then_the_endpoint_pauses(
    field, extra, endpoint
):
    body = {"code": 400, "error": ERR, "missing_field": field, **extra}
    reading = read(answer(400, body), request(4), endpoint)
    assert reading.verdict is Verdict.PAUSE
    assert reading.reason == f"HTTP 400: the request lacks {field}: {ERR}"
    assert reading.rejected == {}


@pytest.mark.parametrize("endpoint", EVENT_ENDPOINTS, ids=str)
def test_given_a_400_missing_field_with_event_indexes_when_read_then_those_rows_are_rejected(
    endpoint,
):
    body = {
        "code": 400,
        "error": ERR,
        "missing_field": "event_type",
        "events_with_missing_fields": {"event_type": [2]},
    }
    reading = read(answer(400, body), request(4), endpoint)
    assert reading.verdict is Verdict.REJECTED_ROWS
    assert reading.rejected == {2: f"event_type: missing fields ({ERR})"}


PAGES = {
    "html": "<html><body><h1>400 Bad Request</h1></body></html>",
    "doctype": "<!DOCTYPE html><html><title>Bad Request</title></html>",
    "upper case, indented": "  <HTML>gateway</HTML>",
    "head": "<head><title>400</title></head>",
    "body": "<body>nope</body>",
}
NOT_JSON = {"plain text": "Bad Request", "empty": ""}


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        pytest.param(text, endpoint, id=f"{name} on {endpoint}")
        for name, text in PAGES.items()
        for endpoint in ALL_ENDPOINTS
    ]
    + [
        pytest.param(text, endpoint, id=f"{name} on {endpoint}")
        for name, text in NOT_JSON.items()
        for endpoint in EVENT_ENDPOINTS
    ],
)
def test_given_a_400_that_is_not_amplitudes_answer_when_read_then_the_endpoint_pauses(
    text, endpoint
):
    """Event APIs answer JSON and form APIs plain text: an HTML page (or, on the event APIs,
    anything not JSON) is a gateway's, and halving cannot help."""
    reading = read(answer(400, None, text), request(4), endpoint)
    assert reading.verdict is Verdict.PAUSE
    assert reading.reason == (
        "HTTP 400 with a page that is not Amplitude's answer (a proxy or gateway in the "
        f"way? check AMPLITUDE_SERVER_URL): {text or 'HTTP 400'}"
    )
    assert reading.rejected == {}


@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
def test_given_a_413_when_read_then_the_request_is_too_large_and_halves(endpoint):
    body = {"code": 413, "error": "Payload too large"}
    reading = read(answer(413, body), request(), endpoint)
    assert reading.verdict is Verdict.TOO_LARGE
    assert reading.reason == "HTTP 413: Payload too large"
    assert reading.rejected == {}


# --- 429 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "throttled", "daily_quota"),
    [
        ({"throttled_users": {"u-1": 31}}, {1}, set()),
        ({"throttled_users": {"u-0": 31, "u-2": 12}}, {0, 2}, set()),
        ({"throttled_devices": {"d-3": 40}}, {3}, set()),
        ({"throttled_events": [0, 2]}, {0, 2}, set()),
        ({"throttled_events": [1, 7, -1, "0"]}, {1}, set()),
        ({"throttled_users": {"u-0": 1}, "throttled_events": [3]}, {0, 3}, set()),
        ({"exceeded_daily_quota_users": {"u-2": 1}}, set(), {2}),
        ({"exceeded_daily_quota_devices": {"d-3": 1}}, set(), {3}),
        (
            {"throttled_users": {"u-0": 1, "u-1": 1}, "exceeded_daily_quota_users": {"u-1": 1}},
            {0},
            {1},
        ),
        ({}, {0, 1, 2, 3}, set()),
        ({"throttled_users": {"someone-else": 5}}, {0, 1, 2, 3}, set()),
    ],
    ids=[
        "throttled user",
        "two throttled users",
        "throttled device",
        "throttled event indexes",
        "out-of-range and non-integer event indexes ignored",
        "users and events together",
        "user over daily quota",
        "device over daily quota",
        "daily quota wins over throttled",
        "naming nobody: everyone waits",
        "naming only users not in the request: everyone waits",
    ],
)
@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
def test_given_a_429_when_read_then_the_named_rows_wait_and_the_rest_may_go_on(
    fields, throttled, daily_quota, endpoint
):
    body = {"code": 429, "error": "Too many requests for some devices and users", **fields}
    reading = read(answer(429, body), request(4), endpoint)
    assert reading.verdict is Verdict.THROTTLED
    assert reading.throttled == throttled
    assert reading.daily_quota == daily_quota
    assert reading.reason == "HTTP 429: Too many requests for some devices and users"


# --- firewall, server errors, no answer, other 4xx ---------------------------------------------


@pytest.mark.parametrize(
    ("the_answer", "reason"),
    [
        (answer(403, None, "Forbidden"), "Forbidden"),
        (answer(403, None, "<html>Request blocked</html>"), "<html>Request blocked</html>"),
        (answer(403, {"code": 403, "error": "Forbidden"}), "Forbidden"),
        (answer(403, None, ""), "HTTP 403"),
    ],
    ids=["text", "html page", "json", "empty"],
)
@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
def test_given_a_403_when_read_then_the_request_is_blocked_and_halves_to_find_the_row(
    the_answer, reason, endpoint
):
    reading = read(the_answer, request(), endpoint)
    assert reading.verdict is Verdict.BLOCKED
    assert reading.reason == f"HTTP 403 from Amplitude's firewall: {reason}"
    assert reading.rejected == {}


@pytest.mark.parametrize(
    ("the_answer", "reason"),
    [
        (answer(500, {"code": 500, "error": "boom"}), "HTTP 500: boom"),
        (answer(502, None, "Bad Gateway"), "HTTP 502: Bad Gateway"),
        (answer(503, None, "Service Unavailable"), "HTTP 503: Service Unavailable"),
        (answer(504, None, ""), "HTTP 504: HTTP 504"),
        (answer(408, None, "Request Timeout"), "HTTP 408: Request Timeout"),
        (
            answer(0, None, "no answer from http://x/batch within 30 s"),
            "no answer from http://x/batch within 30 s",
        ),
        (answer(0, None, "cannot reach http://x: ConnectionRefusedError"), None),
    ],
    ids=["500 JSON", "502", "503", "504 empty", "408", "timeout (status 0)", "refused (status 0)"],
)
@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
def test_given_a_server_error_timeout_or_no_answer_when_read_then_it_is_transient(
    the_answer, reason, endpoint
):
    reading = read(the_answer, request(), endpoint)
    assert reading.verdict is Verdict.TRANSIENT
    assert reading.reason == (reason if reason is not None else the_answer.text)


@pytest.mark.parametrize("status", [401, 404, 405, 409, 415, 422], ids=str)
@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=str)
def test_given_another_4xx_when_read_then_the_endpoint_pauses_naming_the_server_url(
    status, endpoint
):
    reading = read(answer(status, None, "Not Found"), request(), endpoint)
    assert reading.verdict is Verdict.PAUSE
    assert reading.reason == (
        f"HTTP {status} from {endpoint}: Not Found (check AMPLITUDE_SERVER_URL)"
    )
