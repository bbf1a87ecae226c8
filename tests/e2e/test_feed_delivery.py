"""Feeds delivered through a real worker: rows a feed enqueued reach Amplitude (the emulator),
a refused row goes again on the next run, and beat runs each feed on its schedule.

How a feed plans and enqueues its rows, on each database and without a worker, is
tests/integration/test_feeds.py.
"""

from __future__ import annotations

import time
import uuid

from support import PG_URL
from support.feeds import USERS, Crm, Feeds, crm_config, props


def test_feed_rows_are_delivered_by_the_worker_and_a_failed_row_is_not_counted_as_delivered(
    pg, tmp_path
):
    crm = Crm(pg.engine)
    feed_name = f"crm{uuid.uuid4().hex[:6]}"  # pg's tables live for the module: a fresh feed
    f = Feeds(pg, tmp_path, crm_config(crm.name).replace("feeds.crm", f"feeds.{feed_name}"))
    try:
        # given a first run delivered
        crm.put(USERS)
        assert f.run(feed_name).rows_enqueued == 3
        assert pg.drain() == {"sent": 3}
        assert pg.state()["users"]["user-00001"]["user_properties"] == {
            "CRM_Segment": "gold",
            "CRM_Group": "b2b",
            "CRM_Level": 3,
        }
        # when a change's row is refused by Amplitude and ends failed
        crm.set("user-00002", segment="platinum")
        pg.emulator.set_faults(fail_next=[{"code": 400, "path": "/batch"}])
        refused = f.run(feed_name)
        assert pg.drain() == {"sent": 3, "failed": 1}
        assert pg.state()["users"]["user-00002"]["user_properties"]["CRM_Segment"] == "silver"
        # then the next run does not count it as delivered: the change goes again, alone
        retried = f.run(feed_name)
        assert retried.settled == {"sent": 0, "not_delivered": 1}
        rows = f.enqueued(retried)
        assert [(r["user_id"], props(r)) for r in rows] == [
            ("user-00002", {"$set": {"CRM_Segment": "platinum"}})
        ]
        assert rows[0]["id"] != refused.first_id
        assert pg.drain() == {"sent": 4, "failed": 1}
        assert pg.state()["users"]["user-00002"]["user_properties"]["CRM_Segment"] == "platinum"
        # and once it was accepted, nothing more goes
        final = f.run(feed_name)
        assert final.rows_enqueued == 0 and final.settled == {"sent": 1, "not_delivered": 0}
    finally:
        crm.drop()


def test_beat_runs_each_feed_on_its_schedule_through_the_worker(make_stack, tmp_path):
    stack = make_stack(PG_URL)
    crm = Crm(stack.engine)
    crm.put(USERS)
    path = tmp_path / "ampsync-feeds.toml"
    path.write_text(crm_config(crm.name, more="schedule = 1"))
    try:
        # given a worker with beat, configured with the feeds file
        stack.start_worker(beat=True, extra_env={"AMPSYNC_FEEDS_FILE": str(path)})
        # then beat runs the feed and the worker delivers its rows, without a manual run
        deadline = time.monotonic() + 60
        while stack.counts() != {"sent": 3} and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stack.counts() == {"sent": 3}, stack.log_tail()
        assert stack.state()["users"]["user-00003"]["user_properties"] == {
            "CRM_Segment": "bronze",
            "CRM_Level": 2,
        }
        # and later ticks enqueue nothing while nothing changes
        time.sleep(2.5)
        assert stack.counts() == {"sent": 3}
    finally:
        stack.stop_workers()
        crm.drop()
