"""Amplitude's real answers, end to end through a worker and the emulator: no row lost to a
proxy's page or a firewall, group operations applied once, who sent each event, one update
for several `$set`s of a user, throttled users remembered across batches."""

from __future__ import annotations

import json
import time

from sqlalchemy import update
from support import event, group, identify, poll_until

from tasks import outcomes
from tasks.db import sql


def _paused(stack) -> list[dict]:
    return [e for e in stack.status()["endpoints"] if e["paused"]]


def _answers(stack, path: str) -> dict[str, int]:
    return stack.state()["counts"]["requests"].get(path, {})


def test_given_a_gateway_answering_an_html_400_page_when_rows_are_sent_then_none_fails_and_the_endpoint_pauses(
    make_stack,
):
    # given a proxy in front of Amplitude that answers its own HTML 400 page to every request
    stack = make_stack(AMPSYNC_PAUSE_BASE="30")
    stack.start_worker()
    stack.emulator.set_faults(gateway_html_400_rate=1.0)
    ids = stack.insert([identify(f"user-{n:05d}", {"CRM_Level": n}) for n in range(40)])
    # when a sync sends them
    stack.sync()
    paused = poll_until(lambda: _paused(stack))
    # then the endpoint pauses with the reason; no row fails and none spends an attempt
    assert paused and "not Amplitude's answer" in paused[0]["reason"]
    assert poll_until(lambda: stack.counts() == {"pending": 40}), stack.counts()
    rows = stack.rows(*ids).values()
    assert all(r["attempts"] == 0 and "paused" in (r["last_error"] or "") for r in rows)


def test_given_a_gateway_that_recovers_when_the_pause_ends_then_every_row_is_delivered(make_stack):
    # given the same gateway page, then a gateway that answers properly again
    stack = make_stack(AMPSYNC_PAUSE_BASE="1", AMPSYNC_PAUSE_MAX="1")
    stack.start_worker()
    stack.emulator.set_faults(gateway_html_400_rate=1.0)
    stack.insert([identify(f"user-{n:05d}", {"CRM_Level": n}) for n in range(20)])
    stack.sync()
    assert poll_until(lambda: _paused(stack))
    stack.emulator.set_faults(gateway_html_400_rate=0.0)
    # when syncs go on, then every row arrives and none failed
    assert stack.drain(timeout=60) == {"sent": 20}


def test_given_one_row_a_firewall_blocks_when_its_batch_is_sent_then_only_that_row_fails(
    make_stack,
):
    # given twenty events, one carrying text Amplitude's firewall blocks
    stack = make_stack()
    stack.start_worker()
    stack.emulator.set_faults(firewall_block=["<script>alert(1)</script>"])
    rows = [event(f"user-{n:05d}", "Order Picked Up", {"n": n}) for n in range(20)]
    rows[13]["properties"] = json.dumps({"note": "<script>alert(1)</script>"})
    ids = stack.insert(rows)
    # when they are sent
    counts = stack.drain(timeout=60)
    # then the firewall's row alone fails, with its answer; the endpoint is not paused
    assert counts == {"sent": 19, "failed": 1}
    bad = stack.rows(ids[13])[ids[13]]
    assert bad["last_error"].startswith(outcomes.REJECTED) and "403" in bad["last_error"]
    assert not _paused(stack)
    assert stack.state()["counts"]["events_unique"] == 19


def test_given_a_firewall_blocking_every_request_when_rows_are_sent_then_none_fails_and_the_endpoint_pauses(
    make_stack,
):
    # given a region block: every request is answered 403
    stack = make_stack(AMPSYNC_PAUSE_BASE="30")
    stack.start_worker()
    stack.emulator.set_faults(firewall_block_all=True)
    stack.insert([event(f"user-{n:05d}", "Order Picked Up") for n in range(16)])
    # when a sync sends them
    stack.sync()
    paused = poll_until(lambda: _paused(stack))
    # then the endpoint pauses and every row waits, none failed
    assert paused and "403" in paused[0]["reason"]
    assert poll_until(lambda: stack.counts() == {"pending": 16}), stack.counts()


def test_given_group_adds_and_500s_after_ingest_when_drained_then_each_add_is_applied_once(
    make_stack,
):
    # given 31 groups, each with two `$add` rows, and an Amplitude that answers 500 after
    # ingesting half of the requests
    stack = make_stack(AMPSYNC_BATCH_SIZE="8")
    stack.start_worker()
    stack.emulator.set_faults(fail_after_rate=0.5, seed=7)
    rows = [group("company", f"acme-{n:02d}", {"$add": {"orders": 1}}) for n in range(31)] * 2
    stack.insert(rows)
    # when every row is delivered (group rows go as $groupidentify events with insert_ids)
    assert stack.drain(timeout=90) == {"sent": 62}
    # then every counter is exactly 2: a re-send applied nothing twice
    groups = stack.state()["groups"]["company"]
    assert {name: props["orders"] for name, props in groups.items()} == {
        f"acme-{n:02d}": 2 for n in range(31)
    }
    assert _answers(stack, "/batch").get("500", 0) > 0  # the fault really struck


def test_given_events_when_sent_then_each_names_ampsync_and_may_skip_the_user_property_sync(pg):
    # given an event that asks Amplitude not to sync user properties (a backfill)
    ids = pg.insert(
        [
            event(
                "user-00001",
                "Order Picked Up",
                extra=json.dumps({"$skip_user_properties_sync": True}),
            ),
            event("user-00002", "Order Picked Up"),
        ]
    )
    # when they are sent, then both are accepted and say who sent them
    assert pg.drain() == {"sent": 2}
    events = pg.state()["events"]
    assert {e["library"].split("/")[0] for e in events} == {"ampsync"}
    assert [
        e.get("$skip_user_properties_sync") for e in events if e["user_id"] == "user-00001"
    ] == [True]
    assert all(r["status"] == "sent" for r in pg.rows(*ids).values())


def test_given_several_set_only_identify_rows_of_a_user_when_sent_then_one_update_carries_the_latest_values(
    pg,
):
    # given three `$set`-only identify rows of one user, and one of another user
    ids = pg.insert(
        [
            identify("user-00001", {"tier": "bronze", "level": 1}),
            identify("user-00001", {"tier": "silver"}),
            identify("user-00002", {"tier": "gold"}),
            identify("user-00001", {"tier": "gold", "score": 9}),
        ]
    )
    # when they are sent
    assert pg.drain() == {"sent": 4}
    # then user 1 got one $identify with the later values; every row is acknowledged
    state = pg.state()
    identifies = [e for e in state["events"] if e["event_type"] == "$identify"]
    assert sorted(e["user_id"] for e in identifies) == ["user-00001", "user-00002"]
    assert state["users"]["user-00001"]["user_properties"] == {
        "tier": "gold",
        "level": 1,
        "score": 9,
    }
    assert all(r["status"] == "sent" for r in pg.rows(*ids).values())


def test_given_a_throttled_user_when_later_batches_carry_their_rows_then_those_rows_wait_without_another_429(
    make_stack,
):
    # given batches of four events, each with one row of a user Amplitude throttles for 3 s,
    # one worker process so the batches go one after another, and a 5 s throttle wait
    stack = make_stack(AMPSYNC_BATCH_SIZE="4", AMPSYNC_THROTTLE_WAIT_BATCH="5")
    stack.start_worker(concurrency=1)
    stack.emulator.set_faults(throttled_users={"user-hot01": time.time() + 3})
    rows = []
    for n in range(3):
        rows.append(event("user-hot01", "Page Viewed", {"n": n}))
        rows += [event(f"user-{n}{m:04d}", "Page Viewed") for m in range(3)]
    stack.insert(rows)
    # when they are drained
    assert stack.drain(timeout=60) == {"sent": 12}
    # then only the first batch drew a 429: the others held the hot user's rows
    assert _answers(stack, "/batch").get("429", 0) == 1


def test_given_group_rows_through_the_form_api_when_packed_then_no_request_holds_over_1024_group_properties(
    make_stack,
):
    # given three group rows of 600 properties each, sent through the form Group Identify API
    stack = make_stack(AMPSYNC_GROUP_IDENTIFY_API="groupidentify")
    stack.start_worker()
    props = {f"p{i:04d}": i for i in range(600)}
    stack.insert([group("company", f"acme-{n}", props) for n in range(3)])
    # when they are sent
    assert stack.drain() == {"sent": 3}
    # then each request stayed within 1024 group properties: no 413 was needed
    answers = _answers(stack, "/groupidentify")
    assert answers.get("413", 0) == 0 and answers.get("200", 0) == 3


def test_given_a_user_updated_often_in_the_last_hour_when_status_runs_then_it_names_them(
    make_stack,
):
    # given 1,400 identify rows of one user sent in the last hour, 20 of another
    stack = make_stack()
    ids = stack.insert(
        [identify("user-busy01", {"n": n}) for n in range(1400)]
        + [identify("user-calm01", {"n": n}) for n in range(20)]
    )
    q = stack.tables.queue
    with stack.engine.begin() as conn:
        conn.execute(update(q).where(q.c.id.in_(ids)).values(status="sent", sent_at=sql.utcnow()))
    # when status reports, then the busy user is named with their count, the calm one is not
    assert stack.status()["users_near_update_limit"] == [
        {"user_id": "user-busy01", "updates_last_hour": 1400}
    ]
