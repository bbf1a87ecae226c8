"""Nothing lost, nothing duplicated: each fault is done for real to a real worker, Redis,
PostgreSQL and the emulator, and each run is audited from both ends — the queue table and what
Amplitude (the emulator) holds.

Every run prints `fault=<name> rows=<n> faults_injected=<k> lost=<l> duplicated=<d>`, with
lost and duplicated computed by `audit()` (run with -s to see them).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import API_KEY, PG_URL, REDIS_URL, ROOT, Stack, event, identify

from tasks.broker import redis_client
from tasks.db import sql
from tasks.worker.app import SEND_QUEUE

pytestmark = pytest.mark.reliability

# Short leases so an abandoned claim comes back within seconds.
LEASE = 5


# --- a workload whose delivery can be audited exactly ------------------------------------------


@dataclass
class Workload:
    """Rows whose every application at Amplitude is visible.

    Each identify row adds 1 to its user's `visits` and appends its sequence number to `seen`
    (non-idempotent operations: a re-send that is applied twice shows); each event row carries
    its sequence number as an event property.
    """

    users: int = 100
    seq: int = 0
    identify_seqs: dict[str, list[int]] = field(default_factory=dict)
    event_seqs: list[int] = field(default_factory=list)
    seq_of: dict[int, int] = field(default_factory=dict)  # row id -> sequence number

    def insert(self, stack: Stack, n: int) -> list[int]:
        """Half identify, half event rows, interleaved as a user's SQL would write them."""
        rows, seqs = [], []
        for _ in range(n):
            self.seq += 1
            seqs.append(self.seq)
            user = f"rel-user-{(self.seq * 7919) % self.users:05d}"
            if self.seq % 2:
                rows.append(identify(user, {"$add": {"visits": 1}, "$append": {"seen": self.seq}}))
                self.identify_seqs.setdefault(user, []).append(self.seq)
            else:
                rows.append(event(user, "Order Picked Up", {"seq": self.seq}))
                self.event_seqs.append(self.seq)
        ids = stack.insert(rows)
        self.seq_of.update(zip(ids, seqs, strict=True))
        return ids

    @property
    def ids(self) -> list[int]:
        return list(self.seq_of)

    @property
    def rows(self) -> int:
        return len(self.seq_of)


@dataclass
class Audit:
    lost: int
    duplicated: int
    statuses: dict[str, int]
    unique_events: int
    expected_unique_events: int
    out_of_order_users: list[str]
    wrong_visits: dict[str, tuple[int, int]]


def audit(stack: Stack, work: Workload) -> Audit:
    """Compare the queue table and the emulator with what the rows describe."""
    db = stack.rows(*work.ids)
    lost = {work.seq_of[i] for i in work.ids if db[i]["status"] != "sent"}  # sequence numbers
    state = stack.state()
    users = state["users"]
    duplicated = 0
    out_of_order, wrong_visits = [], {}
    for user, expected in work.identify_seqs.items():
        props = users.get(user, {}).get("user_properties", {})
        seen = props.get("seen", [])
        seen = seen if isinstance(seen, list) else [seen]
        counts = Counter(seen)
        lost |= {s for s in expected if s not in counts}
        duplicated += sum(n - 1 for n in counts.values()) + len(set(counts) - set(expected))
        if props.get("visits", 0) != len(expected):
            wrong_visits[user] = (props.get("visits", 0), len(expected))
        if seen != expected:
            out_of_order.append(user)
    received = Counter(
        e["event_properties"]["seq"]
        for e in state["events"]
        if e["event_type"] == "Order Picked Up"
    )
    lost |= {s for s in work.event_seqs if s not in received}
    duplicated += sum(n - 1 for n in received.values()) + len(set(received) - set(work.event_seqs))
    n_identify = sum(len(v) for v in work.identify_seqs.values())
    return Audit(
        lost=len(lost),
        duplicated=duplicated,
        statuses=stack.counts(),
        unique_events=state["counts"]["events_unique"],
        expected_unique_events=len(work.event_seqs) + n_identify,
        out_of_order_users=out_of_order,
        wrong_visits=wrong_visits,
    )


def report(fault: str, work: Workload, injected: int, result: Audit) -> None:
    print(
        f"\nfault={fault} rows={work.rows} faults_injected={injected} "
        f"lost={result.lost} duplicated={result.duplicated}"
    )


def assert_exactly_once(stack: Stack, work: Workload, result: Audit) -> None:
    assert result.statuses == {"sent": work.rows}, stack.log_tail()
    assert result.lost == 0 and result.duplicated == 0
    assert result.unique_events == result.expected_unique_events
    assert not result.wrong_visits and not result.out_of_order_users


# --- process helpers ---------------------------------------------------------------------------


def pool_children(worker) -> list[int]:
    """The prefork pool processes of a worker (the master's children)."""
    path = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except FileNotFoundError:
        return []


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def in_flight(stack: Stack) -> int:
    return stack.counts().get("in_flight", 0)


def in_flight_tokens(stack: Stack) -> set[str]:
    return {r["claim_token"] for r in stack.rows().values() if r["status"] == "in_flight"}


def broker_messages(url: str = REDIS_URL) -> list[dict]:
    """Send-task messages the broker holds: queued, and delivered but not yet acknowledged."""
    client = redis_client(url)
    try:
        raw = [json.loads(m) for m in client.lrange(SEND_QUEUE, 0, -1)]
        raw += [json.loads(v)[0] for v in client.hvals("unacked")]
    finally:
        client.close()
    return [m for m in raw if m["headers"].get("task") == "ampsync.send_batch"]


def message_args(message: dict) -> list:
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return args


def settle(stack: Stack, timeout: float) -> dict[str, int]:
    """Wait, without syncing, until no row is pending or in flight (beat drives the syncs)."""
    return wait_for(
        lambda: (c := stack.counts()) and not c.get("pending") and not c.get("in_flight") and c,
        timeout,
        "the queue to settle",
    )


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


def log_count(stack: Stack, text: str) -> int:
    return sum(p.read_text(errors="replace").count(text) for p in stack.logs)


def replay_stale_send(stack: Stack, kind: str, token: str) -> dict:
    """Publish a send task for a claim that is no longer current (as a redelivered or late
    message would be) and return its result, checking it made no request."""
    from tasks.worker.jobs import send_batch

    requests_before = stack.state()["counts"]["requests"]
    result = send_batch.delay(kind, token, "replay").get(timeout=30)
    assert stack.state()["counts"]["requests"] == requests_before
    return result


# --- crash safety ------------------------------------------------------------------------------


def test_pool_processes_killed_mid_send_lose_and_duplicate_nothing(make_stack):
    # given 1000 rows, slow answers so a send is always in progress, and a short lease
    stack = make_stack(AMPSYNC_LEASE_SECONDS=str(LEASE), AMPSYNC_BATCH_SIZE="50")
    work = Workload()
    work.insert(stack, 1000)
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
    # then every row is sent, Amplitude holds each exactly once and in order per user
    result = audit(stack, work)
    report("sigkill_pool_process", work, kills, result)
    assert_exactly_once(stack, work, result)


def test_the_whole_worker_killed_mid_send_and_restarted_loses_and_duplicates_nothing(make_stack):
    # given 1000 rows being sent slowly by a worker, under a short lease
    stack = make_stack(AMPSYNC_LEASE_SECONDS=str(LEASE), AMPSYNC_BATCH_SIZE="50")
    work = Workload()
    work.insert(stack, 1000)
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
    report("sigkill_worker_group_restart", work, 1, result)
    assert_exactly_once(stack, work, result)
    token, kind = next(iter(abandoned.items()))
    assert replay_stale_send(stack, kind, token)["stale"] is True
    assert stack.counts() == {"sent": work.rows}


def test_sigterm_lets_running_sends_finish_and_leaves_only_unstarted_claims(make_stack):
    # given rows being sent slowly (1 s a request) by a worker
    stack = make_stack(AMPSYNC_LEASE_SECONDS="10", AMPSYNC_BATCH_SIZE="50")
    work = Workload()
    work.insert(stack, 400)
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
    # given rows being sent, and their workers stopped mid-run (a deploy)
    from tasks import sync

    stack = make_stack(AMPSYNC_LEASE_SECONDS=str(LEASE), AMPSYNC_BATCH_SIZE="50")
    work = Workload()
    work.insert(stack, 1000)
    stack.emulator.set_faults(latency_ms=300)
    stack.start_worker(concurrency=2)
    stack.sync()
    wait_for(lambda: in_flight(stack), 10, "rows in flight")
    time.sleep(1.0)
    stack.stop_workers()
    stranded = in_flight_tokens(stack)
    # when for twice the lease syncs keep being enqueued and rows keep coming
    for _ in range(2 * LEASE):
        work.insert(stack, 50)
        sync.delay()
        time.sleep(1)
    # and the workers return
    stack.emulator.set_faults(latency_ms=0)
    stack.start_worker(concurrency=2)
    stack.drain(timeout=60)
    # then every row is sent exactly once: the claims stranded in the broker came back stale
    # (their rows had been claimed again) and sent nothing
    result = audit(stack, work)
    report("workers_down_2x_lease", work, 1, result)
    assert_exactly_once(stack, work, result)
    print(
        f"  ({len(stranded)} claims were stranded in the broker; "
        f"{log_count(stack, 'claim no longer ours')} came back stale and sent nothing)"
    )


def test_a_batch_that_kills_its_worker_every_time_ends_failed_not_looping(make_stack):
    # given one batch whose send kills the worker process each time it runs
    stack = make_stack(AMPSYNC_LEASE_SECONDS=str(LEASE), AMPSYNC_MAX_ATTEMPTS="2")
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    """A Redis of this test's own, so stopping it touches nobody else's broker."""
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis_client(f"redis://127.0.0.1:{port}/0")

    def answers() -> bool:
        try:
            return bool(client.ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    wait_for(answers, 10, f"redis-server on port {port}")
    client.close()
    return proc


def test_the_broker_restarted_mid_run_loses_and_duplicates_nothing(make_stack):
    # given a worker with beat on a Redis of its own, sending 1000 rows
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
        work.insert(stack, 1000)
        stack.emulator.set_faults(latency_ms=200)
        stack.start_worker(concurrency=2, beat=True)
        wait_for(lambda: stack.counts().get("sent", 0) >= 100, 20, "the first rows sent")
        # when Redis stops mid-run (queued and unacknowledged messages gone with it) and
        # comes back empty a few seconds later
        redis.terminate()
        redis.wait(10)
        time.sleep(1)
        redis = start_redis(port)
        stack.emulator.set_faults(latency_ms=0)
        # then the worker and beat reconnect by themselves and every row is sent once
        settle(stack, 60)
        result = audit(stack, work)
        report("redis_restart", work, 1, result)
        assert_exactly_once(stack, work, result)
    finally:
        stack.stop_workers()  # while their broker is still there to say goodbye to
        redis.terminate()
        redis.wait(10)


def terminate_backends(application_name: str) -> int:
    """Kill the database connections of one application (the workers), as a DBA or a
    failover would; other sessions on the server are left alone."""
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = 'test' AND application_name = :app AND pid <> pg_backend_pid()"
                    ),
                    {"app": application_name},
                ).all()
            )
    finally:
        engine.dispose()


def test_database_connections_killed_mid_run_lose_and_duplicate_nothing(make_stack):
    # given workers whose database connections carry an application name of their own
    app = f"ampsync_rel_{uuid.uuid4().hex[:8]}"
    stack = make_stack(
        AMPSYNC_DATABASE_URL=f"{PG_URL}?application_name={app}",
        AMPSYNC_LEASE_SECONDS=str(LEASE),
        AMPSYNC_BATCH_SIZE="50",
    )
    work = Workload()
    work.insert(stack, 1000)
    stack.emulator.set_faults(latency_ms=200)
    stack.start_worker(concurrency=2)
    stack.sync()
    wait_for(lambda: in_flight(stack), 10, "rows in flight")
    # when every worker connection is terminated, three times during the run
    killed = 0
    for _ in range(3):
        time.sleep(0.8)
        killed += terminate_backends(app)
    assert killed > 0
    stack.emulator.set_faults(latency_ms=0)
    # then the workers reconnect by themselves and every row is sent once
    stack.drain(timeout=60)
    result = audit(stack, work)
    report("db_connections_killed", work, killed, result)
    assert_exactly_once(stack, work, result)


def test_amplitude_down_longer_than_the_backoff_budget_pauses_the_endpoint_not_the_rows(make_stack):
    # given few attempts with sub-second backoff: the whole budget is about 3 s
    stack = make_stack(
        AMPSYNC_MAX_ATTEMPTS="3",
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
    assert seen_paused and all("503" in e["reason"] for e in seen_paused)
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
    assert max(r["attempts"] for r in stack.rows().values()) <= 3


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
    assert retry("--class", "invalid", "--kind", "event") == (0, "")
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
