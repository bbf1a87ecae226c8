"""Each Amplitude answer, from the emulator, and what it does to the rows of the request."""

from __future__ import annotations

import json
import time

import pytest
from support import API_KEY, event, identify, poll_until

from tasks import outcomes


def test_a_400_naming_event_indexes_fails_those_rows_and_delivers_the_rest(pg):
    # given three events, the middle one with a price Amplitude rejects as a field value
    ids = pg.insert(
        [
            event("user-00001", "Order Picked Up", insert_id="o-1"),
            event(
                "user-00002", "Order Picked Up", insert_id="o-2", extra=json.dumps({"price": "abc"})
            ),
            event("user-00003", "Order Picked Up", insert_id="o-3"),
        ]
    )
    # when they are sent in one request
    counts = pg.drain()
    # then only the named row fails, with the field and Amplitude's words, and the others arrive
    assert counts == {"sent": 2, "failed": 1}
    bad = pg.rows(ids[1])[ids[1]]
    assert bad["status"] == "failed"
    assert bad["last_error"].startswith(outcomes.REJECTED)
    assert "price" in bad["last_error"] and "Invalid field values" in bad["last_error"]
    assert pg.state()["counts"]["events_unique"] == 2


def test_a_400_naming_no_row_is_split_until_the_bad_row_is_isolated(make_stack):
    # given identify rows through the form Identify API, one with `groups` Amplitude rejects
    stack = make_stack(AMPSYNC_IDENTIFY_API="identify")
    stack.start_worker()
    rows = [identify(f"user-{n:05d}", {"CRM_Level": n}) for n in range(8)]
    rows[5]["extra"] = json.dumps({"groups": "not-an-object"})
    ids = stack.insert(rows)
    # when they are sent (the form API answers a plain 400 that names no row)
    counts = stack.drain()
    # then bisection isolates the one bad row; the seven others are delivered
    assert counts == {"sent": 7, "failed": 1}
    bad = stack.rows(ids[5])[ids[5]]
    assert bad["last_error"].startswith(outcomes.REJECTED) and "400" in bad["last_error"]
    users = stack.state()["users"]
    assert {u for u in users} == {f"user-{n:05d}" for n in range(8) if n != 5}


def test_an_invalid_api_key_pauses_the_endpoint_and_spends_no_attempts(make_stack):
    # given a worker with a key Amplitude does not know
    stack = make_stack(AMPLITUDE_API_KEY="wrong-key-000000", AMPSYNC_PAUSE_BASE="30")
    stack.start_worker()
    ids = stack.insert([identify(f"user-{n:05d}", {"CRM_Level": n}) for n in range(5)])
    # when a sync sends them
    stack.sync()
    paused = poll_until(lambda: [e for e in stack_endpoints(stack) if e["paused"]])
    # then the endpoint is paused with the reason, rows stay pending with their attempts intact
    assert paused and "API key" in paused[0]["reason"]
    assert poll_until(lambda: stack.counts() == {"pending": 5})
    rows = stack.rows(*ids).values()
    assert all(r["attempts"] == 0 for r in rows)
    assert all("paused" in (r["last_error"] or "") for r in rows)
    # and further syncs send nothing while it is paused
    requests_before = _requests(stack)
    stack.sync()
    time.sleep(1)
    assert _requests(stack) == requests_before
    # and the key is nowhere in what a person reads
    assert all(API_KEY not in (r["last_error"] or "") for r in rows)
    assert all("wrong-key-000000" not in (r["last_error"] or "") for r in rows)
    assert "wrong-key-000000" not in stack.log_tail(100_000)


def test_a_403_for_a_batch_of_one_row_retries_it_as_transient_and_it_goes_through(pg):
    """A row alone cannot be told from a region block (no twin to compare with): it retries
    with backoff, its attempt counted; one 403 pauses nothing. Several rows: see
    test_amplitude_answers.py (the firewall's row fails alone; a block of all pauses)."""
    ids = pg.insert([identify("user-00001", {"CRM_Level": 1})])
    pg.emulator.set_faults(fail_next=[{"code": 403}])
    assert pg.drain(timeout=30) == {"sent": 1}
    row = pg.rows(*ids)[ids[0]]
    assert row["attempts"] == 2  # the 403'd attempt counted
    assert not any(e["paused"] for e in stack_endpoints(pg))


def test_a_413_splits_the_request_and_every_row_is_delivered(pg):
    pg.emulator.set_faults(max_events_per_request=3)
    pg.insert([event(f"user-{n:05d}", "Viewed", insert_id=f"v-{n}") for n in range(10)])
    assert pg.drain() == {"sent": 10}
    state = pg.state()
    assert state["counts"]["events_unique"] == 10
    assert state["counts"]["requests"]["/batch"].get("413", 0) >= 1


def test_a_429_holds_back_only_the_throttled_users_rows(pg):
    # given a user Amplitude throttles for two seconds, and another user
    pg.emulator.set_faults(throttled_users={"user-hot01": time.time() + 2})
    ids = pg.insert(
        [
            event("user-hot01", "Viewed", insert_id="h-1"),
            event("user-cold1", "Viewed", insert_id="c-1"),
            event("user-hot01", "Viewed", insert_id="h-2"),
        ]
    )
    # when a sync sends them
    pg.sync()
    # then the other user's row is sent at once and the throttled rows wait without an attempt
    assert poll_until(lambda: pg.rows(ids[1])[ids[1]]["status"] == "sent")
    hot = pg.rows(ids[0], ids[2])
    assert all(r["status"] in ("pending", "in_flight", "sent") for r in hot.values())
    waited = [r for r in hot.values() if r["status"] == "pending"]
    assert waited and all(r["attempts"] == 0 and "429" in r["last_error"] for r in waited)
    # and after the throttle they are delivered
    assert pg.drain(timeout=30) == {"sent": 3}
    assert pg.state()["counts"]["events_unique"] == 3


def test_users_over_the_daily_quota_wait_and_are_retried_later(pg):
    pg.emulator.set_faults(daily_quota_users=["user-busy1"])
    ids = pg.insert(
        [
            event("user-busy1", "Viewed", insert_id="b-1"),
            event("user-calm1", "Viewed", insert_id="c-1"),
        ]
    )
    pg.sync()
    assert poll_until(lambda: pg.rows(ids[1])[ids[1]]["status"] == "sent")
    busy = poll_until(lambda: (r := pg.rows(ids[0])[ids[0]])["status"] == "pending" and r)
    assert "daily quota" in busy["last_error"] and busy["attempts"] == 0
    pg.emulator.set_faults(daily_quota_users=[])
    assert pg.drain(timeout=30) == {"sent": 2}


@pytest.mark.parametrize(
    "fault",
    [
        {"code": 500},
        {"code": 502},
        {"code": 503},
        {"code": 504},
        {"html": True},
        {"reset": True},
    ],
)
def test_a_transient_failure_backs_the_row_off_and_it_is_delivered_later(pg, fault):
    ids = pg.insert([identify("user-00001", {"CRM_Level": 1})])
    pg.emulator.set_faults(fail_next=[fault])
    pg.sync()
    row = poll_until(lambda: (r := pg.rows(*ids)[ids[0]])["status"] == "pending" and r)
    assert row["attempts"] == 1 and row["next_attempt_at"] is not None
    assert row["last_error"].startswith(outcomes.RETRYING)
    assert pg.drain() == {"sent": 1}
    assert pg.state()["users"]["user-00001"]["user_properties"] == {"CRM_Level": 1}


def test_a_timeout_counts_as_transient_and_the_row_is_delivered_later(make_stack):
    stack = make_stack(AMPSYNC_HTTP_TIMEOUT="1")
    stack.start_worker()
    stack.emulator.set_faults(fail_next=[{"slow": 2}])
    ids = stack.insert([identify("user-00001", {"CRM_Level": 1})])
    assert stack.drain() == {"sent": 1}
    assert stack.rows(*ids)[ids[0]]["attempts"] == 2


def test_a_row_that_keeps_failing_ends_failed_after_the_maximum_attempts(make_stack):
    # given an endpoint answering 500 to every request, and pauses that never kick in
    stack = make_stack(AMPSYNC_MAX_ATTEMPTS="3", AMPSYNC_PAUSE_AFTER_FAILURES="20")
    stack.start_worker()
    stack.emulator.set_faults(fail_before_rate=1.0, fail_codes=[500])
    ids = stack.insert([identify("user-00001", {"CRM_Level": 1})])
    # when it has been tried three times
    assert stack.drain() == {"failed": 1}
    row = stack.rows(*ids)[ids[0]]
    # then it is failed with the last error, after exactly three attempts
    assert row["attempts"] == 3
    assert (
        row["last_error"].startswith(f"{outcomes.GAVE_UP} 3 attempts")
        and "500" in row["last_error"]
    )


def test_a_500_after_ingest_does_not_count_an_add_twice(pg):
    # given a counter increment, and Amplitude ingesting it before answering 500
    pg.emulator.set_faults(fail_next=[{"code": 500, "after_ingest": True}])
    pg.insert([identify("user-00001", {"$add": {"purchases": 1}, "$append": {"stores": "A"}})])
    # when the row is re-sent after the 500
    assert pg.drain() == {"sent": 1}
    # then the $identify event's insert_id makes Amplitude drop the duplicate
    state = pg.state()
    assert state["users"]["user-00001"]["user_properties"] == {"purchases": 1, "stores": ["A"]}
    assert state["counts"]["duplicates"] == 1


def test_three_rows_for_one_user_end_with_the_last_rows_value_when_the_first_send_fails(pg):
    pg.emulator.set_faults(fail_next=[{"code": 500}])
    pg.insert([identify("user-00001", {"CRM_Segment": s}) for s in ("bronze", "silver", "gold")])
    assert pg.drain() == {"sent": 3}
    assert pg.state()["users"]["user-00001"]["user_properties"] == {"CRM_Segment": "gold"}


def stack_endpoints(stack) -> list[dict]:
    return stack.status()["endpoints"]


def _requests(stack) -> int:
    counts = stack.state()["counts"]["requests"]
    return sum(sum(by_status.values()) for by_status in counts.values())
