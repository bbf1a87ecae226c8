"""What the crash and outage tests share: a workload whose every application at Amplitude can
be audited, the audit itself, and the processes and brokers those tests start and stop.

`audit()` compares both ends — the queue table and what the emulator holds — with what the
rows describe, so a lost row and a row applied twice both show.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tasks.broker import redis_client
from tasks.settings import Settings
from tasks.worker.app import SEND_QUEUE

from . import BACKENDS, REDIS_URL, Stack, event, identify


def backend_url(backend: str, tmp_path: Path) -> str:
    """The queue database of a test parametrized over BACKENDS (SQLite: a file of its own)."""
    return BACKENDS[backend] or f"sqlite:///{tmp_path / 'queue.db'}"


# --- a workload whose delivery can be audited exactly ------------------------------------------


def production_delivery() -> dict[str, str]:
    """The backoff, pause and lease settings a user runs with (Settings' defaults), to put in
    place of the tests' fast clocks where a target is about what users get."""
    return {
        f.alias: str(f.default)
        for f in Settings.model_fields.values()
        if f.alias and f.alias.startswith(("AMPSYNC_BACKOFF_", "AMPSYNC_PAUSE_", "AMPSYNC_LEASE_"))
    }


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
    """One line per run (pytest -s shows it): what was done and what the audit found."""
    print(
        f"\nfault={fault} rows={work.rows} faults_injected={injected} "
        f"lost={result.lost} duplicated={result.duplicated}"
    )


def assert_exactly_once(stack: Stack, work: Workload, result: Audit) -> None:
    assert result.statuses == {"sent": work.rows}, stack.log_tail()
    assert result.lost == 0 and result.duplicated == 0
    assert result.unique_events == result.expected_unique_events
    assert not result.wrong_visits and not result.out_of_order_users


# --- waiting and reading what happened ---------------------------------------------------------


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """`predicate()`'s first truthy value; AssertionError naming `what` after `timeout` s."""
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


def settle(stack: Stack, timeout: float) -> dict[str, int]:
    """Wait, without syncing, until no row is pending or in flight (beat drives the syncs)."""
    return wait_for(
        lambda: (c := stack.counts()) and not c.get("pending") and not c.get("in_flight") and c,
        timeout,
        "the queue to settle",
    )


def log_count(stack: Stack, text: str) -> int:
    """How often `text` appears in the logs of the stack's workers."""
    return sum(p.read_text(errors="replace").count(text) for p in stack.logs)


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
    """A task message's positional arguments (kombu keeps the body base64-encoded)."""
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return args


# --- processes ---------------------------------------------------------------------------------


def pool_children(worker: subprocess.Popen) -> list[int]:
    """The prefork pool processes of a worker (the master's children)."""
    path = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except FileNotFoundError:
        return []


def start_redis(port: int) -> subprocess.Popen:
    """A Redis of the test's own, so stopping it touches nobody else's broker."""
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
