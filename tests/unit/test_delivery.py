"""Delivery (tasks/delivery/send.py) driven answer by answer: each answer is read with
amplitude.answers.read and judged, as a send does, and applied to the batch's acknowledgement;
`drive` is the loop of `deliver` without I/O, its answers scripted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import pytest

from tasks.amplitude.answers import Verdict, read
from tasks.amplitude.client import Answer
from tasks.amplitude.limits import Endpoint
from tasks.amplitude.payloads import Prepared, Row
from tasks.db.queue import Acknowledgement
from tasks.delivery.results import SendResult
from tasks.delivery.send import Delivery, keys, retry
from tasks.outcomes import GAVE_UP, REJECTED, RETRYING
from tasks.settings import Settings

THROTTLE_V2 = 31.0
THROTTLE_BATCH = 7.0
DAILY_QUOTA = 3600.0
BACKOFF_BASE = 2.0
BACKOFF_MAX = 100.0
BACKOFF_MAX_5XX = 30.0
BACKOFF_BASE_5XX = 0.5
MAX_ATTEMPTS = 10


def settings(batch_size: int | None = None) -> Settings:
    """Every knob Delivery reads, explicit: nothing comes from the environment."""
    return Settings(
        _env_file=None,
        AMPSYNC_BATCH_SIZE=batch_size,
        AMPSYNC_EVENTS_PER_SECOND=0,
        AMPSYNC_MAX_ATTEMPTS=MAX_ATTEMPTS,
        AMPSYNC_BACKOFF_BASE=BACKOFF_BASE,
        AMPSYNC_BACKOFF_MAX=BACKOFF_MAX,
        AMPSYNC_BACKOFF_MAX_5XX=BACKOFF_MAX_5XX,
        AMPSYNC_BACKOFF_BASE_5XX=BACKOFF_BASE_5XX,
        AMPSYNC_THROTTLE_WAIT_V2=THROTTLE_V2,
        AMPSYNC_THROTTLE_WAIT_BATCH=THROTTLE_BATCH,
        AMPSYNC_DAILY_QUOTA_WAIT=DAILY_QUOTA,
    )


def row(row_id: int, attempts: int = 1) -> Row:
    now = datetime(2025, 1, 1)
    return Row(row_id, "event", None, None, "e", now, None, None, None, None, None, attempts, now)


def item(row_id: int, user: str | None = None, device: str | None = None) -> Prepared:
    if user is None and device is None:
        user = f"user-{row_id}"
    return Prepared(row_id, b'{"event_type":"e"}', user, device)


# --- answers, as the client builds them --------------------------------------------------------

OK = Answer(200, {"code": 200}, "")


def bad_rows(**fields) -> Answer:
    return Answer(
        400, {"code": 400, "error": "Invalid field values", **fields}, "Invalid field values"
    )


def too_large() -> Answer:
    return Answer(413, {"code": 413, "error": "Payload too large"}, "Payload too large")


def throttled(**fields) -> Answer:
    return Answer(429, {"code": 429, "error": "Too many requests", **fields}, "Too many requests")


SERVER_ERROR = Answer(500, {"code": 500, "error": "boom"}, "boom")
NO_ANSWER = Answer(0, None, "no answer from http://amplitude/batch within 30 s")
BAD_KEY = Answer(400, {"code": 400, "error": "Invalid API key: ***"}, "Invalid API key: ***")
FORBIDDEN = Answer(403, None, "Forbidden")
BAD_REQUEST = Answer(400, {"code": 400, "error": "Bad request"}, "Bad request")
WRONG_PATH = Answer(400, {"code": 400, "error": "Invalid request path"}, "Invalid request path")
GATEWAY_PAGE = Answer(400, None, "<html><h1>400 Bad Request</h1></html>")

# What each refusal of a row says in its reason, and in the pause it may become.
BLOCKED_WHY = "HTTP 403 from Amplitude's firewall: Forbidden"
BAD_REQUEST_WHY = "HTTP 400: Bad request"
TOO_LARGE_WHY = "HTTP 413: Payload too large"
BOTH_HALVES = (
    "(both halves of the request were refused the same way: the request is refused, not a row)"
)


def refusing(bad: set[int], refusal: Answer) -> Callable[[list[Prepared]], Answer]:
    """A server that refuses every request holding one of the `bad` rows, and takes the rest."""
    return lambda request: refusal if bad & {i.row_id for i in request} else OK


@dataclass
class Run:
    ack: Acknowledgement
    result: SendResult
    requests: list[list[int]]  # the row ids of each request, in the order sent
    throttled_keys: set[str]  # users and devices other batches are told to hold back


def drive(
    items: list[Prepared],
    answer_for: Callable[[list[Prepared]], Answer] | list[Answer],
    rows: list[Row] | None = None,
    endpoint: str = Endpoint.BATCH,
    batch_size: int | None = None,
    pause_for: Callable[[Verdict], float] = lambda verdict: 0.0,
) -> Run:
    """Send the items as `deliver` does, with answers given by a function or in order;
    `pause_for` stands for the endpoint's failure tally, asked only on a failure as `deliver`
    asks it."""
    ack = Acknowledgement(sent=[], failed={}, retry={})
    result = SendResult(kind="event", token="t", endpoint=endpoint)
    rows = rows if rows is not None else [row(i.row_id) for i in items]
    delivery = Delivery(settings(batch_size), endpoint, ack, rows, result)
    delivery.plan(items)
    queued = list(answer_for) if isinstance(answer_for, list) else None
    sent: list[list[int]] = []
    while (request := delivery.next_request()) is not None:
        assert len(sent) < 100, "delivery does not end"
        sent.append([i.row_id for i in request])
        answer = queued.pop(0) if queued is not None else answer_for(request)
        reading = delivery.judge(read(answer, request, endpoint))
        pause = 0.0
        if reading.verdict in (Verdict.TRANSIENT, Verdict.PAUSE):
            pause = pause_for(reading.verdict)
        delivery.apply(answer.status, reading, request, pause)
    delivery.finish()
    if queued is not None:
        assert queued == [], "answers left unused"
    return Run(ack, result, sent, delivery.throttled_keys)


def retried(ack: Acknowledgement) -> dict[int, tuple[float, bool, str]]:
    """row id -> (delay, refund, reason); a row is retried once at most."""
    out: dict[int, tuple[float, bool, str]] = {}
    for key, ids in ack.retry.items():
        for i in ids:
            assert i not in out, f"row {i} retried twice"
            out[i] = key
    return out


def assert_every_row_once(run: Run, ids: list[int]) -> None:
    outcomes = run.ack.sent + list(run.ack.failed) + list(retried(run.ack))
    assert sorted(outcomes) == sorted(ids), "every row ends exactly once"


# --- all sent ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch_size", "requests"),
    [
        (1, None, [[1]]),
        (5, None, [[1, 2, 3, 4, 5]]),
        (5, 2, [[1, 2], [3, 4], [5]]),
        (4, 1, [[1], [2], [3], [4]]),
    ],
    ids=["one row", "one request", "three requests in order", "one row per request"],
)
def test_given_every_answer_is_200_when_delivering_then_all_rows_are_sent_in_order(
    n, batch_size, requests
):
    items = [item(i) for i in range(1, n + 1)]
    run = drive(items, lambda request: OK, batch_size=batch_size)
    assert run.requests == requests
    assert run.ack.sent == list(range(1, n + 1))
    assert run.ack.failed == {} and run.ack.retry == {}
    assert run.result.requests == len(requests)
    assert run.result.answers == {"200": len(requests)}
    assert run.result.paused is None


# --- rejected rows -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "failed", "requests", "sent"),
    [
        (
            {"events_with_invalid_fields": {"time": [1]}},
            {2: f"{REJECTED} time: invalid fields (Invalid field values)"},
            [[1, 2, 3], [1, 3], [4, 5, 6]],
            [1, 3, 4, 5, 6],
        ),
        (
            {"silenced_events": [0, 2]},
            {
                1: f"{REJECTED} device silenced by Amplitude (Invalid field values)",
                3: f"{REJECTED} device silenced by Amplitude (Invalid field values)",
            },
            [[1, 2, 3], [2], [4, 5, 6]],
            [2, 4, 5, 6],
        ),
        (
            {"events_with_missing_fields": {"event_type": [0, 1, 2]}},
            {
                1: f"{REJECTED} event_type: missing fields (Invalid field values)",
                2: f"{REJECTED} event_type: missing fields (Invalid field values)",
                3: f"{REJECTED} event_type: missing fields (Invalid field values)",
            },
            [[1, 2, 3], [4, 5, 6]],
            [4, 5, 6],
        ),
    ],
    ids=["one row rejected", "two rows rejected", "whole request rejected: nothing resent"],
)
def test_given_a_400_naming_rows_when_delivering_then_they_fail_and_the_rest_is_resent_next(
    fields, failed, requests, sent
):
    items = [item(i) for i in range(1, 7)]
    answers = [bad_rows(**fields)] + [OK] * (len(requests) - 1)
    run = drive(items, answers, batch_size=3)
    assert run.requests == requests
    assert run.ack.failed == failed
    assert run.ack.sent == sent
    assert run.ack.retry == {}
    assert run.result.answers == {"400": 1, "200": len(requests) - 1}


# --- split -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "split_answer",
    [too_large(), BAD_REQUEST, FORBIDDEN],
    ids=["413", "400 naming no row", "403"],
)
def test_given_a_halving_answer_when_delivering_then_the_first_half_goes_first_then_the_second(
    split_answer,
):
    items = [item(i) for i in range(1, 6)]
    run = drive(items, [split_answer, OK, OK])
    assert run.requests == [[1, 2, 3, 4, 5], [1, 2], [3, 4, 5]]
    assert run.ack.sent == [1, 2, 3, 4, 5]
    assert run.ack.failed == {}


@pytest.mark.parametrize(
    ("bad", "requests", "sent"),
    [
        (
            {3},
            [[1, 2, 3, 4], [1, 2], [3, 4], [3], [4], [5, 6, 7, 8]],
            [1, 2, 4, 5, 6, 7, 8],
        ),
        (
            {1, 8},
            [[1, 2, 3, 4], [1, 2], [1], [2], [3, 4], [5, 6, 7, 8], [5, 6], [7, 8], [7], [8]],
            [2, 3, 4, 5, 6, 7],
        ),
    ],
    ids=["one bad row among eight", "first and last bad"],
)
def test_given_a_row_too_large_for_any_request_when_delivering_then_it_alone_fails_and_the_rest_go(
    bad, requests, sent
):
    items = [item(i) for i in range(1, 9)]
    run = drive(
        items,
        lambda request: too_large() if bad & {i.row_id for i in request} else OK,
        batch_size=4,
    )
    assert run.requests == requests
    assert run.ack.sent == sent
    assert run.ack.failed == {i: f"{REJECTED} HTTP 413: Payload too large" for i in bad}
    assert run.ack.retry == {}


@pytest.mark.parametrize(
    ("refusal", "why"),
    [(too_large(), TOO_LARGE_WHY), (BAD_REQUEST, BAD_REQUEST_WHY)],
    ids=["413", "400 naming no row"],
)
def test_given_a_batch_of_one_row_when_refused_too_large_or_by_a_400_then_the_row_fails_at_once(
    refusal, why
):
    run = drive([item(1)], [refusal])
    assert run.requests == [[1]]
    assert run.ack.failed == {1: f"{REJECTED} {why}"}
    assert run.ack.sent == [] and run.ack.retry == {}
    assert run.result.paused is None


@pytest.mark.parametrize(
    ("fits", "requests", "sent"),
    [
        (
            2,
            [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4], [1, 2], [3, 4], [5, 6, 7, 8], [5, 6], [7, 8]],
            [1, 2, 3, 4, 5, 6, 7, 8],
        ),
        (
            1,
            [
                [1, 2, 3, 4],
                [1, 2],
                [1],
                [2],
                [3, 4],
                [3],
                [4],
            ],
            [1, 2, 3, 4],
        ),
    ],
    ids=["pairs fit: both halves too large twice", "single rows fit"],
)
def test_given_413s_for_both_halves_when_delivering_then_halving_goes_on_without_a_pause(
    fits, requests, sent
):
    """Two halves both too large are no sign of a refused request: 413 has no twin rule."""
    items = [item(i) for i in range(1, len(sent) + 1)]
    run = drive(items, lambda request: too_large() if len(request) > fits else OK)
    assert run.requests == requests
    assert run.ack.sent == sent
    assert run.ack.failed == {} and run.ack.retry == {}
    assert run.result.paused is None


def test_given_every_row_too_large_alone_when_delivering_then_each_fails_and_nothing_pauses():
    items = [item(i) for i in range(1, 5)]
    run = drive(items, lambda request: too_large())
    assert run.requests == [[1, 2, 3, 4], [1, 2], [1], [2], [3, 4], [3], [4]]
    assert run.ack.failed == {i: f"{REJECTED} {TOO_LARGE_WHY}" for i in range(1, 5)}
    assert run.ack.sent == [] and run.ack.retry == {}
    assert run.result.paused is None
    assert run.result.answers == {"413": 7}


# --- refused requests: a row, or the whole request? ---------------------------------------------


@pytest.mark.parametrize(
    ("refusal", "n", "batch_size", "requests"),
    [
        (BAD_REQUEST, 2, None, [[1, 2], [1], [2]]),
        (BAD_REQUEST, 8, None, [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4], [1, 2], [1], [2]]),
        (BAD_REQUEST, 5, None, [[1, 2, 3, 4, 5], [1, 2], [1], [2]]),
        (BAD_REQUEST, 7, 3, [[1, 2, 3], [1], [2, 3]]),
        (FORBIDDEN, 2, None, [[1, 2], [1], [2]]),
        (FORBIDDEN, 8, None, [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4], [1, 2], [1], [2]]),
        (FORBIDDEN, 7, 3, [[1, 2, 3], [1], [2, 3]]),
    ],
    ids=[
        "400, two rows",
        "400, eight rows",
        "400, five rows",
        "400, three requests",
        "403, two rows",
        "403, eight rows",
        "403, three requests",
    ],
)
def test_given_every_request_refused_the_same_way_when_delivering_then_the_endpoint_pauses_and_no_row_fails(
    refusal, n, batch_size, requests
):
    """A 400 naming no row or a 403 for every request (a region block, a proxy) is the request's
    fault, not a row's: once a half and its twin are refused alike, everything waits the pause
    out with its attempt given back, even rows at their last attempt."""
    attempts = {i: (MAX_ATTEMPTS if i % 2 else 1) for i in range(1, n + 1)}
    items = [item(i) for i in attempts]
    rows = [row(i, a) for i, a in attempts.items()]
    run = drive(
        items,
        lambda request: refusal,
        rows=rows,
        batch_size=batch_size,
        pause_for=lambda verdict: 90.0,
    )
    why = BLOCKED_WHY if refusal is FORBIDDEN else BAD_REQUEST_WHY
    assert run.requests == requests
    assert run.ack.sent == [] and run.ack.failed == {}
    ((key, ids),) = run.ack.retry.items()
    assert sorted(ids) == list(range(1, n + 1))
    assert key == (90.0, True, f"{RETRYING} batch paused: {why} {BOTH_HALVES}")
    assert run.result.paused == f"{why} {BOTH_HALVES}"


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        (WRONG_PATH, "HTTP 400 for the whole request, not a row: Invalid request path"),
        (GATEWAY_PAGE, "HTTP 400 with a page that is not Amplitude's answer"),
        (
            Answer(400, {"code": 400, "error": "Missing field", "missing_field": "api_key"}, "x"),
            "HTTP 400: the request lacks api_key",
        ),
    ],
    ids=["invalid request path", "a gateway's HTML 400", "missing_field naming no event"],
)
def test_given_a_400_about_the_request_when_delivering_then_the_endpoint_pauses_at_once_failing_none(
    refusal, reason
):
    items = [item(i) for i in range(1, 7)]
    rows = [row(i, MAX_ATTEMPTS) for i in range(1, 7)]
    run = drive(items, [OK, refusal], rows=rows, batch_size=2, pause_for=lambda verdict: 30.0)
    assert run.requests == [[1, 2], [3, 4]]
    assert run.ack.sent == [1, 2] and run.ack.failed == {}
    ((key, ids),) = run.ack.retry.items()
    assert sorted(ids) == [3, 4, 5, 6]
    assert key[:2] == (30.0, True)
    assert key[2].startswith(f"{RETRYING} batch paused: {reason}")
    assert run.result.paused is not None and run.result.paused.startswith(reason)


# One bad row in a batch of eight sent as one request: the halves that hold it are refused, the
# others taken. For rows 2, 4, 6, 8 the row is the second of its last pair: its twin was taken
# before it was refused, so it fails at once.


@pytest.mark.parametrize("refusal", [BAD_REQUEST, FORBIDDEN], ids=["400 naming no row", "403"])
@pytest.mark.parametrize(
    "bad",
    list(range(1, 9)),
    ids=[f"row {b}" for b in range(1, 9)],
)
def test_given_one_refused_row_among_good_ones_when_delivering_then_exactly_it_fails_with_the_refusal(
    bad, refusal
):
    items = [item(i) for i in range(1, 9)]
    run = drive(items, refusing({bad}, refusal))
    why = BLOCKED_WHY if refusal is FORBIDDEN else BAD_REQUEST_WHY
    assert run.ack.failed == {bad: f"{REJECTED} {why}"}
    assert sorted(run.ack.sent) == [i for i in range(1, 9) if i != bad]
    assert run.ack.retry == {}
    assert run.result.paused is None
    assert_every_row_once(run, list(range(1, 9)))


@pytest.mark.parametrize("refusal", [BAD_REQUEST, FORBIDDEN], ids=["400 naming no row", "403"])
@pytest.mark.parametrize("bad", [{1, 7}, {3, 5}], ids=["rows 1 and 7", "rows 3 and 5"])
def test_given_two_refused_rows_in_different_halves_when_delivering_then_both_fail_and_none_pauses(
    bad, refusal
):
    items = [item(i) for i in range(1, 9)]
    run = drive(items, refusing(bad, refusal))
    why = BLOCKED_WHY if refusal is FORBIDDEN else BAD_REQUEST_WHY
    assert run.result.paused is None
    assert run.ack.failed == {b: f"{REJECTED} {why}" for b in bad}
    assert sorted(run.ack.sent) == [i for i in range(1, 9) if i not in bad]


@pytest.mark.parametrize("refusal", [BAD_REQUEST, FORBIDDEN], ids=["400 naming no row", "403"])
def test_given_a_held_row_when_its_twin_is_taken_then_the_held_row_fails_and_the_rest_is_sent(
    refusal,
):
    """Row 1 is refused alone while its twin [2] is unanswered: it waits for [2], which is
    taken, so row 1 is the refused one."""
    items = [item(i) for i in range(1, 5)]
    run = drive(items, refusing({1}, refusal))
    why = BLOCKED_WHY if refusal is FORBIDDEN else BAD_REQUEST_WHY
    assert run.requests == [[1, 2, 3, 4], [1, 2], [1], [2], [3, 4]]
    assert run.ack.failed == {1: f"{REJECTED} {why}"}
    assert run.ack.sent == [2, 3, 4]
    assert run.ack.retry == {}


def test_given_a_held_row_when_its_twin_fails_transiently_then_it_retries_refunded_not_failed():
    """A 500 for the twin says nothing of the held row: it is undecided, so it waits with the
    rest of the batch, its attempt given back."""
    items = [item(i) for i in range(1, 5)]
    run = drive(items, [BAD_REQUEST, BAD_REQUEST, BAD_REQUEST, SERVER_ERROR])
    assert run.requests == [[1, 2, 3, 4], [1, 2], [1], [2]]
    assert run.ack.failed == {} and run.ack.sent == []
    r = retried(run.ack)
    assert set(r) == {1, 2, 3, 4}
    assert r[2][1] is False and r[2][2] == f"{RETRYING} attempt 1: HTTP 500: boom"
    for row_id in (1, 3, 4):
        assert r[row_id][1] is True
        assert r[row_id][2] == f"{RETRYING} an earlier request of the batch failed: HTTP 500: boom"


@pytest.mark.parametrize("refusal", [BAD_REQUEST, FORBIDDEN], ids=["400 naming no row", "403"])
def test_given_a_held_row_whose_twin_never_answers_when_the_batch_ends_then_finish_retries_it_counted(
    refusal,
):
    """Row 1 is refused alone and waits for its twin [2]; the batch ends before [2] is answered,
    so nothing decides row 1: finish() sends it back after a backoff, its attempt counted, to be
    isolated again next time (neither failed nor paused)."""
    ack = Acknowledgement(sent=[], failed={}, retry={})
    result = SendResult(kind="event", token="t", endpoint=Endpoint.BATCH)
    delivery = Delivery(settings(), Endpoint.BATCH, ack, [row(1), row(2)], result)
    delivery.plan([item(1), item(2)])
    for expected in ([1, 2], [1]):
        request = delivery.next_request()
        assert request is not None and [i.row_id for i in request] == expected
        reading = delivery.judge(read(refusal, request, Endpoint.BATCH))
        assert reading.verdict in (Verdict.SPLIT, Verdict.BLOCKED)
        delivery.apply(refusal.status, reading, request, 0.0)
    assert ack.failed == {} and ack.retry == {}  # row 1 is held, undecided
    delivery.finish()
    why = BLOCKED_WHY if refusal is FORBIDDEN else BAD_REQUEST_WHY
    ((delay, refund, reason),) = ack.retry
    assert ack.retry[(delay, refund, reason)] == [1]
    assert 0.5 * top(1) <= delay <= top(1)
    assert refund is False
    assert reason == f"{RETRYING} {REJECTED} {why}"
    assert ack.failed == {} and ack.sent == []
    assert result.paused is None
    delivery.finish()  # a second finish retries nothing more
    assert sum(len(ids) for ids in ack.retry.values()) == 1


@pytest.mark.parametrize(
    ("attempts", "outcome"),
    [(1, "retry"), (MAX_ATTEMPTS - 1, "retry"), (MAX_ATTEMPTS, "gave up")],
    ids=["first attempt", "last before giving up", "out of attempts"],
)
def test_given_a_403_for_a_batch_of_one_row_when_delivering_then_it_retries_as_transient(
    attempts, outcome
):
    """No twin can tell the firewall's row from a region block: the row retries with backoff,
    its attempt counted, and gives up at the maximum; the endpoint does not pause."""
    run = drive([item(1)], [FORBIDDEN], rows=[row(1, attempts)], pause_for=lambda verdict: 60.0)
    assert run.requests == [[1]]
    assert run.ack.sent == []
    assert run.result.paused is None
    if outcome == "gave up":
        assert run.ack.failed == {1: f"{GAVE_UP} {MAX_ATTEMPTS} attempts: {BLOCKED_WHY}"}
        assert run.ack.retry == {}
    else:
        assert run.ack.failed == {}
        ((delay, refund, reason),) = run.ack.retry
        assert 0.5 * top(attempts) <= delay <= top(attempts)
        assert refund is False
        assert reason == f"{RETRYING} attempt {attempts}: {BLOCKED_WHY}"


# --- 429 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "wait"),
    [(Endpoint.BATCH, THROTTLE_BATCH), (Endpoint.HTTP_V2, THROTTLE_V2)],
    ids=["batch", "http_v2"],
)
def test_given_a_429_for_a_user_when_delivering_then_their_later_rows_are_held_back_with_refund(
    endpoint, wait
):
    items = [
        item(1, user="alice-1"),
        item(2, user="bob-22"),
        item(3, user="alice-1"),
        item(4, user="carol-3"),
        item(5, user="alice-1"),
    ]
    run = drive(
        items,
        [throttled(throttled_users={"alice-1": 40}), OK, OK],
        endpoint=endpoint,
        batch_size=2,
    )
    assert run.requests == [[1, 2], [2], [4]]
    assert run.ack.sent == [2, 4]
    assert run.ack.failed == {}
    r = retried(run.ack)
    assert r[1] == (wait, True, f"{RETRYING} HTTP 429: Too many requests")
    held = (wait, True, f"{RETRYING} an earlier row of this user was throttled (429)")
    assert r[3] == held and r[5] == held
    assert_every_row_once(run, [1, 2, 3, 4, 5])
    assert run.result.answers == {"429": 1, "200": 2}
    assert run.result.requests == 3


def test_given_a_429_naming_one_event_when_delivering_then_that_users_later_row_in_the_rest_waits():
    items = [item(1, user="alice-1"), item(2, user="bob-22"), item(3, user="alice-1")]
    run = drive(items, [throttled(throttled_events=[0]), OK])
    assert run.requests == [[1, 2, 3], [2]]
    assert run.ack.sent == [2]
    r = retried(run.ack)
    assert r[1] == (THROTTLE_BATCH, True, f"{RETRYING} HTTP 429: Too many requests")
    assert r[3] == (
        THROTTLE_BATCH,
        True,
        f"{RETRYING} an earlier row of this user was throttled (429)",
    )


def test_given_a_429_for_a_device_when_delivering_then_rows_of_that_device_are_held_back():
    items = [
        item(1, user=None, device="dev-aaa"),
        item(2, user="bob-22"),
        item(3, user="zed-99", device="dev-aaa"),
        item(4, user="carol-3"),
    ]
    run = drive(items, [throttled(throttled_devices={"dev-aaa": 40}), OK, OK], batch_size=2)
    assert run.requests == [[1, 2], [2], [4]]
    assert run.ack.sent == [2, 4]
    assert set(retried(run.ack)) == {1, 3}
    assert all(refund for _, refund, _ in run.ack.retry)


def test_given_a_429_naming_nobody_when_delivering_then_the_request_waits_and_later_users_too():
    items = [item(1), item(2), item(3, user="user-1"), item(4)]
    run = drive(items, [throttled(), OK], batch_size=2)
    assert run.requests == [[1, 2], [4]]
    assert run.ack.sent == [4]
    r = retried(run.ack)
    assert r[1] == r[2] == (THROTTLE_BATCH, True, f"{RETRYING} HTTP 429: Too many requests")
    assert r[3] == (
        THROTTLE_BATCH,
        True,
        f"{RETRYING} an earlier row of this user was throttled (429)",
    )


def test_given_a_429_naming_nobody_when_delivering_then_its_users_are_not_held_in_other_batches():
    # A 429 for the whole request is the project's limit (the shared rate is cut instead):
    # its rows wait, but the users are not throttled ones that other batches must hold.
    items = [item(1, user="alice-1"), item(2, user="bob-22"), item(3, user="alice-1")]
    run = drive(items, [throttled()], batch_size=2)
    assert run.requests == [[1, 2]]
    assert set(retried(run.ack)) == {1, 2, 3}  # within the batch, alice's later row still waits
    assert run.throttled_keys == set()


def test_given_a_429_naming_a_few_users_when_delivering_then_other_batches_hold_exactly_them():
    items = [item(1, user="alice-1"), item(2, user="bob-22"), item(3, user="carol-3")]
    run = drive(items, [throttled(throttled_users={"alice-1": 40}), OK])
    assert run.throttled_keys == {"alice-1"}
    assert run.ack.sent == [2, 3]


def test_given_a_user_over_the_daily_quota_when_delivering_then_their_row_retries_after_the_quota_wait():
    items = [item(1, user="alice-1"), item(2, user="bob-22"), item(3, user="alice-1")]
    run = drive(items, [throttled(exceeded_daily_quota_users={"alice-1": 1}), OK], batch_size=2)
    assert run.requests == [[1, 2], [2]]
    assert run.ack.sent == [2]
    r = retried(run.ack)
    assert r[1] == (
        DAILY_QUOTA,
        True,
        f"{RETRYING} user over Amplitude's daily quota; retrying hourly",
    )
    assert r[3][1] is True  # held back, attempt refunded
    assert_every_row_once(run, [1, 2, 3])


# --- transient failures ------------------------------------------------------------------------


def top(attempts: int, ceiling: float = BACKOFF_MAX, base: float = BACKOFF_BASE) -> float:
    return min(ceiling, base * 2 ** max(0, attempts - 1))


@pytest.mark.parametrize(
    ("failure", "label", "base", "ceiling"),
    [
        (SERVER_ERROR, "HTTP 500: boom", BACKOFF_BASE_5XX, BACKOFF_MAX_5XX),
        (NO_ANSWER, NO_ANSWER.text, BACKOFF_BASE, BACKOFF_MAX),
        (
            Answer(200, None, "<html>ok</html>"),
            "HTTP 200 with a non-JSON body: <html>ok</html>",
            BACKOFF_BASE,
            BACKOFF_MAX,
        ),
    ],
    ids=["500", "no answer", "2xx page from a proxy"],
)
def test_given_a_transient_failure_when_delivering_then_rows_retry_by_attempts_and_the_rest_waits(
    failure, label, base, ceiling
):
    # Request [1, 2, 3] fails; rows 4 and 5 are never sent.
    attempts = {1: 1, 2: 4, 3: MAX_ATTEMPTS, 4: 2, 5: MAX_ATTEMPTS + 3}
    items = [item(i) for i in attempts]
    rows = [row(i, n) for i, n in attempts.items()]
    run = drive(items, [failure], rows=rows, batch_size=3)
    assert run.requests == [[1, 2, 3]]
    assert run.ack.sent == []
    assert run.ack.failed == {3: f"{GAVE_UP} {MAX_ATTEMPTS} attempts: {label}"}
    r = retried(run.ack)
    assert set(r) == {1, 2, 4, 5}
    for row_id in (1, 2):
        delay, refund, reason = r[row_id]
        n = attempts[row_id]
        assert 0.5 * top(n, ceiling, base) <= delay <= top(n, ceiling, base)
        assert refund is False
        assert reason == f"{RETRYING} attempt {n}: {label}"
    for row_id in (4, 5):  # never sent: their attempt is given back, whatever they had
        delay, refund, reason = r[row_id]
        assert 0.5 * top(1) <= delay <= top(1)
        assert refund is True
        assert reason == f"{RETRYING} an earlier request of the batch failed: {label}"
    assert run.result.paused is None
    assert run.result.requests == 1


@pytest.mark.parametrize(
    ("failure", "attempts", "low", "high"),
    [
        (SERVER_ERROR, 1, 0.25, 0.5),
        (SERVER_ERROR, 3, 1.0, 2.0),
        (SERVER_ERROR, 5, 4.0, 8.0),
        (SERVER_ERROR, 7, 15.0, 30.0),
        (SERVER_ERROR, 9, 15.0, 30.0),
        (Answer(503, {"code": 503}, "down"), 9, 15.0, 30.0),
        (Answer(408, None, "timeout"), 9, 15.0, 30.0),
        (NO_ANSWER, 3, 4.0, 8.0),
        (NO_ANSWER, 6, 32.0, 64.0),
        (NO_ANSWER, 9, 50.0, 100.0),
    ],
    ids=[
        "500 first: half a second",
        "500 third",
        "500 fifth",
        "500 seventh: capped at the 5xx cap",
        "500 last before giving up: still tens of seconds",
        "503: the 5xx cap",
        "408: the 5xx cap",
        "no answer third",
        "no answer sixth: above the 5xx cap",
        "no answer last: the general cap",
    ],
)
def test_given_a_transient_failure_when_a_row_retries_then_its_delay_is_the_backoff_of_its_attempts_and_class(
    failure, attempts, low, high
):
    assert attempts < MAX_ATTEMPTS
    run = drive([item(1)], [failure], rows=[row(1, attempts)])
    ((delay, refund, _),) = run.ack.retry
    assert low <= delay <= high
    assert refund is False


def test_given_an_earlier_request_sent_when_a_later_one_fails_then_the_sent_rows_stay_sent():
    items = [item(i) for i in range(1, 7)]
    run = drive(items, [OK, SERVER_ERROR], batch_size=2)
    assert run.requests == [[1, 2], [3, 4]]
    assert run.ack.sent == [1, 2]
    assert set(retried(run.ack)) == {3, 4, 5, 6}
    assert run.result.answers == {"200": 1, "500": 1}
    assert_every_row_once(run, list(range(1, 7)))


# --- pause -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "pause", "reason", "requests"),
    [
        (BAD_KEY, 120.0, "Amplitude rejected the API key", [[1, 2], [3, 4]]),
        (
            FORBIDDEN,
            60.0,
            f"{BLOCKED_WHY} {BOTH_HALVES}",
            [[1, 2], [3, 4], [3], [4]],
        ),
        (WRONG_PATH, 60.0, "HTTP 400 for the whole request, not a row", [[1, 2], [3, 4]]),
        (Answer(404, None, "Not Found"), 30.0, "HTTP 404 from batch: Not Found", [[1, 2], [3, 4]]),
        (SERVER_ERROR, 45.0, "HTTP 500: boom", [[1, 2], [3, 4]]),
        (NO_ANSWER, 45.0, NO_ANSWER.text, [[1, 2], [3, 4]]),
    ],
    ids=[
        "invalid api key",
        "403 for both halves",
        "invalid request path",
        "404",
        "500 past the threshold",
        "no answer past threshold",
    ],
)
def test_given_the_endpoint_pauses_when_delivering_then_everything_left_waits_out_the_pause_refunded(
    failure, pause, reason, requests
):
    attempts = {1: 1, 2: MAX_ATTEMPTS, 3: 2, 4: MAX_ATTEMPTS + 1, 5: 1, 6: 1}
    items = [item(i) for i in attempts]
    rows = [row(i, n) for i, n in attempts.items()]
    run = drive(
        items,
        lambda request: OK if request[0].row_id in (1, 2) else failure,
        rows=rows,
        batch_size=2,
        pause_for=lambda verdict: pause,
    )
    assert run.requests == requests
    assert run.ack.sent == [1, 2]
    assert run.ack.failed == {}  # not even rows at max attempts give up during a pause
    ((key, ids),) = run.ack.retry.items()
    delay, refund, why = key
    assert sorted(ids) == [3, 4, 5, 6]
    assert delay == pause
    assert refund is True
    assert why.startswith(f"{RETRYING} batch paused: {reason}")
    assert run.result.paused is not None and run.result.paused.startswith(reason)


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (
            [Answer(404, None, "Not Found")],
            "HTTP 404 from batch: Not Found (check AMPLITUDE_SERVER_URL)",
        ),
        ([FORBIDDEN] * 3, f"{BLOCKED_WHY} {BOTH_HALVES}"),
    ],
    ids=["404", "403 for both halves"],
)
def test_given_a_pause_verdict_with_no_pause_time_when_delivering_then_rows_still_wait_refunded(
    answers, reason
):
    run = drive([item(1), item(2)], answers)
    ((key, ids),) = run.ack.retry.items()
    assert key[0] == 0.0 and key[1] is True
    assert sorted(ids) == [1, 2]
    assert run.ack.failed == {}
    assert run.result.paused == reason


# --- counting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "counted"),
    [
        ([OK, OK, OK], {"200": 3}),
        ([throttled(throttled_users={"user-1": 1}), OK, OK, OK], {"429": 1, "200": 3}),
        ([too_large(), OK, OK, OK, OK], {"413": 1, "200": 4}),
        ([OK, NO_ANSWER], {"200": 1, "no answer": 1}),
    ],
    ids=["three 200s", "a 429 then 200s", "a 413 then 200s", "no answer"],
)
def test_given_a_sequence_of_answers_when_delivering_then_requests_and_answers_are_counted(
    answers, counted
):
    items = [item(i) for i in range(1, 7)]
    run = drive(items, answers, batch_size=2)
    assert run.result.requests == len(answers) == len(run.requests)
    assert run.result.answers == counted


# --- helpers -----------------------------------------------------------------------------------


def test_given_retries_when_recorded_then_same_delay_refund_and_reason_share_one_entry():
    ack = Acknowledgement(sent=[], failed={}, retry={})
    retry(ack, [1, 2], 1.23449, refund=True, reason="r")
    retry(ack, [3], 1.2344, refund=True, reason="r")
    retry(ack, [4], 1.2344, refund=False, reason="r")
    retry(ack, [], 9.0, refund=True, reason="nothing")
    assert ack.retry == {(1.234, True, "r"): [1, 2, 3], (1.234, False, "r"): [4]}


@pytest.mark.parametrize(
    ("user", "device", "expected"),
    [
        ("alice-1", "dev-1", {"alice-1", "dev-1"}),
        ("alice-1", None, {"alice-1"}),
        (None, "dev-1", {"dev-1"}),
        ("", "dev-1", {"dev-1"}),
    ],
    ids=["both", "user only", "device only", "empty user"],
)
def test_given_an_item_when_keyed_then_its_user_and_device_are_its_keys(user, device, expected):
    assert keys(Prepared(1, b"{}", user, device)) == expected


# --- retried rows come due together --------------------------------------------------------------


def test_given_a_5xx_for_a_request_of_rows_with_one_attempt_count_when_delivering_then_they_share_one_delay():
    """Rows retried with a delay each (jitter per row) came due one by one and went out one or
    two per request; one delay per request lets them rejoin a full batch."""
    items = [item(i) for i in range(1, 41)]
    run = drive(items, [SERVER_ERROR])
    (key,) = run.ack.retry  # one delay, one reason, not refunded: all forty rows under it
    assert key[1] is False and sorted(run.ack.retry[key]) == list(range(1, 41))


def test_given_rows_with_different_attempt_counts_when_a_5xx_comes_then_each_count_has_its_own_delay():
    items = [item(i) for i in range(1, 7)]
    rows = [row(i, attempts=1 if i <= 3 else 4) for i in range(1, 7)]
    run = drive(items, [SERVER_ERROR], rows=rows)
    by_delay = {key[0]: sorted(ids) for key, ids in run.ack.retry.items()}
    assert sorted(by_delay.values()) == [[1, 2, 3], [4, 5, 6]]
