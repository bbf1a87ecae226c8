"""Delivery's rules as pure functions: how long a retry waits, when an endpoint pauses and for
how long, how many rows a request carries, how long a send may run inside its lease. No I/O:
the unit tests (tests/unit/test_policy.py) pin each rule with a table of cases."""

from __future__ import annotations

import random
from collections.abc import Callable

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


def throttle_wait(endpoint: str, settings: Settings) -> float:
    """How long a throttled (429) row waits: Amplitude's window for HTTP V2 is longer than for
    Batch and the form APIs (docs/amplitude.md, "429")."""
    if endpoint == Endpoint.HTTP_V2:
        return settings.throttle_wait_v2_seconds
    return settings.throttle_wait_batch_seconds


def pause_seconds(failures: int, after: int, base: float, ceiling: float) -> float:
    """How long an endpoint pauses once it has `failures` failures in a row: nothing below
    `after`, then `base` doubling per further failure, capped."""
    over = failures - after
    return min(ceiling, base * 2**over) if over >= 0 else 0.0


def send_time_limit(lease_seconds: float) -> int:
    """How long a send task may run (Celery's soft time limit): inside its lease, with a margin
    for the acknowledgement; a send renews its lease when less than this is left."""
    return max(1, int(lease_seconds - min(10, lease_seconds // 5)))
