"""Delivery's pure rules (tasks/delivery/policy.py) and where the next claim starts
(tasks/db/queue.Claim.next_floor), each pinned by a table of cases."""

from __future__ import annotations

import pytest

from tasks.amplitude.limits import MAX_EVENTS_PER_REQUEST, MAX_ITEMS, Endpoint
from tasks.db.queue import Claim
from tasks.delivery import policy
from tasks.outcomes import Kind
from tasks.settings import Settings


def lowest(lo: float, hi: float) -> float:
    return lo


def highest(lo: float, hi: float) -> float:
    return hi


# --- backoff -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "base", "ceiling", "top"),
    [
        (1, 10.0, 1800.0, 10.0),
        (2, 10.0, 1800.0, 20.0),
        (3, 10.0, 1800.0, 40.0),
        (5, 10.0, 1800.0, 160.0),
        (8, 10.0, 1800.0, 1280.0),
        (9, 10.0, 1800.0, 1800.0),  # 2560 capped
        (40, 10.0, 1800.0, 1800.0),  # far past the cap: still the cap
        (0, 10.0, 1800.0, 10.0),  # never tried: the first step, not half of it
        (3, 0.5, 1.0, 1.0),  # 2.0 capped
        (4, 0.0, 1800.0, 0.0),  # base 0: no wait at all
        (2, 10.0, 0.0, 0.0),  # ceiling 0: no wait at all
    ],
    ids=[
        "first retry waits base",
        "second doubles",
        "third doubles again",
        "fifth is base x 16",
        "eighth still under cap",
        "ninth reaches the cap",
        "fortieth stays at the cap",
        "zero attempts is the first step",
        "small base capped",
        "zero base",
        "zero ceiling",
    ],
)
def test_given_attempts_when_backing_off_then_the_wait_is_base_doubling_capped_with_upper_half_jitter(
    attempts, base, ceiling, top
):
    assert policy.backoff(attempts, base, ceiling, uniform=highest) == pytest.approx(top)
    assert policy.backoff(attempts, base, ceiling, uniform=lowest) == pytest.approx(top / 2)


def test_given_any_attempt_when_backing_off_then_jitter_is_drawn_over_half_to_full():
    calls: list[tuple[float, float]] = []

    def record(lo: float, hi: float) -> float:
        calls.append((lo, hi))
        return 0.75

    assert policy.backoff(3, 10.0, 1800.0, uniform=record) == pytest.approx(30.0)
    assert calls == [(0.5, 1.0)]


@pytest.mark.parametrize(
    ("attempts", "top"),
    [(1, 10.0), (4, 80.0), (12, 1800.0)],
    ids=["first", "fourth", "capped"],
)
def test_given_real_randomness_when_backing_off_then_every_wait_lies_in_half_to_full_step(
    attempts, top
):
    waits = [policy.backoff(attempts, 10.0, 1800.0) for _ in range(200)]
    assert all(0.5 * top <= w <= top for w in waits)
    assert len({round(w, 6) for w in waits}) > 100  # jittered, not one fixed value


# --- pause -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "after", "base", "ceiling", "expected"),
    [
        (1, 5, 30.0, 600.0, 30.0),
        (5, 5, 30.0, 600.0, 30.0),
        (6, 5, 30.0, 600.0, 60.0),
        (7, 5, 30.0, 600.0, 120.0),
        (9, 5, 30.0, 600.0, 480.0),
        (10, 5, 30.0, 600.0, 600.0),  # 960 capped
        (50, 5, 30.0, 600.0, 600.0),
        (1, 1, 5.0, 100.0, 5.0),
        (3, 1, 5.0, 100.0, 20.0),
    ],
    ids=[
        "paused by the window with few failures in a row: base",
        "at threshold: base",
        "one over (a failed probe): doubled",
        "two over: quadrupled",
        "four over: x16",
        "five over: capped",
        "far over: capped",
        "threshold one: first failure base",
        "threshold one: third failure x4",
    ],
)
def test_given_failures_in_a_row_when_pausing_then_base_up_to_threshold_then_doubling_capped(
    failures, after, base, ceiling, expected
):
    assert policy.pause_seconds(failures, after, base, ceiling) == pytest.approx(expected)


# --- rows per request --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "batch_size", "events_per_second", "expected"),
    [
        (Endpoint.BATCH, None, 0, MAX_EVENTS_PER_REQUEST),
        (Endpoint.HTTP_V2, None, 0, 2000),
        (Endpoint.IDENTIFY, None, 0, 1024),
        (Endpoint.GROUP_IDENTIFY, None, 0, 1024),
        (Endpoint.BATCH, 500, 0, 500),
        (Endpoint.IDENTIFY, 2000, 0, 1024),
        (Endpoint.GROUP_IDENTIFY, 1500, 0, 1024),
        (Endpoint.BATCH, None, 300, 300),
        (Endpoint.HTTP_V2, 100, 300, 100),
        (Endpoint.HTTP_V2, 800, 300, 300),
        (Endpoint.IDENTIFY, None, 5000, 1024),
        (Endpoint.BATCH, 1, 1000, 1),
    ],
    ids=[
        "batch default: 2000",
        "http_v2 default: 2000",
        "identify default: its 1024 limit",
        "groupidentify default: its 1024 limit",
        "batch size under the limit",
        "batch size over identify's limit is cut",
        "batch size over groupidentify's limit is cut",
        "events/s cap below the default",
        "batch size below the events/s cap",
        "events/s cap below the batch size",
        "events/s cap above the endpoint limit",
        "batch size one",
    ],
)
def test_given_batch_size_and_rate_cap_when_sizing_requests_then_the_smallest_limit_wins(
    endpoint, batch_size, events_per_second, expected
):
    assert policy.rows_per_request(endpoint, batch_size, events_per_second) == expected


@pytest.mark.parametrize("endpoint", list(Endpoint), ids=[e.value for e in Endpoint])
def test_given_no_rate_cap_argument_when_sizing_requests_then_only_the_endpoint_limit_applies(
    endpoint,
):
    assert policy.rows_per_request(endpoint, None) == MAX_ITEMS[endpoint]


# --- throttle wait -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        (Endpoint.HTTP_V2, 31.0),
        (Endpoint.BATCH, 7.0),
        (Endpoint.IDENTIFY, 7.0),
        (Endpoint.GROUP_IDENTIFY, 7.0),
        ("http_v2", 31.0),
        ("batch", 7.0),
    ],
    ids=["http_v2", "batch", "identify", "groupidentify", "http_v2 as str", "batch as str"],
)
def test_given_a_429_when_choosing_the_wait_then_http_v2_waits_its_own_and_the_rest_batchs(
    endpoint, expected
):
    s = Settings(_env_file=None, AMPSYNC_THROTTLE_WAIT_V2=31.0, AMPSYNC_THROTTLE_WAIT_BATCH=7.0)
    assert policy.throttle_wait(endpoint, s) == expected


# --- send time limit ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lease", "expected"),
    [
        (5, 4),
        (7.5, 6),
        (10, 8),
        (49, 40),
        (50, 40),
        (60, 50),
        (300, 290),
        (3000, 2990),
        (2, 2),
        (1, 1),
        (0.5, 1),
    ],
    ids=[
        "minimum lease 5 s: 4",
        "fractional lease: floored",
        "10 s: a fifth off",
        "49 s: a fifth, floored, off",
        "50 s: the full 10 s margin",
        "60 s: 10 s margin",
        "default 300 s: 290",
        "maximum 3000 s: 2990",
        "2 s: no whole fifth",
        "1 s: 1",
        "under 1 s: at least 1",
    ],
)
def test_given_a_lease_when_limiting_a_send_then_it_keeps_a_margin_of_a_fifth_up_to_10s_and_at_least_1(
    lease, expected
):
    assert policy.send_time_limit(lease) == expected


@pytest.mark.parametrize("lease", [5, 6, 9, 11, 30, 123, 299, 3000])
def test_given_any_allowed_lease_when_limiting_a_send_then_the_limit_ends_before_the_lease(lease):
    limit = policy.send_time_limit(lease)
    assert isinstance(limit, int)
    assert 1 <= limit < lease


# --- endpoint for a kind -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "event_api", "identify_api", "group_api", "expected"),
    [
        (Kind.EVENT, "batch", "batch", "batch", "batch"),
        (Kind.EVENT, "http_v2", "batch", "batch", "http_v2"),
        (Kind.EVENT, "batch", "identify", "groupidentify", "batch"),
        (Kind.IDENTIFY, "batch", "batch", "batch", "batch"),
        (Kind.IDENTIFY, "batch", "http_v2", "batch", "http_v2"),
        (Kind.IDENTIFY, "http_v2", "identify", "http_v2", "identify"),
        (Kind.GROUP_IDENTIFY, "batch", "batch", "batch", "batch"),
        (Kind.GROUP_IDENTIFY, "batch", "batch", "http_v2", "http_v2"),
        (Kind.GROUP_IDENTIFY, "http_v2", "identify", "groupidentify", "groupidentify"),
        ("event", "http_v2", "batch", "batch", "http_v2"),
        ("identify", "batch", "identify", "batch", "identify"),
        ("group_identify", "http_v2", "http_v2", "batch", "batch"),
    ],
    ids=[
        "event default: batch",
        "event through http_v2",
        "event ignores identify_api and group_identify_api",
        "identify default: batch",
        "identify through http_v2",
        "identify through the form API, ignoring event_api",
        "group default: $groupidentify events through batch",
        "group through http_v2",
        "group through the form API, ignoring the others",
        "event as str",
        "identify as str",
        "group as str",
    ],
)
def test_given_kind_and_settings_when_routing_then_each_kind_goes_to_its_endpoint(
    kind, event_api, identify_api, group_api, expected
):
    s = Settings(
        _env_file=None,
        AMPSYNC_EVENT_API=event_api,
        AMPSYNC_IDENTIFY_API=identify_api,
        AMPSYNC_GROUP_IDENTIFY_API=group_api,
    )
    assert policy.endpoint_for(kind, s) == expected


# --- where the next claim starts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "limit", "expected"),
    [
        (Claim("t", rows=100, last_id=4242), 100, 4242),
        (Claim("t", rows=1, last_id=7), 1, 7),
        (Claim("t", rows=99, last_id=4242), 100, 0),
        (Claim("t", rows=1, last_id=7), 2000, 0),
        (Claim("t", rows=0), 100, 0),
    ],
    ids=[
        "full claim: after its last id",
        "full claim of one",
        "short by one: from the start",
        "short claim of one",
        "empty claim: from the start",
    ],
)
def test_given_a_claim_when_choosing_the_next_floor_then_full_continues_and_short_restarts(
    claim, limit, expected
):
    assert claim.next_floor(limit) == expected
