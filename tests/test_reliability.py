"""Nothing lost, nothing duplicated: each fault is done for real to a real worker, Redis,
PostgreSQL and the emulator, and each run is audited from both ends — the queue table and what
Amplitude (the emulator) holds.

Every run prints `fault=<name> rows=<n> faults_injected=<k> lost=<l> duplicated=<d>`, with
lost and duplicated computed by `audit()` (run with -s to see them).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Stack, event, identify

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
    ids: list[int] = field(default_factory=list)

    def insert(self, stack: Stack, n: int) -> list[int]:
        """Half identify, half event rows, interleaved as a user's SQL would write them."""
        rows = []
        for _ in range(n):
            self.seq += 1
            user = f"rel-user-{(self.seq * 7919) % self.users:05d}"
            if self.seq % 2:
                rows.append(identify(user, {"$add": {"visits": 1}, "$append": {"seen": self.seq}}))
                self.identify_seqs.setdefault(user, []).append(self.seq)
            else:
                rows.append(event(user, "Order Picked Up", {"seq": self.seq}))
                self.event_seqs.append(self.seq)
        ids = stack.insert(rows)
        self.ids += ids
        return ids

    @property
    def rows(self) -> int:
        return len(self.ids)


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
    not_sent = {i for i in work.ids if db[i]["status"] != "sent"}
    state = stack.state()
    users = state["users"]
    lost = len(not_sent)
    duplicated = 0
    out_of_order, wrong_visits = [], {}
    for user, expected in work.identify_seqs.items():
        props = users.get(user, {}).get("user_properties", {})
        seen = props.get("seen", [])
        seen = seen if isinstance(seen, list) else [seen]
        counts = Counter(seen)
        lost += sum(1 for s in expected if s not in counts)
        duplicated += sum(n - 1 for n in counts.values()) + len(set(counts) - set(expected))
        if props.get("visits", 0) != len(expected):
            wrong_visits[user] = (props.get("visits", 0), len(expected))
        if seen != expected:
            out_of_order.append(user)
    received = Counter(
        e["event_properties"]["seq"] for e in state["events"] if e["event_type"] == "Order Picked Up"
    )
    lost += sum(1 for s in work.event_seqs if s not in received)
    duplicated += sum(n - 1 for n in received.values()) + len(set(received) - set(work.event_seqs))
    n_identify = sum(len(v) for v in work.identify_seqs.values())
    return Audit(
        lost=lost,
        duplicated=duplicated,
        statuses=stack.counts(),
        unique_events=state["counts"]["events_unique"],
        expected_unique_events=len(work.event_seqs) + n_identify,
        out_of_order_users=out_of_order,
        wrong_visits=wrong_visits,
    )


def report(fault: str, work: Workload, injected: int, result: Audit) -> None:
    print(f"\nfault={fault} rows={work.rows} faults_injected={injected} "
          f"lost={result.lost} duplicated={result.duplicated}")  # fmt: skip


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
    for _ in range(4):
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
