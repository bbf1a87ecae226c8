"""What the operator reads, as pure functions: the demo's count of what Amplitude received by
queue kind, and the workers / beat / last-sync lines of `ampsync status`."""

from __future__ import annotations

from tasks.cli.demo import received_by_kind
from tasks.cli.status import render_liveness


def test_the_demo_counts_identify_and_groupidentify_events_as_their_own_kinds():
    events = [
        {"event_type": "$identify"},
        {"event_type": "$identify"},
        {"event_type": "$groupidentify"},
        {"event_type": "Order Picked Up"},
    ]
    assert received_by_kind(events) == {"event": 1, "identify": 2, "group_identify": 1}


REPORT = {
    "broker_error": None,
    "workers": [
        {
            "name": "w1@host",
            "queues": ["ampsync.send", "ampsync.sync"],
            "concurrency": 2,
            "pid": 10,
            "last_heartbeat_seconds_ago": 3.2,
        }
    ],
    "beat": {
        "last_tick_seconds_ago": 400.0,
        "last_entry": "ampsync-sync",
        "host": "host",
        "pid": 11,
        "late": True,
    },
    "last_sync": {"seconds_ago": 401.0, "run_id": "r1", "rows_claimed": 5, "batches_enqueued": 1},
}


def test_status_names_each_live_worker_and_flags_a_late_beat():
    lines = render_liveness(REPORT)
    assert lines[0] == "workers    1 live"
    assert lines[1].startswith("  w1@host  heartbeat 3 s ago  queues ampsync.send, ampsync.sync")
    assert "LATE" in lines[2] and "7 min ago" in lines[2]
    assert lines[3] == "last sync  7 min ago: run r1, 5 rows claimed in 1 batches"


def test_status_says_none_when_no_worker_beats_and_beat_never_ticked():
    lines = render_liveness({**REPORT, "workers": [], "beat": None, "last_sync": None})
    assert lines[0].startswith("workers    NONE") and "ampsync run" in lines[0]
    assert lines[1:] == ["beat       never ticked on this broker", "last sync  none yet"]


def test_status_says_why_workers_are_unknown_when_the_broker_is_unreachable():
    lines = render_liveness({**REPORT, "broker_error": "cannot reach Redis at redis://x:6379/0"})
    assert lines == ["workers    unknown: cannot reach Redis at redis://x:6379/0"]
