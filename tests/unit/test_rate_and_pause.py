"""The rules of issue 13: an endpoint pauses only on failure sustained across requests and
workers, a 5xx retries within tens of seconds, and the shared rate is cut when Amplitude
throttles the project and grows back (AIMD). Pure functions of tasks/delivery/policy.py."""

from __future__ import annotations

import random

import pytest

from tasks.delivery import policy

F, S = True, False  # a failed request, a request that went through


# --- when an endpoint pauses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ([F], False),
        ([F, F, F, F], False),
        ([F, F, F, F, F], True),
        ([S, F, F, F, F, F], True),
        ([F, F, F, F, S, F], True),  # 5 of 6 = 0.83
        ([F, S, F, S, F, S, F, S, F, S], False),  # half fail: dilute
        ([S] * 4 + [F] * 16, True),  # 16 of 20 = 0.8
        ([S] * 5 + [F] * 15, False),  # 15 of 20 = 0.75
        ([F, F, F, F, S, S], False),
    ],
    ids=[
        "one failure",
        "four in a row: below the count",
        "five in a row: sustained",
        "a success newest, five failures before it: 5 of 6",
        "a success among six: still 5 of 6",
        "every other request fails: diluted",
        "16 of 20 failed: at the ratio",
        "15 of 20 failed: below the ratio",
        "successes reset the run",
    ],
)
def test_given_the_last_requests_outcomes_when_judging_then_only_consistent_failure_pauses(
    window, expected
):
    assert policy.sustained_failure(window, after=5, ratio=0.8) is expected


def test_given_a_fifth_of_requests_failing_at_random_when_judged_over_time_then_it_almost_never_pauses():
    # given 30 % of requests failing (20 % before ingest plus 10 % after), 10,000 requests
    rng = random.Random(13)
    window: list[bool] = []
    pauses = 0
    for _ in range(10_000):
        window = [rng.random() < 0.3, *window][: policy.OUTCOME_WINDOW]
        pauses += policy.sustained_failure(window, after=5, ratio=0.8)
    # then the window says "sustained" only in the first few requests, if ever
    assert pauses <= 2


def test_given_every_request_failing_when_judged_then_the_fifth_failure_pauses():
    window: list[bool] = []
    verdicts = []
    for _ in range(6):
        window = [True, *window][: policy.OUTCOME_WINDOW]
        verdicts.append(policy.sustained_failure(window, after=5, ratio=0.8))
    assert verdicts == [False, False, False, False, True, True]


# --- how long a 5xx waits --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (500, (0.5, 30.0)),
        (502, (0.5, 30.0)),
        (503, (0.5, 30.0)),
        (504, (0.5, 30.0)),
        (408, (0.5, 30.0)),
        (0, (2.0, 1800.0)),
        (200, (2.0, 1800.0)),
    ],
    ids=["500", "502", "503", "504", "408", "no answer", "a 2xx page from a proxy"],
)
def test_given_a_transient_failure_when_stepping_its_backoff_then_5xx_start_soon_and_stay_within_tens_of_seconds(
    status, expected
):
    assert policy.retry_steps(status, 2.0, 0.5, 1800.0, 30.0) == expected


def test_given_settings_below_the_5xx_steps_when_stepping_then_the_lower_ones_hold():
    assert policy.retry_steps(503, 0.1, 0.5, 10.0, 30.0) == (0.1, 10.0)


# --- the shared rate ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("throttled", "size", "expected"),
    [
        (2000, 2000, True),
        (1500, 2000, True),
        (1001, 2000, True),
        (1000, 2000, False),
        (3, 2000, False),
        (0, 0, False),
    ],
    ids=["all (the answer names nobody)", "most", "just over half", "half", "a few users", "empty"],
)
def test_given_a_429_when_judging_its_scope_then_most_of_the_request_is_the_projects_limit(
    throttled, size, expected
):
    assert policy.project_throttled(throttled, size) is expected


@pytest.mark.parametrize(
    ("allowed", "observed", "ceiling", "expected"),
    [
        (0.0, 8000.0, 0, 4000.0),
        (0.0, 8000.0, 1000, 500.0),
        (600.0, 8000.0, 1000, 300.0),
        (600.0, 0.0, 0, 300.0),
        (0.0, 0.0, 1000, 500.0),
        (0.0, 0.0, 0, policy.RATE_FLOOR),
        (150.0, 0.0, 0, policy.RATE_FLOOR),
    ],
    ids=[
        "no cap in force: half of what was flowing",
        "plan limit below what was flowing: half the limit",
        "a cap in force: half of it",
        "a cap in force, nothing counted: half of it",
        "nothing counted, a plan limit: half the limit",
        "nothing known: the floor",
        "never below the floor",
    ],
)
def test_given_a_project_level_429_when_cutting_then_the_rate_halves_from_what_was_allowed_or_sent(
    allowed, observed, ceiling, expected
):
    assert policy.cut_rate(allowed, observed, ceiling) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("cut_to", "seconds", "ceiling", "expected"),
    [
        (None, 0.0, 0, 0.0),
        (None, 5.0, 1000, 1000.0),
        (500.0, 0.0, 0, 500.0),
        (500.0, 5.0, 0, 750.0),
        (500.0, 10.0, 0, 1000.0),
        (500.0, 69.0, 0, 500.0 * 7.9),
        (500.0, 70.0, 0, 0.0),
        (500.0, 5.0, 1000, 750.0),
        (500.0, 10.0, 1000, 1000.0),
        (500.0, 3600.0, 1000, 1000.0),
        (500.0, -3.0, 0, 500.0),
    ],
    ids=[
        "never cut, no setting: no cap",
        "never cut: the plan limit",
        "just cut",
        "grows linearly: +50 % after 5 s",
        "twice the cut after 10 s",
        "still capped just before the release",
        "no setting: the cap lifts at 8x the cut",
        "with a plan limit: grows the same",
        "reaches the plan limit",
        "never above the plan limit",
        "a clock behind the cut's: the cut rate",
    ],
)
def test_given_a_cut_when_time_passes_then_the_rate_grows_back_linearly_up_to_the_ceiling_or_lifts(
    cut_to, seconds, ceiling, expected
):
    assert policy.allowed_rate(cut_to, seconds, ceiling) == pytest.approx(expected)


def test_given_429s_of_requests_sent_before_a_cut_when_they_arrive_then_they_do_not_cut_again():
    assert policy.may_cut(None) is True
    assert policy.may_cut(0.2) is False
    assert policy.may_cut(policy.RATE_HOLD_SECONDS) is True


@pytest.mark.parametrize(
    ("cut_to", "ceiling", "expected"),
    [(500.0, 0, 71.0), (500.0, 1000, 11.0), (500.0, 400, 1.0)],
    ids=["no setting: until the cap lifts", "plan limit: until back at it", "already above it"],
)
def test_given_a_cut_when_its_lifetime_is_asked_then_it_lasts_until_the_rate_has_grown_back(
    cut_to, ceiling, expected
):
    lifetime = policy.cut_lifetime(cut_to, ceiling)
    assert lifetime == pytest.approx(expected)
    # and after its lifetime the cut changes nothing any more
    assert policy.allowed_rate(cut_to, lifetime, ceiling) == pytest.approx(float(ceiling))


def test_given_amplitude_limiting_the_project_when_aimd_runs_then_the_rate_settles_near_the_limit():
    # given a project limit of 1000 events/s unknown to ampsync, and 8000 flowing at first
    limit, cut_to, since, observed = 1000.0, None, 0.0, 8000.0
    rates = []
    for tick in range(600):  # ten minutes, one look a second
        now = float(tick)
        rate = policy.allowed_rate(cut_to, now - since, 0) or observed
        if rate > limit and policy.may_cut(None if cut_to is None else now - since):
            cut_to, since = policy.cut_rate(rate if cut_to else 0.0, observed, 0), now
            rate = cut_to
        rates.append(rate)
    # then after the first cuts it sends most of what the project may, and is over the limit
    # (collecting 429s) only about one second in ten
    settled = rates[60:]
    sent = [min(r, limit) for r in settled]
    assert sum(sent) / len(sent) >= 0.7 * limit
    assert min(sent) >= 0.5 * limit
    assert sum(r > limit for r in settled) <= 0.15 * len(settled)
