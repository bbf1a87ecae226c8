"""Summaries of py-spy recordings (`--format raw`: one collapsed stack and its sample count per
line) of the worker tree and of the emulator.

The worker is recorded with --idle, so its samples are wall-clock time: a pool process waiting
on PostgreSQL, on Amplitude or for its next task shows up as such. Each sample is put in the
first pipeline step found on its stack, and by its innermost frame in a state: waiting on the
database, on the network (HTTP), on the broker, idle, or running Python.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# (frame prefix, step) in priority order: the first one on a stack names the sample's step.
STEPS = (
    ("claim (tasks/db/queue.py", "sync: claim"),
    ("sweep (tasks/db/queue.py", "sync: sweep expired leases"),
    ("has_due_rows (tasks/db/queue.py", "sync: has_due_rows"),
    ("sync.<locals>.enqueue (tasks/worker/jobs.py", "sync: publish send tasks"),
    ("record_run (tasks/db/history.py", "sync: record run history"),
    ("renew_and_load (tasks/db/queue.py", "send: renew lease + load rows"),
    ("count_rerun (tasks/db/queue.py", "send: count_rerun"),
    ("renew (tasks/db/queue.py", "send: renew lease"),
    ("defer_out_of_order (tasks/db/queue.py", "send: defer_out_of_order"),
    ("load (tasks/db/queue.py", "send: load rows"),
    ("db_now (tasks/db/reports.py", "send: database clock"),
    ("read (tasks/db/endpoints.py", "pause check (endpoint table)"),
    ("Builder.prepare (tasks/amplitude/payloads.py", "send: build payloads"),
    ("Client.send (tasks/amplitude/client.py", "send: HTTP request"),
    ("read (tasks/amplitude/answers.py", "send: read answer"),
    ("acknowledge (tasks/db/queue.py", "send: acknowledge"),
    ("run_sync (tasks/delivery/sync.py", "sync: other"),
    ("sync (tasks/worker/jobs.py", "sync: task body outside run_sync (llen, follow-up)"),
    ("run_send (tasks/delivery/send.py", "send: other"),
    ("Delivery.run (tasks/delivery/send.py", "send: other"),
    ("send_batch (tasks/worker/jobs.py", "send: task body outside run_send (log)"),
    (
        "build_tracer.<locals>.trace_task (celery",
        "Celery per-task overhead (trace, result, events)",
    ),
)
# Innermost frames that mean the process is waiting, not running Python.
WAITS = (
    ("Connection.wait (psycopg", "database"),
    ("wait (psycopg", "database"),
    ("SocketIO.readinto (socket.py", "network"),
    ("SocketBuffer._read_from_socket (redis", "broker"),
    ("_epoll.poll (kombu", "idle"),
    ("Connection._recv (billiard", "idle"),
    ("Connection._poll (billiard", "idle"),
    ("sleep", "idle"),
)
STATES = ("database", "network", "broker", "idle", "python")


def _state(leaf: str) -> str:
    for prefix, state in WAITS:
        if leaf.startswith(prefix):
            return state
    return "python"


def _read(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            stacks.append((stack.split(";"), int(n)))
    return stacks


def summarize(path: Path, worker: bool = True, top: int = 12) -> str:
    stacks = _read(path)
    if not stacks:
        return f"(no samples in {path.name})"
    return _worker(stacks, top) if worker else _emulator(stacks, top)


def _worker(stacks: list[tuple[list[str], int]], top: int) -> str:
    steps: Counter[tuple[str, str]] = Counter()
    per_process: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    pool_total = 0
    for frames, n in stacks:
        processes = [f for f in frames if f.startswith("process ")]
        code = [f for f in frames if not f.startswith("process ")]
        pool = len(processes) > 1  # a pool child's stack starts with its parent's frame
        role = "pool" if pool else "main"
        per_process[role] += n
        state = _state(code[-1]) if code else "idle"
        if not pool:
            continue
        pool_total += n
        step = next(
            (label for prefix, label in STEPS for f in code if f.startswith(prefix)),
            "idle in the pool: waiting for a task" if state == "idle" else "Celery pool loop",
        )
        steps[(step, state)] += n
        if state == "python":
            leaves[code[-1]] += n
    by_step: dict[str, Counter[str]] = {}
    for (step, state), n in steps.items():
        by_step.setdefault(step, Counter())[state] += n
    lines = [
        f"pool processes: {pool_total:,} samples (wall clock, all pool processes together); "
        f"main process: {per_process['main']:,}",
        "",
        "| step | share of pool time | waiting on DB | on HTTP | on broker | idle | Python |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for step, states in sorted(by_step.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(states.values())
        lines.append(
            f"| {step} | {100 * total / pool_total:.1f}% | "
            + " | ".join(f"{100 * states[s] / pool_total:.1f}%" for s in STATES)
            + " |"
        )
    python = sum(leaves.values())
    lines += [
        "",
        f"top Python frames in pool processes (self time, share of {python:,} samples "
        "running Python):",
        "",
    ]
    lines += [f"- {100 * n / python:.1f}% `{frame}`" for frame, n in leaves.most_common(top)]
    return "\n".join(lines)


def _emulator(stacks: list[tuple[list[str], int]], top: int) -> str:
    total = sum(n for _, n in stacks)
    parts = Counter()
    leaves = Counter()
    for frames, n in stacks:
        code = [f for f in frames if not f.startswith("process ")]
        emu = [f.split(" (")[0] for f in code if "ampsync_emulator/" in f]
        parts[emu[-1] if emu else (code[-1] if code else "?")] += n
        leaves[code[-1] if code else "?"] += n
    lines = [
        f"emulator: {total:,} samples of CPU (no idle samples)",
        "",
        "innermost emulator function on the stack:",
        "",
    ]
    lines += [f"- {100 * n / total:.1f}% `{name}`" for name, n in parts.most_common(top)]
    return "\n".join(lines)
