"""The delivery pipeline end to end: queue table → sync → send_batch → Amplitude → acknowledge."""

from __future__ import annotations

from support import event, group, identify


def test_identify_event_and_group_rows_all_end_sent_and_arrive_as_written(pg):
    # given rows of every kind
    ids = pg.insert(
        [
            identify("user-00001", {"CRM_Segment": "gold", "CRM_Level": 3}),
            identify("user-00002", {"$set": {"CRM_Group": "b2b"}, "$add": {"purchases": 2}}),
            event("user-00001", "Order Picked Up", {"order_id": 7}, insert_id="order-7"),
            group("company", "Acme", {"plan": "enterprise"}),
        ]
    )
    # when a sync runs and the queue drains
    summary = pg.sync()
    counts = pg.drain()
    # then every row is sent and Amplitude holds exactly what the rows describe; the first sync
    # left the event for the next one, as user 1's identify row was not sent yet
    assert counts == {"sent": 4}
    assert summary["rows_claimed"] == 3 and summary["batches_enqueued"] == 2
    state = pg.state()
    assert state["users"]["user-00001"]["user_properties"] == {
        "CRM_Segment": "gold",
        "CRM_Level": 3,
    }
    assert state["users"]["user-00002"]["user_properties"] == {"CRM_Group": "b2b", "purchases": 2}
    orders = [e for e in state["events"] if not e["event_type"].startswith("$")]
    assert [(e["event_type"], e["insert_id"]) for e in orders] == [("Order Picked Up", "order-7")]
    user_1 = [e["event_type"] for e in state["events"] if e.get("user_id") == "user-00001"]
    assert user_1 == ["$identify", "Order Picked Up"]  # the event carries the properties
    assert state["groups"]
    assert all(r["sent_at"] is not None for r in pg.rows(*ids).values())
