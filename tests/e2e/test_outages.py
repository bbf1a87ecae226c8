"""The database taken away from the workers, and a send slower than its lease: nothing lost,
nothing applied twice, and a claimant whose lease ran out cannot write over the rows' outcome.

The database is taken away through a TCP proxy between the workers and the server
(support/proxy.py): the shared PostgreSQL and MariaDB servers keep running for everyone else,
and the test reads the queue table directly.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select, update
from support import BACKENDS, identify
from support.proxy import TcpProxy
from support.reliability import (
    Workload,
    assert_exactly_once,
    audit,
    backend_url,
    in_flight_tokens,
    log_count,
    report,
    settle,
    wait_for,
)

from tasks.db import sql

pytestmark = pytest.mark.reliability

LEASE = 5  # the least allowed: an outage longer than a lease stays short
ROWS = 400


def expired_leases(stack) -> int:
    """Rows in flight whose lease has run out, by the database's clock."""
    from sqlalchemy import func

    q = stack.tables.queue
    with stack.engine.connect() as conn:
        return conn.execute(
            select(func.count()).where(q.c.status == "in_flight", q.c.locked_until < sql.utcnow())
        ).scalar_one()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])  # SQLite has no server to lose
def test_the_database_gone_for_longer_than_a_lease_loses_and_duplicates_nothing(
    make_stack, backend
):
    # given a worker with beat that reaches the database only through a proxy, sending rows
    proxy, via_proxy = TcpProxy.to_url(BACKENDS[backend])
    stack = make_stack(
        BACKENDS[backend],
        AMPSYNC_DATABASE_URL=via_proxy,
        AMPSYNC_LEASE_SECONDS=str(LEASE),
        AMPSYNC_BATCH_SIZE="25",
        AMPSYNC_SYNC_INTERVAL="1",
    )
    try:
        work = Workload()
        work.insert(stack, ROWS)
        stack.emulator.set_faults(latency_ms=300)
        worker = stack.start_worker(concurrency=2, beat=True)
        wait_for(lambda: stack.counts().get("sent", 0) >= 50, 20, "the first rows sent")
        assert proxy.connections > 0  # the worker's connections do go through the proxy
        # when the database goes away (open connections dropped, new ones refused) while
        # claims are in flight, and stays away until their leases have run out
        proxy.cut()
        stranded = in_flight_tokens(stack)
        assert stranded, "the database should go away while claims are in flight"
        wait_for(lambda: expired_leases(stack), LEASE + 5, "a lease to run out in the outage")
        time.sleep(1)
        proxy.restore()
        stack.emulator.set_faults(latency_ms=0)
        # then the worker met the outage and lived through it: the same process, beat's syncs
        # and the sends reconnect by themselves, and every row is sent once
        settle(stack, 60)
        assert log_count(stack, "OperationalError") >= 1, stack.log_tail()
        assert worker.poll() is None and stack.workers == [worker]
        result = audit(stack, work)
        report(f"database_down_past_the_lease[{backend}]", work, len(stranded), result)
        assert_exactly_once(stack, work, result)
    finally:
        stack.stop_workers()
        proxy.cut()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_send_that_outlives_its_lease_cannot_acknowledge_and_nothing_is_applied_twice(
    make_stack, backend, tmp_path
):
    # given identify rows that add to a counter, all in one batch, and worker processes to
    # spare (the lease is 30 s: Celery's time limits leave a 3 s send alone)
    stack = make_stack(backend_url(backend, tmp_path), AMPSYNC_BATCH_SIZE="100")
    users = [f"lease-user-{n:03d}" for n in range(10)]
    ids = stack.insert([identify(u, {"$add": {"visits": 1}}) for u in users for _ in range(2)])
    stack.start_worker(concurrency=3)
    # and Amplitude holds the first request 3 s, ingests it, then answers 500
    stack.emulator.set_faults(latency_ms=3000, fail_next=[{"after_ingest": True}])
    stack.sync()
    wait_for(lambda: not stack.emulator.faults.fail_next, 10, "the first request at Amplitude")
    time.sleep(0.2)  # (it has read its latency)
    stack.emulator.set_faults(latency_ms=0)
    (first,) = in_flight_tokens(stack)
    # when its lease runs out while it is still waiting on Amplitude, and a sync gives the
    # rows to a new claim that another worker process sends at once
    q = stack.tables.queue
    with stack.engine.begin() as conn:
        conn.execute(
            update(q).where(q.c.claim_token == first).values(locked_until=sql.utcnow_plus(-1))
        )
    stack.sync()
    wait_for(lambda: stack.counts() == {"sent": len(ids)}, 10, "the second claim's send")
    # and the first send finally hears its 500 and acknowledges (its run is recorded with it)
    runs = stack.tables.runs

    def first_run():
        with stack.engine.connect() as conn:
            return conn.execute(select(runs).where(runs.c.claim_token == first)).first()

    run = wait_for(first_run, 15, "the first send to finish")
    # then its acknowledgement was refused: the rows stay sent, with no error and nothing
    # waiting, though that send wanted every row retried
    assert run.rows_retried == len(ids) and run.rows_sent == 0
    rows = stack.rows(*ids)
    assert {(r["status"], r["last_error"], r["next_attempt_at"]) for r in rows.values()} == {
        ("sent", None, None)
    }
    # and each row was applied once: the late copy Amplitude ingested was a duplicate
    state = stack.state()
    assert {state["users"][u]["user_properties"]["visits"] for u in users} == {2}
    assert state["counts"]["duplicates"] == len(ids)
    assert state["counts"]["requests"]["/batch"] == {"200": 1, "500": 1}
