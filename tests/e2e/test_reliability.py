"""Nothing lost, nothing duplicated: each fault is done for real to a real worker, Redis, the
database and the emulator, and each run is audited from both ends — the queue table and what
Amplitude (the emulator) holds (`support.reliability.audit`).

Every run prints `fault=<name> rows=<n> faults_injected=<k> lost=<l> duplicated=<d>` (run
with -s to see them).

The crash proofs whose outcome rests on the dialect's claim, sweep, rerun and acknowledgement
SQL (a pool process killed, the whole worker killed, a batch that kills its worker) run on
PostgreSQL, MariaDB and SQLite; the others run on PostgreSQL only, since they exercise no SQL
those three do not. The database outages and a send that outlives its lease are in
test_outages.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from celery.result import AsyncResult
from support import API_KEY, BACKENDS, PG_URL, REDIS_URL, ROOT, Stack, event, free_port
from support.reliability import (
    Workload,
    assert_exactly_once,
    audit,
    backend_url,
    broker_messages,
    in_flight,
    in_flight_tokens,
    log_count,
    message_args,
    pool_children,
    report,
    settle,
    start_redis,
    wait_for,
)

from tasks import app
from tasks.broker import redis_client
from tasks.db import sql
from tasks.worker.app import SYNC_QUEUE

pytestmark = pytest.mark.reliability

# Short leases so an abandoned claim comes back within seconds (5 s is the least allowed).
LEASE = 5
# Enough rows for several batches per worker process to be in flight at every fault.
ROWS = 400

# The crash proofs that run on every backend.
backends = pytest.mark.parametrize("backend", list(BACKENDS))


# --- helpers of this file ----------------------------------------------------------------------


def run_cli(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The `ampsync` command line as an operator runs it, configured like the stack."""
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        cwd=ROOT,
        timeout=60,
        env={**os.environ, **stack.env, **env},
        capture_output=True,
        text=True,
    )


def status_while_paused(stack: Stack, text: str | None) -> str | None:
    """`ampsync status` output taken while the queue table says an endpoint is paused (a pause
    may lapse before the command has started: then it is taken again on a later call)."""
    if text and "PAUSED" in text:
        return text
    if any(e["paused"] for e in stack.status()["endpoints"]):
        return run_cli(stack, "status").stdout
    return text


def replay_stale_send(stack: Stack, kind: str, token: str) -> dict:
    """Publish a send task for a claim that is no longer current (as a redelivered or late
    message would be) and return its result, checking it made no request."""
    from tasks.worker.jobs import send_batch

    requests_before = stack.state()["counts"]["requests"]
    result = send_batch.delay(kind, token, "replay").get(timeout=30)
    assert stack.state()["counts"]["requests"] == requests_before
    return result


def send_result(task_id: str) -> dict:
    """What a send task returned, from the result backend."""
    return AsyncResult(task_id, app=app).get(timeout=30)


# --- crash safety ------------------------------------------------------------------------------


@backends
def test_pool_processes_killed_mid_send_lose_and_duplicate_nothing(make_stack, backend, tmp_path):
    # given rows, slow answers so a send is always in progress, and a short lease
    stack = make_stack(
        backend_url(backend, tmp_path), AMPSYNC_LEASE_SECONDS=str(LEASE), AMPSYNC_BATCH_SIZE="25"
    )
    work = Workload()
    work.insert(stack, ROWS)
    stack.emulator.set_faults(latency_ms=400)
    worker = stack.start_worker(concurrency=2)
    # when the pool processes are SIGKILLed again and again while they send
    stack.sync()
    kills = 0
    for _ in range(3):
        wait_for(lambda: in_flight(stack), 10, "rows in flight")
        time.sleep(0.5)
        for pid in pool_children(worker):
            os.kill(pid, signal.SIGKILL)
            kills += 1
    stack.emulator.set_faults(latency_ms=0)
    stack.drain(timeout=60)
    # then a kill landed while a send was running: Celery reports the task it lost, and the
    # rerun of that send counted the lost run as an attempt (nothing else fails here)
    assert log_count(stack, "WorkerLostError") >= 1, stack.log_tail()
    assert max(r["attempts"] for r in stack.rows().values()) >= 2
    # and every row is sent, Amplitude holds each exactly once and in order per user
    result = audit(stack, work)
    report(f"sigkill_pool_process[{backend}]", work, kills, result)
    assert_exactly_once(stack, work, result)


@backends
def test_the_whole_worker_killed_mid_send_and_restarted_loses_and_duplicates_nothing(
    make_stack, backend, tmp_path
):
    # given rows being sent slowly by a worker, under a short lease
    stack = make_stack(
        backend_url(backend, tmp_path), AMPSYNC_LEASE_SECONDS=str(LEASE), AMPSYNC_BATCH_SIZE="25"
    )
    work = Workload()
    work.insert(stack, ROWS)
    stack.emulator.set_faults(latency_ms=400)
    worker = stack.start_worker(concurrency=2)
    stack.sync()
    wait_for(lambda: in_flight(stack), 10, "rows in flight")
    time.sleep(1.0)
    # when the whole process group (master and pool) is SIGKILLed mid-send
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(10)
    abandoned = {
        r["claim_token"]: r["kind"] for r in stack.rows().values() if r["status"] == "in_flight"
    }
    assert abandoned, "the kill should leave claims in flight"
    # and a new worker starts
    stack.emulator.set_faults(latency_ms=0)
    stack.start_worker(concurrency=2)
    stack.drain(timeout=60)
    # then every row is sent once; the abandoned claims' leases expired and rows were claimed
    # again, and a send task of an abandoned claim now sends and acknowledges nothing
    result = audit(stack, work)
    report(f"sigkill_worker_group_restart[{backend}]", work, 1, result)
    assert_exactly_once(stack, work, result)
    token, kind = next(iter(abandoned.items()))
    assert replay_stale_send(stack, kind, token)["stale"] is True
    assert stack.counts() == {"sent": work.rows}


def test_sigterm_lets_running_sends_finish_and_leaves_only_unstarted_claims(make_stack):
    # given rows being sent slowly (1 s a request) by a worker
    stack = make_stack(AMPSYNC_LEASE_SECONDS="10", AMPSYNC_BATCH_SIZE="50")
    work = Workload()
    work.insert(stack, ROWS)
    stack.emulator.set_faults(latency_ms=1000)
    worker = stack.start_worker(concurrency=2)
    stack.sync()
    wait_for(lambda: in_flight(stack), 10, "rows in flight")
    time.sleep(1.5)
    # when the worker gets SIGTERM (warm shutdown) mid-send
    started = time.monotonic()
    os.kill(worker.pid, signal.SIGTERM)
    worker.wait(15)
    took = time.monotonic() - started
    # then it exits within the lease, the sends it was running finished (no lost worker, no
    # time limit), and every claim still in flight is one no task started: its message is
    # still in the broker
    assert took < 10, took  # within the lease: nobody reclaims rows it is still sending
    assert log_count(stack, "WorkerLostError") == 0 and log_count(stack, "TimeLimitExceeded") == 0
    waiting = {message_args(m)[1] for m in broker_messages()}
    assert in_flight_tokens(stack) <= waiting
    # and a new worker delivers everything exactly once
    stack.emulator.set_faults(latency_ms=0)
    stack.start_worker(concurrency=2)
    stack.drain(timeout=60)
    result = audit(stack, work)
    report("sigterm_mid_send", work, 1, result)
    assert_exactly_once(stack, work, result)


def test_workers_away_for_twice_the_lease_while_syncs_pile_up_send_every_row_once(make_stack):
    # given rows being sent, room in the broker for every batch, and the workers stopped
    # mid-run (a deploy): the claims they had not started stay in flight, their messages in
    # the broker (PostgreSQL only: the sweep and stale claims of every dialect are proven by
    # the whole-worker kill above; this one is about messages outliving their claims)
    from tasks import sync

    stack = make_stack(
        AMPSYNC_LEASE_SECONDS=str(LEASE),
        AMPSYNC_BATCH_SIZE="25",
        AMPSYNC_MAX_QUEUED_BATCHES="64",
    )
    work = Workload()
    work.insert(stack, ROWS)
    stack.emulator.set_faults(latency_ms=300)
    stack.start_worker(concurrency=2)
    stack.sync()
    wait_for(lambda: in_flight(stack), 10, "rows in flight")
    time.sleep(1.0)
    stack.stop_workers()
    unstarted = in_flight_tokens(stack)
    stranded = {  # claim token -> the id of the send task waiting in the broker with it
        message_args(m)[1]: m["headers"]["id"]
        for m in broker_messages()
        if message_args(m)[1] in unstarted
    }
    assert stranded and set(stranded) == unstarted
    # when for twice the lease syncs keep being enqueued and rows keep coming
    for _ in range(2 * LEASE):
        work.insert(stack, 20)
        sync.delay()
        time.sleep(1)
    # and the workers return: the piled-up syncs run first (their sweep gives the expired
    # claims' rows back and claims them again), then the sends
    stack.emulator.set_faults(latency_ms=0)
    stack.start_worker(concurrency=1, queues=SYNC_QUEUE)
    wait_for(lambda: not in_flight_tokens(stack) & set(stranded), 30, "the rows claimed again")
    stack.start_worker(concurrency=2)
    stack.drain(timeout=60)
    # then every stranded claim came back stale and sent nothing, and every row was sent
    # exactly once
    assert {token: send_result(task)["stale"] for token, task in stranded.items()} == {
        token: True for token in stranded
    }
    result = audit(stack, work)
    report("workers_down_2x_lease", work, len(stranded), result)
    assert_exactly_once(stack, work, result)


@backends
def test_a_batch_that_kills_its_worker_every_time_ends_failed_not_looping(
    make_stack, backend, tmp_path
):
    # given one batch whose send kills the worker process each time it runs
    stack = make_stack(
        backend_url(backend, tmp_path),
        AMPSYNC_LEASE_SECONDS=str(LEASE),
        AMPSYNC_MAX_ATTEMPTS="2",
    )
    ids = stack.insert([event(f"poison-{i:05d}", "Poison Batch", {"seq": i}) for i in range(3)])
    stack.emulator.set_faults(latency_ms=2000)
    worker = stack.start_worker(concurrency=1)
    stack.sync()
    # when every run of it is SIGKILLed mid-request (each run counts an attempt as it starts:
    # the claim the first, the redelivered task each rerun)
    kills, run_seen = 0, 0
    deadline = time.monotonic() + 40
    while stack.counts().get("in_flight") and time.monotonic() < deadline:
        run = max(r["attempts"] for r in stack.rows(*ids).values())
        if run != run_seen:
            run_seen = run
            time.sleep(0.5)
            for pid in pool_children(worker):
                os.kill(pid, signal.SIGKILL)
                kills += 1
        time.sleep(0.1)
    # (the emulator finishes the request its client abandoned: let it, so nothing it ingests
    # lands in the next test)
    time.sleep(2)
    # then the rows end failed once their attempts are spent, with a reason that says why
    rows = stack.rows(*ids)
    assert {r["status"] for r in rows.values()} == {"failed"}, (kills, rows)
    for row in rows.values():
        assert row["attempts"] == 2
        assert row["last_error"].startswith("gave up after 2 attempts:")
        assert "died" in row["last_error"]
    assert kills <= 4  # two runs, and perhaps a kill that found the process between tasks


# --- outages -----------------------------------------------------------------------------------


def test_the_broker_restarted_mid_run_loses_and_duplicates_nothing(make_stack):
    # given a worker with beat on a Redis of its own, sending rows
    port = free_port()
    redis = start_redis(port)
    stack = make_stack(
        CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0",
        AMPSYNC_LEASE_SECONDS=str(LEASE),
        AMPSYNC_BATCH_SIZE="50",
        AMPSYNC_SYNC_INTERVAL="1",
    )
    try:
        work = Workload()
        work.insert(stack, ROWS)
        stack.emulator.set_faults(latency_ms=200)
        stack.start_worker(concurrency=2, beat=True)
        wait_for(lambda: stack.counts().get("sent", 0) >= 100, 20, "the first rows sent")
        # when Redis stops mid-run (queued and unacknowledged messages gone with it) and
        # comes back empty a few seconds later
        redis.terminate()
        redis.wait(10)
        # (rows were in flight as it stopped: their messages went with it)
        stranded = in_flight_tokens(stack)
        assert stranded, "Redis should stop while claims are in flight"
        time.sleep(1)
        redis = start_redis(port)
        stack.emulator.set_faults(latency_ms=0)
        # then the worker and beat reconnect by themselves and every row is sent once
        settle(stack, 60)
        result = audit(stack, work)
        report("redis_restart", work, len(stranded), result)
        assert_exactly_once(stack, work, result)
    finally:
        stack.stop_workers()  # while their broker is still there to say goodbye to
        redis.terminate()
        redis.wait(10)


def backends_of(application_name: str, terminate: bool = False) -> int:
    """How many database connections one application (the workers) has open; with
    `terminate`, kill them, as a DBA or a failover would (other sessions are left alone)."""
    from sqlalchemy import create_engine, text

    what = "pg_terminate_backend(pid)" if terminate else "pid"
    engine = create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            return len(
                conn.execute(
                    text(
                        f"SELECT {what} FROM pg_stat_activity WHERE datname = 'test' "
                        "AND application_name = :app AND pid <> pg_backend_pid()"
                    ),
                    {"app": application_name},
                ).all()
            )
    finally:
        engine.dispose()


def test_database_connections_killed_mid_run_lose_and_duplicate_nothing(make_stack):
    # given workers whose database connections carry an application name of their own
    app_name = f"ampsync_rel_{uuid.uuid4().hex[:8]}"
    stack = make_stack(
        AMPSYNC_DATABASE_URL=f"{PG_URL}?application_name={app_name}",
        AMPSYNC_LEASE_SECONDS=str(LEASE),
        AMPSYNC_BATCH_SIZE="50",
    )
    work = Workload()
    work.insert(stack, ROWS)
    stack.emulator.set_faults(latency_ms=1000)  # a send spends its time waiting on Amplitude
    workers = [stack.start_worker(concurrency=2)]
    stack.sync()
    wait_for(lambda: in_flight(stack), 10, "rows in flight")
    # when every worker connection is terminated, three times during the run, while sends
    # hold their connection across the request to Amplitude
    killed = 0
    for _ in range(3):
        time.sleep(1.0)
        killed += backends_of(app_name, terminate=True)
    with stack.engine.connect() as conn:
        last_kill = conn.execute(sql.utcnow().select()).scalar_one()
    stack.emulator.set_faults(latency_ms=0)
    stack.drain(timeout=60)
    # then connections were really killed, and sends whose connection died while Amplitude
    # answered acknowledged their rows on a new one (else the rows would wait out the lease)
    assert killed > 0
    assert log_count(stack, "again on a new connection") >= 1, stack.log_tail()
    # and the same workers, never restarted, reconnected and went on acknowledging rows
    assert stack.workers == workers and all(w.poll() is None for w in workers)
    assert backends_of(app_name) > 0
    sent_after = [r for r in stack.rows().values() if r["sent_at"] and r["sent_at"] > last_kill]
    assert sent_after
    # and every row is sent once
    result = audit(stack, work)
    report("db_connections_killed", work, killed, result)
    assert_exactly_once(stack, work, result)


def test_amplitude_down_longer_than_the_backoff_budget_pauses_the_endpoint_not_the_rows(make_stack):
    # given few attempts with sub-second backoff: the whole budget is about 3 s, and as many
    # attempts as failed requests pause the endpoint (5): the request that fails for the fifth
    # time pauses it and is refunded, so no row can run out of attempts while Amplitude is down
    stack = make_stack(
        AMPSYNC_MAX_ATTEMPTS="5",
        AMPSYNC_BATCH_SIZE="100",
        AMPSYNC_PAUSE_BASE="1",
        AMPSYNC_PAUSE_MAX="3",
    )
    work = Workload()
    work.insert(stack, 1000)
    stack.start_worker(concurrency=2)
    # when Amplitude answers 503 to everything for 6 s
    stack.emulator.set_faults(down=True)
    seen_paused, seen_backoff, status_text = [], 0, None
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        stack.sync()
        status = stack.status()
        seen_paused += [e for e in status["endpoints"] if e["paused"]]
        seen_backoff = max(seen_backoff, status["waiting_on_backoff"])
        status_text = status_while_paused(stack, status_text)
        assert not stack.counts().get("failed"), stack.rows()
        time.sleep(0.3)
    # then the endpoint was paused with the reason, and `ampsync status` said so
    assert seen_paused and all("503" in e["reason"] for e in seen_paused), stack.log_tail()
    assert seen_backoff > 0
    assert status_text and "PAUSED batch" in status_text and "503" in status_text, status_text
    assert "rows waiting on backoff: 0\n" not in status_text, status_text
    # and when Amplitude is back no row has failed: every row is sent, once
    stack.emulator.set_faults(down=False)
    stack.drain(timeout=60)
    state = stack.state()
    outage_answers = state["counts"]["requests"]["/batch"].get("503", 0)
    result = audit(stack, work)
    report("amplitude_down", work, outage_answers, result)
    assert_exactly_once(stack, work, result)
    assert max(r["attempts"] for r in stack.rows().values()) <= 5


def test_flaky_amplitude_including_500_after_ingest_applies_every_row_exactly_once(make_stack):
    # given identify rows with $add/$append (not idempotent) and events
    stack = make_stack(AMPSYNC_BATCH_SIZE="50", AMPSYNC_HTTP_TIMEOUT="1")
    work = Workload()
    work.insert(stack, 1500)
    # when Amplitude fails a third of the requests in every way it can, most of them after it
    # ingested the request (500 after ingest), some with a gateway page, a reset, a timeout
    stack.emulator.set_faults(
        fail_after_rate=0.2,
        fail_before_rate=0.05,
        html_error_rate=0.05,
        reset_rate=0.03,
        slow_rate=0.02,
        slow_seconds=2,
        seed=7,
    )
    stack.start_worker(concurrency=2)
    stack.drain(timeout=90)
    # then every row is applied exactly once: re-sends carry the row's insert_id
    state = stack.state()
    injected = sum(
        n
        for per in state["counts"]["requests"].values()
        for code, n in per.items()
        if code != "200"
    )
    result = audit(stack, work)
    report("flaky_amplitude_500_after_ingest", work, injected, result)
    assert_exactly_once(stack, work, result)
    assert injected > 10 and state["counts"]["duplicates"] > 0


@pytest.mark.parametrize(
    "identify_api,applied",
    [
        ("batch", 1),  # $identify events carry insert_id: the re-send is dropped
        ("identify", 2),  # the form API deduplicates nothing: the documented caveat
    ],
)
def test_a_500_after_ingest_re_send_applies_add_once_except_through_the_form_api(
    make_stack, identify_api, applied
):
    # given identify rows that add to a counter, sent through the chosen API
    stack = make_stack(AMPSYNC_IDENTIFY_API=identify_api)
    work = Workload(users=10)
    work.insert(stack, 40)
    path = "/batch" if identify_api == "batch" else "/identify"
    # when Amplitude ingests the first request and still answers 500
    stack.emulator.set_faults(fail_next=[{"path": path, "after_ingest": True}])
    stack.start_worker(concurrency=1)
    stack.drain(timeout=30)
    # then every counter moved by its rows once — or twice through /identify
    result = audit(stack, work)
    report(f"500_after_ingest_via_{identify_api}", work, 1, result)
    assert result.statuses == {"sent": work.rows}
    users = stack.state()["users"]
    assert {
        users[u]["user_properties"]["visits"] / len(seqs) for u, seqs in work.identify_seqs.items()
    } == {applied}
    assert (result.duplicated > 0) == (applied > 1)


# --- the API key ---------------------------------------------------------------------------------


def redis_dump(url: str = REDIS_URL) -> bytes:
    """Every value the broker holds: messages, unacknowledged messages, task results."""
    client = redis_client(url)
    out = []
    try:
        for key in client.scan_iter():
            kind = client.type(key)
            if kind == b"string":
                out.append(client.get(key) or b"")
            elif kind == b"list":
                out += client.lrange(key, 0, -1)
            elif kind == b"hash":
                out += [k + b"=" + v for k, v in client.hgetall(key).items()]
            elif kind == b"set":
                out += list(client.smembers(key))
            elif kind == b"zset":
                out += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
            out.append(key)
    finally:
        client.close()
    return b"\n".join(out)


def test_an_invalid_api_key_pauses_sending_says_why_and_never_shows_the_key(make_stack):
    # given a worker configured with a key Amplitude rejects (it echoes the key in its 400)
    wrong_key = f"wrong-key-{uuid.uuid4().hex}"
    stack = make_stack(
        AMPLITUDE_API_KEY=wrong_key,
        AMPSYNC_BATCH_SIZE="50",
        AMPSYNC_LEASE_SECONDS=str(LEASE),
        AMPSYNC_PAUSE_BASE="3",
        AMPSYNC_PAUSE_MAX="6",
    )
    work = Workload()
    work.insert(stack, 1000)
    stack.start_worker(concurrency=2)
    # when syncs run for 5 s
    status_text, broker = None, []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stack.sync()
        broker.append(redis_dump())  # while send messages wait in the broker
        status_text = status_while_paused(stack, status_text)
        time.sleep(0.3)
    # then a bounded number of requests went out (20 batches were due), no row failed or sits
    # in flight past its lease, and `ampsync status` names the problem
    requests = sum(stack.state()["counts"]["requests"].get("/batch", {}).values())
    assert 1 <= requests <= 10, requests
    assert not stack.counts().get("failed")
    with stack.engine.connect() as conn:
        from sqlalchemy import func, select

        q = stack.tables.queue
        overdue = conn.execute(
            select(func.count()).where(q.c.status == "in_flight", q.c.locked_until < sql.utcnow())
        ).scalar_one()
    assert overdue == 0
    assert status_text and "PAUSED batch" in status_text, status_text
    assert "Amplitude rejected the API key: check AMPLITUDE_API_KEY" in status_text
    # and once the operator fixes the key every row is sent exactly once
    stack.stop_workers()
    stack.start_worker(concurrency=2, extra_env={"AMPLITUDE_API_KEY": API_KEY})
    stack.drain(timeout=60)
    result = audit(stack, work)
    report("invalid_api_key", work, requests, result)
    assert_exactly_once(stack, work, result)
    # and neither key appears in worker logs, broker messages and results, status output,
    # row errors, the endpoint pause reasons or what the emulator shows
    status_text += run_cli(stack, "status", "--json").stdout
    with stack.engine.connect() as conn:
        texts = [str(r) for r in conn.execute(select(stack.tables.endpoints)).all()]
    texts += [str(r["last_error"]) for r in stack.rows().values()]
    places = {
        "worker logs": "".join(p.read_text(errors="replace") for p in stack.logs),
        "broker": b"\n".join([*broker, redis_dump()]).decode(errors="replace"),
        "status output": status_text,
        "row errors and pause reasons": "\n".join(texts),
        "emulator snapshot": json.dumps(stack.state()) + stack.emulator.render_html(),
    }
    for key in (wrong_key, API_KEY):
        leaks = [where for where, text in places.items() if key in text]
        assert not leaks, f"API key found in {leaks}"
    # (and the places were not empty: the 400 happened, send messages were in the broker)
    assert "Invalid API key" in places["emulator snapshot"]
    assert "ampsync.send_batch" in places["broker"] and "Amplitude rejected" in places["broker"]


# --- operator controls ---------------------------------------------------------------------------


def test_failures_open_with_their_class_and_retry_failed_selects_by_class_kind_ids_and_time(
    make_stack,
):
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    stack = make_stack(AMPSYNC_MAX_ATTEMPTS="1")
    stack.start_worker(concurrency=1)
    now = datetime.now(UTC).replace(tzinfo=None)
    # given rows that ran out of attempts (created 10 days ago, first tried 8 days ago) …
    gave_up = stack.insert(
        [
            event(
                f"old-user-{i:04d}",
                "Order Picked Up",
                {"seq": i},
                created_at=now - timedelta(days=10),
            )
            for i in range(2)
        ]
    )
    stack.emulator.set_faults(fail_next=[{"code": 500}])
    stack.drain()
    with stack.engine.begin() as conn:
        conn.execute(
            update(stack.tables.queue)
            .where(stack.tables.queue.c.id.in_(gave_up))
            .values(first_attempt_at=now - timedelta(days=8))
        )
    # … a row ampsync refuses and one Amplitude rejects, beside a valid row
    invalid, rejected, valid = stack.insert(
        [
            {"kind": "identify", "user_id": "new-user-0001", "properties": "{not json"},
            event("new-user-0002", "Order Picked Up", {"seq": 1}, extra='{"price": "twelve"}'),
            event("new-user-0003", "Order Picked Up", {"seq": 2}),
        ]
    )
    stack.drain()
    rows = stack.rows()
    # then each failure's last_error opens with its class
    assert all(
        rows[i]["last_error"].startswith("gave up after 1 attempts: HTTP 500") for i in gave_up
    )
    assert rows[invalid]["last_error"].startswith("invalid row: properties is not valid JSON")
    assert rows[rejected]["last_error"].startswith("rejected by Amplitude: price")
    assert rows[valid]["status"] == "sent"

    def retry(*args: str) -> tuple[int, str]:
        done = run_cli(stack, "retry-failed", *args)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[0]), done.stderr

    # when the operator retries by class and kind, by time range, and by ids
    n, note = retry("--class", "invalid", "--kind", "event")
    assert n == 0  # (and the operator is told which classes the selection left alone)
    assert "3 failed rows of the selection are of other classes" in note
    assert "(gave-up 2, rejected 1)" in note
    n, warning = retry("--class", "all", "--until", (now - timedelta(days=5)).isoformat())
    assert n == 2 and "2 of these rows were first tried over 7 days ago" in warning
    assert retry("--class", "rejected", "--ids", str(rejected), str(valid)) == (1, "")
    assert retry(
        "--class",
        "invalid",
        "--since",
        (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+00:00"),
    ) == (1, "")
    stack.drain()
    # then exactly the selected rows went again: the old ones are sent now, the bad ones fail
    # again with the same reasons
    rows = stack.rows()
    assert [rows[i]["status"] for i in (*gave_up, invalid, rejected, valid)] == [
        "sent",
        "sent",
        "failed",
        "failed",
        "sent",
    ]
    assert rows[invalid]["last_error"].startswith("invalid row:")
    assert rows[rejected]["last_error"].startswith("rejected by Amplitude:")


def test_rows_pending_longer_than_the_maximum_age_fail_with_the_reason_and_can_be_retried(
    make_stack,
):
    # given a maximum age of 2 s and Amplitude down
    stack = make_stack(AMPSYNC_MAX_AGE_SECONDS="2")
    work = Workload(users=20)
    work.insert(stack, 100)
    stack.emulator.set_faults(down=True)
    stack.start_worker(concurrency=1)
    # when syncs keep trying for longer than that
    stack.drain(timeout=20)
    # then every row failed as too old, saying why and what went wrong before
    rows = stack.rows()
    assert {r["status"] for r in rows.values()} == {"failed"}
    for row in rows.values():
        assert row["last_error"].startswith(
            "gave up after 2 s: pending longer than AMPSYNC_MAX_AGE_SECONDS (2 s) since its first "
            "attempt; last error: will retry:"
        ), row["last_error"]
        assert "503" in row["last_error"]
    # and once Amplitude is back, retry-failed starts their clock again and all are sent once
    stack.emulator.set_faults(down=False)
    assert run_cli(stack, "retry-failed").stdout.startswith("100 failed rows put back")
    stack.drain(timeout=30)
    assert_exactly_once(stack, work, audit(stack, work))


def test_a_queue_table_name_that_is_not_an_identifier_is_refused_before_any_sql():
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "status"],
        cwd=ROOT,
        timeout=60,
        env={
            **os.environ,
            "AMPSYNC_QUEUE_TABLE": "x; DROP TABLE y",
            "AMPSYNC_DATABASE_URL": PG_URL,
        },
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "AMPSYNC_QUEUE_TABLE='x; DROP TABLE y': must be a table name" in done.stderr
