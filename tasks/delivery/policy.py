"""Delivery's rules as pure functions: how long a retry waits, when an endpoint pauses and for
how long, how the shared events-per-second rate adapts to Amplitude's throttling, how many rows
a request carries, how long a send may run inside its lease. No I/O: the unit tests
(tests/unit/test_policy.py, tests/unit/test_rate_and_pause.py) pin each rule with cases."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ..amplitude.limits import MAX_EVENTS_PER_REQUEST, MAX_ITEMS, Endpoint
from ..outcomes import Kind
from ..settings import Settings


def endpoint_for(kind: str, settings: Settings) -> str:
    """The endpoint a kind's rows go through, as the settings choose."""
    if kind == Kind.EVENT:
        return settings.event_api
    if kind == Kind.IDENTIFY:
        return settings.identify_api
    return settings.group_identify_api


def rows_per_request(endpoint: str, batch_size: int | None, events_per_second: int = 0) -> int:
    """Rows per claim and per request: the configured batch size within the endpoint's count
    limit, and no more than one second of the events-per-second cap."""
    rows = min(batch_size or MAX_EVENTS_PER_REQUEST, MAX_ITEMS[endpoint])
    return min(rows, events_per_second) if events_per_second else rows


def backoff(
    attempts: int,
    base: float,
    ceiling: float,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds before attempt `attempts + 1`: exponential, capped, with jitter over the upper
    half so retries of one failure spread out but never come sooner than half the step."""
    top: float = min(ceiling, base * 2 ** max(0, attempts - 1))
    return top * uniform(0.5, 1.0)


def retry_steps(
    status: int, base: float, base_5xx: float, backoff_max: float, backoff_max_5xx: float
) -> tuple[float, float]:
    """(first step, cap) of a transient failure's backoff. Amplitude answered 5xx or 408: it is
    up and hiccuped, so the batch comes back soon and within tens of seconds (sustained failure
    pauses the endpoint instead, `sustained_failure`). No answer at all (timeout, connection
    error) or a page that is not Amplitude's: the general steps, as the way to Amplitude may be
    broken."""
    if status >= 500 or status == 408:
        return min(base, base_5xx), min(backoff_max, backoff_max_5xx)
    return base, backoff_max


def throttle_wait(endpoint: str, settings: Settings) -> float:
    """How long a throttled (429) row waits: Amplitude's window for HTTP V2 is longer than for
    Batch and the form APIs (docs/amplitude.md, "429")."""
    if endpoint == Endpoint.HTTP_V2:
        return settings.throttle_wait_v2_seconds
    return settings.throttle_wait_batch_seconds


# Requests remembered per endpoint, across workers, to tell a sustained failure from noise.
OUTCOME_WINDOW = 20


def sustained_failure(window: Sequence[bool], after: int, ratio: float) -> bool:
    """Whether the endpoint is failing for everyone, from the outcomes of its last requests
    across workers (True = failed, newest first, at most OUTCOME_WINDOW): at least `after`
    failures, and at least `ratio` of the window failed. Successes dilute the failures, so a
    5xx now and then (20 % of requests, say) never pauses; Amplitude down does after `after`
    requests."""
    failed = sum(1 for f in window if f)
    return failed >= after and failed >= ratio * len(window)


def pause_seconds(failures: int, after: int, base: float, ceiling: float) -> float:
    """How long a pausing endpoint pauses, with `failures` failures in a row (a success resets
    them): `base` up to `after`, doubling per further failure (a failed probe is one), capped."""
    doubled: float = base * 2 ** max(0, failures - after)
    return min(ceiling, doubled)


def probe_seconds(http_timeout: float) -> float:
    """How long, after a pause, the one probe may take before another worker probes instead
    (the probing worker died): its request's timeout and a margin."""
    return http_timeout + 5.0


# --- the shared rate (AIMD) ----------------------------------------------------------------------
# A project-level 429 halves the shared events/s; it then grows back by a tenth of the cut rate
# per second (twice the cut rate after 10 s). A configured plan limit stays a hard ceiling;
# without one the cap lifts when it has grown to 8x the cut (70 s without another 429).
RATE_CUT = 0.5
RATE_GROWTH_PER_SECOND = 0.1
RATE_RELEASE = 8.0
RATE_FLOOR = 100.0  # events/s: a 2000-event request still goes within 20 s
RATE_HOLD_SECONDS = 1.0  # 429s of requests already on their way do not cut it again


def project_throttled(throttled: int, request: int) -> bool:
    """A 429 is the project's limit, not a few users', when it holds back most of the request
    (an answer that names nobody holds back all of it)."""
    return request > 0 and 2 * throttled > request


def allowed_rate(cut_to: float | None, seconds_since_cut: float, ceiling: int) -> float:
    """The shared events-per-second cap now (0: none): the configured `ceiling` (0: none), or,
    after a cut to `cut_to` events/s `seconds_since_cut` ago, that rate grown back linearly,
    never above the ceiling."""
    if cut_to is None:
        return float(ceiling)
    rate = cut_to * (1 + RATE_GROWTH_PER_SECOND * max(0.0, seconds_since_cut))
    if ceiling:
        return min(float(ceiling), rate)
    return 0.0 if rate >= cut_to * RATE_RELEASE else rate


def cut_rate(allowed: float, observed: float, ceiling: int) -> float:
    """The cap after a project-level 429: half of what was allowed, or, with no cap in force,
    half of what the workers were sending (`observed` events/s), never above the ceiling
    nor below RATE_FLOOR."""
    base = allowed or observed or float(ceiling) or 2 * RATE_FLOOR
    if ceiling:
        base = min(base, float(ceiling))
    return max(RATE_FLOOR, base * RATE_CUT)


def may_cut(seconds_since_cut: float | None) -> bool:
    """One cut per RATE_HOLD_SECONDS: the 429s of requests sent before the cut say nothing
    about the new rate."""
    return seconds_since_cut is None or seconds_since_cut >= RATE_HOLD_SECONDS


def cut_lifetime(cut_to: float, ceiling: int) -> float:
    """How long a cut matters: until `allowed_rate` is back at the ceiling or lifted."""
    top = min(float(ceiling) / cut_to, RATE_RELEASE) if ceiling else RATE_RELEASE
    return max(0.0, top - 1) / RATE_GROWTH_PER_SECOND + 1.0


def send_time_limit(lease_seconds: float) -> int:
    """How long a send task may run (Celery's soft time limit): inside its lease, with a margin
    for the acknowledgement; a send renews its lease when less than this is left."""
    return max(1, int(lease_seconds - min(10, lease_seconds // 5)))
