"""Flaky Amplitude (issue 13): a 5xx now and then is retried within seconds while other batches
go on, and only failure that is consistent across requests and workers pauses the endpoint;
a throttled project slows the shared rate instead of stopping. Real workers on real Redis and
PostgreSQL, the emulator's faults as Amplitude, the production backoff and pause settings.
"""

from __future__ import annotations

import time

import pytest
from support.reliability import (
    Workload,
    assert_exactly_once,
    audit,
    production_delivery,
    report,
)

from tasks.broker import redis_client
from tasks.db import endpoints
from tasks.delivery.shared import RateLimiter

pytestmark = pytest.mark.reliability

ROWS = 800  # half identify rows ($add, $append: a double application shows), half events
# The settings a user runs with, not the tests' fast clocks: the target is about them.
DEFAULTS = {**production_delivery(), "AMPSYNC_BATCH_SIZE": "50"}


def timed_drain(make_stack, **faults) -> tuple[float, object, Workload, dict]:
    stack = make_stack(**DEFAULTS)
    work = Workload()
    work.insert(stack, ROWS)
    if faults:
        stack.emulator.set_faults(**faults)
    stack.start_worker(concurrency=2)
    t0 = time.monotonic()
    stack.drain(timeout=180)
    seconds = time.monotonic() - t0
    return seconds, stack, work, stack.state()


def test_twenty_percent_5xx_before_ingest_and_ten_after_drain_every_row_once_within_3x_clean_plus_30s(
    make_stack,
):
    # given the same mixed workload (per-user sequences of identify rows, and events), drained
    # once from a healthy Amplitude to measure the clean time on this machine now
    clean_seconds, stack, work, _ = timed_drain(make_stack)
    assert_exactly_once(stack, work, audit(stack, work))
    # when Amplitude fails 20 % of requests before ingesting them and 10 % after
    seconds, stack, work, state = timed_drain(
        make_stack, fail_before_rate=0.2, fail_after_rate=0.1, seed=13
    )
    injected = sum(
        n
        for per in state["counts"]["requests"].values()
        for code, n in per.items()
        if code != "200"
    )
    result = audit(stack, work)
    report("flaky_5xx_20_before_10_after", work, injected, result)
    print(f"clean {clean_seconds:.1f} s, flaky {seconds:.1f} s")
    # then every row is applied exactly once, each user's rows in order
    assert injected >= 5, state["counts"]["requests"]
    assert_exactly_once(stack, work, result)
    # and the drain finished within the bound: 3x the clean time plus 30 s
    assert seconds <= 3 * clean_seconds + 30, (seconds, clean_seconds, stack.log_tail())
    # and no endpoint was paused on the way: the failures were isolated
    assert "paused for" not in "".join(p.read_text(errors="replace") for p in stack.logs)


def test_amplitude_throttling_the_whole_project_cuts_the_shared_rate_and_other_batches_go_on(
    make_stack,
):
    # given a mixed workload and Amplitude answering a 429 that names nobody (the project's
    # limit, not a user's) to three requests, while rows of throttled users would wait 30 s
    stack = make_stack(**DEFAULTS, AMPSYNC_THROTTLE_WAIT_BATCH="3")
    work = Workload()
    work.insert(stack, 400)
    stack.emulator.set_faults(fail_next=[{"code": 429}] * 3)
    redis = redis_client(stack.env["CELERY_BROKER_URL"])
    assert redis is not None
    # when it drains
    stack.start_worker(concurrency=2)
    stack.drain(timeout=90)
    # then the shared rate was cut, and is growing back
    cut = redis.get(RateLimiter.CUT_KEY)
    assert cut is not None, stack.log_tail()
    assert float(cut.split(b":")[0]) >= 100
    assert "throttled the project: shared rate cut" in stack.log_tail(20000)
    # and the throttled requests' users were not held in other batches for the throttle wait
    assert not redis.keys("ampsync:throttled:*")
    # and every row went once
    assert_exactly_once(stack, work, audit(stack, work))


def test_two_workers_first_failures_at_once_count_both_and_neither_send_crashes(make_stack):
    # given an endpoint with no failures yet (no row in the endpoints table), and a second
    # worker whose first failure is recorded between this one's read of the tally and its write
    stack = make_stack()
    raced: list[float] = []

    def other_worker_fails_meanwhile(failures: int) -> float:
        if not raced:
            with stack.engine.connect() as other:
                raced.append(
                    endpoints.record_failure(
                        other, stack.tables, "batch", 1, "HTTP 503", lambda _n: 0.0
                    )
                )
        return 0.0

    # when this worker records its failure
    with stack.engine.connect() as conn:
        endpoints.record_failure(
            conn, stack.tables, "batch", 1, "HTTP 500", other_worker_fails_meanwhile
        )
        state = endpoints.read(conn, stack.tables, "batch")
    # then both failures are counted, and no error reached the send
    assert raced == [0.0]
    assert state.failures == 2
