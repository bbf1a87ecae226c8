"""The queue table's statements on real databases: claim, order per user, lease, acknowledge."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select, update
from support import BACKENDS, event, identify

from tasks import outcomes
from tasks.db import engine as db_engine
from tasks.db import queue, schema, setup, sql


def _insert(engine, tables, rows) -> list[int]:
    with engine.begin() as conn:
        queue.insert_rows(conn, tables, rows)
        return list(conn.execute(select(tables.queue.c.id).order_by(tables.queue.c.id)).scalars())


def _claimed_ids(engine, tables, token) -> list[int]:
    q = tables.queue
    with engine.connect() as conn:
        return list(
            conn.execute(select(q.c.id).where(q.c.claim_token == token).order_by(q.c.id)).scalars()
        )


def test_init_db_is_safe_to_run_again_and_adds_only_what_is_missing(db):
    engine, tables = db
    # given an existing table (from the fixture); when init-db runs again, then nothing is done
    assert setup.init_db(engine, tables) == []
    with engine.connect() as conn:
        assert setup.check_table(conn, tables) is None


def test_a_later_row_of_a_user_waits_while_an_earlier_one_is_in_flight(db):
    engine, tables = db
    ids = _insert(
        engine, tables, [identify("user-a0001", {"n": 1}), identify("user-b0001", {"n": 1})]
    )
    with engine.connect() as conn:
        first = queue.claim(conn, tables, "identify", 10, 60)
    assert _claimed_ids(engine, tables, first.token) == ids
    # given a new row for user a while a's first row is in flight, and one for a new user c
    later = _insert(
        engine, tables, [identify("user-a0001", {"n": 2}), identify("user-c0001", {"n": 1})]
    )[2:]
    # when another claim runs
    with engine.connect() as conn:
        second = queue.claim(conn, tables, "identify", 10, 60)
    # then only user c's row is claimed; user a's later row waits for the first
    assert _claimed_ids(engine, tables, second.token) == [later[1]]


def test_earlier_due_rows_of_a_user_travel_in_the_same_batch_in_id_order(db):
    engine, tables = db
    ids = _insert(engine, tables, [identify("user-a0001", {"n": n}) for n in range(3)])
    with engine.connect() as conn:
        claim = queue.claim(conn, tables, "identify", 10, 60)
        rows = queue.load(conn, tables, claim.token)
    assert [r.id for r in rows] == ids


def test_a_row_backing_off_holds_back_later_rows_of_its_user_only(db):
    engine, tables = db
    ids = _insert(
        engine,
        tables,
        [
            identify("user-a0001", {"n": 1}),
            identify("user-a0001", {"n": 2}),
            identify("user-b0001", {"n": 1}),
        ],
    )
    q = tables.queue
    with engine.begin() as conn:  # the first row of user a failed transiently and waits
        conn.execute(update(q).where(q.c.id == ids[0]).values(next_attempt_at=sql.utcnow_plus(60)))
    with engine.connect() as conn:
        claim = queue.claim(conn, tables, "identify", 10, 60)
    assert _claimed_ids(engine, tables, claim.token) == [ids[2]]


def test_events_are_not_held_back_by_order(db):
    engine, tables = db
    ids = _insert(engine, tables, [event("user-a0001", "Viewed"), event("user-a0001", "Viewed")])
    with engine.connect() as conn:
        first = queue.claim(conn, tables, "event", 1, 60)
        second = queue.claim(conn, tables, "event", 1, 60)
    assert _claimed_ids(engine, tables, first.token) == [ids[0]]
    assert _claimed_ids(engine, tables, second.token) == [ids[1]]


def test_an_acknowledgement_from_a_claim_that_is_no_longer_current_changes_nothing(db):
    engine, tables = db
    ids = _insert(engine, tables, [identify("user-a0001", {"n": 1})])
    with engine.connect() as conn:
        stale = queue.claim(conn, tables, "identify", 10, 0.01)
        time.sleep(0.05)
        # given the lease expired and a sweep plus a new claim took the row
        assert queue.sweep(conn, tables, max_attempts=12) == (0, 1)
        current = queue.claim(conn, tables, "identify", 10, 60)
        # when the old claim tries to renew and acknowledge
        assert queue.renew(conn, tables, stale.token, 60) == 0
        changed = queue.acknowledge(
            conn, tables, stale.token, queue.Acknowledgement(sent=ids, failed={}, retry={})
        )
    # then nothing changed: the row belongs to the current claim
    assert changed == 0
    assert _claimed_ids(engine, tables, current.token) == ids


def test_a_row_whose_lease_keeps_expiring_fails_once_its_attempts_are_spent(db):
    engine, tables = db
    ids = _insert(engine, tables, [identify("user-a0001", {"n": 1})])
    with engine.connect() as conn:
        for _ in range(3):
            assert queue.claim(conn, tables, "identify", 10, 0.01).rows == 1
            time.sleep(0.05)
            queue.sweep(conn, tables, max_attempts=3)
    q = tables.queue
    with engine.connect() as conn:
        row = conn.execute(
            select(q.c.status, q.c.attempts, q.c.last_error).where(q.c.id == ids[0])
        ).one()
    assert row.status == "failed" and row.attempts == 3
    assert row.last_error.startswith(f"{outcomes.GAVE_UP} 3 attempts: lease expired")


def test_a_claim_that_raced_past_an_earlier_row_gives_its_row_back(db):
    engine, tables = db
    ids = _insert(
        engine, tables, [identify("user-a0001", {"n": 1}), identify("user-a0001", {"n": 2})]
    )
    q = tables.queue
    # given the later row was claimed while the earlier one was (invisibly) locked elsewhere
    token = uuid.uuid4().hex
    with engine.begin() as conn:
        conn.execute(
            update(q)
            .where(q.c.id == ids[1])
            .values(
                status="in_flight", claim_token=token, attempts=1, locked_until=sql.utcnow_plus(60)
            )
        )
    # when its send task checks the order
    with engine.connect() as conn:
        deferred = queue.defer_out_of_order(conn, tables, "identify", token)
        rows = queue.load(conn, tables, token)
    # then the row goes back to pending, without spending its attempt
    assert deferred == {ids[1]} and rows == []
    with engine.connect() as conn:
        row = conn.execute(select(q.c.status, q.c.attempts).where(q.c.id == ids[1])).one()
    assert tuple(row) == ("pending", 0)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_concurrent_claims_never_take_the_same_row(backend, tmp_path):
    url = BACKENDS[backend] or f"sqlite:///{tmp_path / 'queue.db'}"
    tables = schema.define_tables(f"tq_{uuid.uuid4().hex[:8]}")
    engine = db_engine.make_engine(url, pool_size=8)
    setup.init_db(engine, tables)
    try:
        # given 2000 due rows
        _insert(engine, tables, [event(f"user-{n:05d}", "Viewed") for n in range(2000)])
        barrier = threading.Barrier(6)

        def claimer(_):
            barrier.wait()
            claims = []
            with engine.connect() as conn:
                while (claim := queue.claim(conn, tables, "event", 50, 60)).rows:
                    claims.append(claim)
            return claims

        # when six claimers race until nothing is left
        with ThreadPoolExecutor(6) as pool:
            claims = [c for cs in pool.map(claimer, range(6)) for c in cs]
        # then the claims together took each row once: a row taken by two claims would be
        # counted by both (its token only shows the second) and carry two attempts
        q = tables.queue
        with engine.connect() as conn:
            attempts = dict(conn.execute(select(q.c.id, q.c.attempts)).all())
        assert sum(c.rows for c in claims) == 2000
        assert set(attempts.values()) == {1}, Counter(attempts.values())
        assert len({c.token for c in claims}) == len(claims)
    finally:
        with engine.begin() as conn:
            for table in reversed(tables.metadata.sorted_tables):
                table.drop(conn)
        engine.dispose()


def test_a_send_renews_its_lease_only_when_what_is_left_would_not_cover_it(db):
    engine, tables = db
    ids = _insert(engine, tables, [event("user-a0001", "Viewed")])
    q = tables.queue

    def lease():
        with engine.connect() as other:
            return other.execute(select(q.c.locked_until)).scalar_one()

    with engine.connect() as conn:
        claim = queue.claim(conn, tables, "event", 10, 60)
        stamped = lease()
        # given a send task that starts right after the claim: the lease is left as it is
        assert [r.id for r in queue.renew_and_load(conn, tables, claim.token, 60, 50)] == ids
        assert lease() == stamped
        # given one whose message waited in the broker until 20 s of the lease were left
        with conn.begin():
            conn.execute(update(q).values(locked_until=sql.utcnow_plus(20)))
        queue.renew_and_load(conn, tables, claim.token, 60, 50)
    # then that one renews the lease to a whole one
    assert lease() > stamped


@pytest.mark.parametrize(
    ("after_id", "expected"),
    [(0, [0, 1, 2]), (2, [2, 3, 4]), (5, [])],
    ids=["no floor", "past two rows", "past every row"],
)
def test_a_claim_with_a_floor_takes_only_rows_above_it_and_reports_the_highest_id(
    db, after_id, expected
):
    engine, tables = db
    # given five due events
    ids = _insert(engine, tables, [event(f"user-{n:05d}", "Viewed") for n in range(5)])
    floor = ids[after_id - 1] if after_id else 0
    # when three are claimed above the floor
    with engine.connect() as conn:
        claim = queue.claim(conn, tables, "event", 3, 60, after_id=floor)
    # then the oldest rows above it are taken, and the claim names the highest
    taken = [ids[i] for i in expected]
    assert _claimed_ids(engine, tables, claim.token) == taken
    assert (claim.rows, claim.last_id) == (len(taken), max(taken, default=0))
