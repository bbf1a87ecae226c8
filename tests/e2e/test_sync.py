"""How `sync` fans out: only as much as workers can start within a lease, never waiting on its
send tasks, never stuck behind them, and never sending a row twice when two syncs run at once."""

from __future__ import annotations

import base64
import json
import time

from sqlalchemy import update
from support import REDIS_URL, event, identify

import beat_schedule
from tasks import sync
from tasks.broker import redis_client
from tasks.db import queue, sql
from tasks.delivery.pipeline import Pipeline
from tasks.delivery.shared import ClaimFloors
from tasks.settings import Settings
from tasks.worker.app import SEND_QUEUE, SYNC_QUEUE


def _sync_only_worker(stack):
    """A real worker that runs syncs but no sends: send tasks stay in the broker."""
    return stack.start_worker(concurrency=1, queues=SYNC_QUEUE)


def test_a_sync_claims_no_more_batches_than_workers_can_start_within_a_lease(make_stack):
    # given 100 rows in batches of 10, room for 3 waiting batches, and no send worker yet
    stack = make_stack(AMPSYNC_BATCH_SIZE="10", AMPSYNC_MAX_QUEUED_BATCHES="3")
    _sync_only_worker(stack)
    stack.insert([event(f"user-{n:05d}", "Viewed") for n in range(100)])
    # when two syncs run while nothing sends
    first = sync.delay().get(timeout=30)
    second = sync.delay().get(timeout=30)
    # then the first claims three batches, the second nothing, and the rest stays pending
    assert (first["rows_claimed"], first["batches_enqueued"]) == (30, 3)
    assert second["rows_claimed"] == 0 and second["more_due"] is True
    assert stack.counts() == {"in_flight": 30, "pending": 70}
    client = redis_client(REDIS_URL)
    assert client.llen(SEND_QUEUE) == 3
    # and the messages carry a claim token, never rows or the key
    messages = [json.loads(m) for m in client.lrange(SEND_QUEUE, 0, -1)]
    # (kombu stores the body base64-encoded: read it as the worker will)
    bodies = [base64.b64decode(m["body"]).decode() for m in messages]
    headers = [m["headers"] for m in messages]
    assert all(h["task"] == "ampsync.send_batch" for h in headers)
    assert all(len(h["argsrepr"]) < 80 and "Viewed" not in h["argsrepr"] for h in headers)
    for body in bodies:
        (kind, token, _run_id), _kwargs, _embed = json.loads(body)
        assert kind == "event" and len(token) == 32
        assert stack.env["AMPLITUDE_API_KEY"] not in body and "Viewed" not in body
    # when a send worker comes, the syncs that follow up drain everything
    stack.start_worker(concurrency=2)
    assert stack.drain() == {"sent": 100}


def test_sync_keeps_going_by_itself_while_due_rows_remain(make_stack):
    # given more rows than one sync may claim, and a long beat interval (no beat running)
    stack = make_stack(AMPSYNC_BATCH_SIZE="20", AMPSYNC_MAX_QUEUED_BATCHES="2")
    stack.start_worker(concurrency=2)
    stack.insert([identify(f"user-{n:05d}", {"n": n}) for n in range(200)])
    # when one sync is started by hand
    sync.delay().get(timeout=30)
    # then follow-up syncs drain the queue without anyone calling sync again
    deadline = time.monotonic() + 60
    while stack.counts() != {"sent": 200} and time.monotonic() < deadline:
        time.sleep(0.3)
    assert stack.counts() == {"sent": 200}


def test_a_sync_starts_while_a_backlog_of_slow_send_tasks_is_still_waiting(make_stack):
    # given one worker process and six batches that each take a second to send
    stack = make_stack(AMPSYNC_BATCH_SIZE="5", AMPSYNC_MAX_QUEUED_BATCHES="6")
    stack.emulator.set_faults(latency_ms=1000)
    stack.insert([event(f"user-{n:05d}", "Viewed") for n in range(30)])
    stack.start_worker(concurrency=1)
    assert sync.delay().get(timeout=30)["batches_enqueued"] == 6
    # when another sync is asked for behind that backlog
    sync.delay().get(timeout=30)
    # then it ran before the backlog was through: most batches are still waiting
    assert stack.counts().get("in_flight", 0) >= 15
    stack.emulator.set_faults(latency_ms=0)
    assert stack.drain() == {"sent": 30}


def test_two_syncs_at_once_with_several_worker_processes_never_send_a_row_twice(make_stack):
    # given two workers with two processes each, and 3000 rows of every kind
    stack = make_stack(AMPSYNC_BATCH_SIZE="100", AMPSYNC_MAX_QUEUED_BATCHES="6")
    stack.start_worker(concurrency=2)
    stack.start_worker(concurrency=2)
    rows = [event(f"user-{n % 700:05d}", "Viewed", {"n": n}) for n in range(2000)]
    rows += [identify(f"user-{n % 300:05d}", {"$add": {"visits": 1}}) for n in range(1000)]
    stack.insert(rows)
    # when two syncs start at the same moment, and then the queue drains
    first, second = sync.delay(), sync.delay()
    claimed = first.get(timeout=30)["rows_claimed"] + second.get(timeout=30)["rows_claimed"]
    assert stack.drain(timeout=120) == {"sent": 3000}
    # then Amplitude received every row exactly once
    counts = stack.state()["counts"]
    assert claimed > 0
    assert counts["events_unique"] == 3000 and counts["duplicates"] == 0
    assert counts["events_received"] == 3000
    visits = [
        u["user_properties"]["visits"]
        for u in stack.state()["users"].values()
        if "visits" in u["user_properties"]
    ]
    assert sorted(set(visits)) == [3, 4] and sum(visits) == 1000


def test_requests_respect_the_events_per_second_cap_shared_by_all_workers(make_stack):
    # given a cap of 40 events/s and two workers
    stack = make_stack(AMPSYNC_EVENTS_PER_SECOND="40")
    stack.start_worker(concurrency=2)
    stack.start_worker(concurrency=1)
    stack.emulator.set_faults(max_events_per_request=40)  # a larger request would get a 413
    stack.insert([event(f"user-{n:05d}", "Viewed") for n in range(120)])
    started = time.monotonic()
    assert stack.drain() == {"sent": 120}
    # then no request carried more than a second's worth, and 120 events took 2 s at least
    assert time.monotonic() - started >= 2.0
    assert stack.state()["counts"]["requests"]["/batch"] == {"200": 3}


def test_long_strings_are_cut_to_amplitudes_limit_and_the_cuts_are_counted(pg):
    pg.insert([identify("user-00001", {"note": "x" * 3000, "ok": "short"})])
    assert pg.drain() == {"sent": 1}
    assert pg.state()["users"]["user-00001"]["user_properties"]["note"] == "x" * 1024
    r = pg.tables.runs
    from sqlalchemy import select

    with pg.engine.connect() as conn:
        cuts = conn.execute(select(r.c.values_truncated).where(r.c.task == "batch")).scalar_one()
    assert cuts == 1


def test_beat_runs_sync_every_interval_and_drops_ticks_it_could_not_run(monkeypatch):
    monkeypatch.setenv("AMPSYNC_SYNC_INTERVAL", "42")
    from tasks import settings

    settings.get.cache_clear()
    try:
        entry = beat_schedule.schedule()["ampsync-sync"]
    finally:
        settings.get.cache_clear()
    assert entry == {"task": "ampsync.sync", "schedule": 42.0, "options": {"expires": 42.0}}


class _Claims:
    """A pipeline on the stack's database and Redis whose syncs only record what they claimed
    (no worker: the send tasks are not the subject here)."""

    def __init__(self, stack, batch_size: int) -> None:
        self.stack = stack
        self.pipeline = Pipeline(
            Settings(
                AMPSYNC_DATABASE_URL=stack.url,
                AMPSYNC_QUEUE_TABLE=stack.table,
                CELERY_BROKER_URL=REDIS_URL,
                AMPSYNC_BATCH_SIZE=str(batch_size),
            )
        )
        self.floor_key = self.pipeline.floors.key("event")

    def sync(self, batches: int, thorough: bool) -> list[list[int]]:
        """One sync with room for `batches`; the ids of each batch it claimed, in order."""
        tokens: list[str] = []
        room = self.pipeline.settings.max_queued_batches - batches
        self.pipeline.sync(["event"], lambda _k, token, _r: tokens.append(token), room, thorough)
        rows = self.stack.rows()
        by_token = {t: sorted(i for i, r in rows.items() if r["claim_token"] == t) for t in tokens}
        return [by_token[t] for t in tokens]

    def release(self, ids: list[int]) -> None:
        """Expire these rows' lease and let the sweep give them back: due again, below the floor."""
        q = self.stack.tables.queue
        with self.stack.engine.connect() as conn:
            with conn.begin():
                conn.execute(
                    update(q).where(q.c.id.in_(ids)).values(locked_until=sql.utcnow_plus(-1))
                )
            assert queue.sweep(conn, self.stack.tables, max_attempts=12) == (0, len(ids))


def test_follow_up_syncs_claim_past_the_last_full_batch_and_return_below_it_once_above_runs_out(
    make_stack,
):
    # given 50 events claimed in batches of 10, the first two batches by a beat sync
    stack = make_stack()
    ids = stack.insert([event(f"user-{n:05d}", "Viewed") for n in range(50)])
    claims = _Claims(stack, batch_size=10)
    assert claims.sync(batches=2, thorough=True) == [ids[0:10], ids[10:20]]
    # and the first batch's rows are due again (their lease expired)
    claims.release(ids[0:10])
    # when a follow-up sync claims four batches
    batches = claims.sync(batches=4, thorough=False)
    # then it continues past the floor, and only when nothing is left above it does it come
    # back for the rows below
    assert batches == [ids[20:30], ids[30:40], ids[40:50], ids[0:10]]
    assert stack.counts() == {"in_flight": 50}


def test_once_the_floor_expires_the_next_sync_starts_at_the_oldest_due_row(make_stack):
    # given a floor that lives a second, past the first 20 of 40 events, and the first batch
    # due again
    stack = make_stack()
    ids = stack.insert([event(f"user-{n:05d}", "Viewed") for n in range(40)])
    claims = _Claims(stack, batch_size=10)
    claims.pipeline.floors.LIFETIME_SECONDS = 1
    claims.sync(batches=2, thorough=True)
    claims.release(ids[0:10])
    # when a sync runs while the floor stands, then it claims above it
    assert claims.sync(batches=1, thorough=True) == [ids[20:30]]
    # when a sync runs after the floor expired, then it starts at the oldest due rows again
    time.sleep(1.2)
    assert claims.sync(batches=2, thorough=True) == [ids[0:10], ids[30:40]]


def test_the_floor_expires_a_minute_after_it_was_set_however_often_it_is_raised(make_stack):
    # given a follow-up sync that set the floor
    stack = make_stack()
    stack.insert([event(f"user-{n:05d}", "Viewed") for n in range(40)])
    claims = _Claims(stack, batch_size=10)
    claims.sync(batches=1, thorough=False)
    redis = claims.pipeline.redis
    assert int(redis.get(claims.floor_key)) > 0
    first_ttl = redis.pttl(claims.floor_key)
    assert 0 < first_ttl <= ClaimFloors.LIFETIME_SECONDS * 1000
    time.sleep(0.3)
    # when the next follow-ups raise it
    claims.sync(batches=1, thorough=False)
    # then it is higher but its lifetime was not renewed
    assert int(redis.get(claims.floor_key)) > 10
    assert redis.pttl(claims.floor_key) <= first_ttl - 250
    # and when a claim comes back short, the floor is gone
    claims.sync(batches=3, thorough=False)
    assert redis.get(claims.floor_key) is None
