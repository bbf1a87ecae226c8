"""An event row waits for earlier identify rows of its user (device) that are pending or in
flight, so Amplitude stamps it with the properties written before it; a setting turns it off.
Table-driven over PostgreSQL, MariaDB and SQLite."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update
from support import event, identify

from tasks.db import queue


def _insert(engine, tables, rows) -> list[int]:
    with engine.begin() as conn:
        before = conn.execute(select(tables.queue.c.id)).scalars().all()
        queue.insert_rows(conn, tables, rows)
        ids = conn.execute(select(tables.queue.c.id).order_by(tables.queue.c.id)).scalars().all()
    return [i for i in ids if i not in set(before)]


def _claim_events(engine, tables, after_identify: bool = True) -> list[int]:
    with engine.connect() as conn:
        claim = queue.claim(conn, tables, "event", 100, 60, after_identify=after_identify)
        return [row.id for row in queue.load(conn, tables, claim.token)]


def _device_event(device_id: str) -> dict:
    row = event("x", "Order Picked Up")
    row.update(user_id=None, device_id=device_id)
    return row


def _device_identify(device_id: str) -> dict:
    row = identify("x", {"tier": "gold"})
    row.update(user_id=None, device_id=device_id)
    return row


@pytest.mark.parametrize(
    ("earlier", "state", "waits"),
    [
        (identify("user-a0001", {"tier": "gold"}), "pending", True),
        (identify("user-a0001", {"tier": "gold"}), "in_flight", True),
        (identify("user-a0001", {"tier": "gold"}), "backing_off", True),
        (identify("user-a0001", {"tier": "gold"}), "sent", False),
        (identify("user-a0001", {"tier": "gold"}), "failed", False),
        (identify("user-b0001", {"tier": "gold"}), "pending", False),
    ],
    ids=[
        "earlier identify pending",
        "earlier identify in flight",
        "earlier identify backing off",
        "earlier identify sent",
        "earlier identify failed",
        "another user's identify pending",
    ],
)
def test_given_an_earlier_identify_row_when_events_are_claimed_then_the_users_event_waits_while_it_is_unfinished(
    db, earlier, state, waits
):
    engine, tables = db
    # given an identify row of user a (or b) in the given state, then an event of user a
    (identify_id,) = _insert(engine, tables, [earlier])
    (event_id,) = _insert(engine, tables, [event("user-a0001", "Order Picked Up")])
    q = tables.queue
    values = {
        "in_flight": {"status": "in_flight", "claim_token": "t" * 32},
        "sent": {"status": "sent"},
        "failed": {"status": "failed"},
    }.get(state)
    if state == "backing_off":
        with engine.connect() as conn:
            # a retry a minute away: pending, not due
            claim = queue.claim(conn, tables, "identify", 10, 60)
            queue.acknowledge(
                conn,
                tables,
                claim.token,
                queue.Acknowledgement(
                    sent=[], failed={}, retry={(60.0, False, "x"): [identify_id]}
                ),
            )
    elif values:
        with engine.begin() as conn:
            conn.execute(update(q).where(q.c.id == identify_id).values(**values))
    # when events are claimed
    claimed = _claim_events(engine, tables)
    # then the event waits exactly while its user's earlier identify row is unfinished
    assert claimed == ([] if waits else [event_id])


def test_given_a_device_only_identify_when_events_are_claimed_then_the_devices_event_waits(db):
    engine, tables = db
    _insert(engine, tables, [_device_identify("device-0001")])
    _waits, free = _insert(
        engine, tables, [_device_event("device-0001"), _device_event("device-0002")]
    )
    assert _claim_events(engine, tables) == [free]


def test_given_an_identify_row_written_after_the_event_when_events_are_claimed_then_the_event_goes(
    db,
):
    engine, tables = db
    # given an event of user a, then (later) an identify row of user a
    (event_id,) = _insert(engine, tables, [event("user-a0001", "Order Picked Up")])
    _insert(engine, tables, [identify("user-a0001", {"tier": "gold"})])
    # then the event does not wait for properties written after it
    assert _claim_events(engine, tables) == [event_id]


def test_given_the_setting_off_when_events_are_claimed_then_they_do_not_wait(db):
    engine, tables = db
    _insert(engine, tables, [identify("user-a0001", {"tier": "gold"})])
    (event_id,) = _insert(engine, tables, [event("user-a0001", "Order Picked Up")])
    assert _claim_events(engine, tables, after_identify=False) == [event_id]
