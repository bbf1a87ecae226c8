"""`ampsync demo`: the whole job on embedded defaults.

A SQLite queue table with sample CRM rows (CRM_Segment / CRM_Group / CRM_Level identifies as
in the README's examples, offline "Order Picked Up" events, a group, two broken rows), an embedded
Redis, the emulator, and a real Celery worker with beat. Runs until the queue drains, prints
what Amplitude received, exits 0 when every valid row was delivered.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import IO

from sqlalchemy import Engine

from ampsync_emulator import Emulator

from .. import settings
from ..broker import EmbeddedRedis
from ..db import engine as db_engine
from ..db import queue, reports, schema, setup
from ..worker.process import worker_command
from .progress import Progress

SEGMENTS = ["gold", "silver", "bronze", "churn-risk"]
GROUPS = ["retail", "b2b", "vip"]
INVALID_ROWS = 2
DEMO_EVENT = "Order Picked Up"
SPECIAL_EVENT_KINDS = {"$identify": "identify", "$groupidentify": "group_identify"}
EVENT_FIELDS_SHOWN = (
    "event_type",
    "user_id",
    "time",
    "insert_id",
    "event_properties",
    "revenue",
    "platform",
)


def sample_rows(users: int, seed: int = 7) -> list[dict]:
    rnd = random.Random(seed)
    rows: list[dict] = []
    for n in range(users):
        props = {
            "CRM_Segment": rnd.choice(SEGMENTS),
            "CRM_Group": rnd.choice(GROUPS),
            "CRM_Level": rnd.randint(1, 5),
        }
        rows.append(
            {"kind": "identify", "user_id": f"crm-{n:05d}", "properties": json.dumps(props)}
        )
    for n in range(0, users, 3):
        order = 100000 + n
        rows.append(
            {
                "kind": "event",
                "user_id": f"crm-{n:05d}",
                "event_type": "Order Picked Up",
                "insert_id": f"order-{order}",
                "properties": json.dumps({"order_id": order, "store": rnd.choice(["A", "B"])}),
                "extra": json.dumps(
                    {"revenue": round(rnd.uniform(5, 200), 2), "platform": "Store"}
                ),
            }
        )
    rows.append(
        {
            "kind": "group_identify",
            "group_type": "company",
            "group_value": "Acme Ltd",
            "properties": json.dumps({"plan": "enterprise", "seats": 40}),
        }
    )
    # Broken on purpose: they end `failed` with a reason, the rest is still delivered.
    rows.append({"kind": "identify", "user_id": "crm-broken-json", "properties": "{segment: gold"})
    rows.append({"kind": "event", "user_id": "null", "event_type": "Order Picked Up"})
    return rows


def run_demo(users: int = 300, keep: bool = False, timeout: float = 180) -> int:
    """The demo; its folder, embedded Redis, emulator and worker are gone when it returns,
    also after Ctrl-C or SIGTERM (which end it with 130)."""
    folder = Path(tempfile.mkdtemp(prefix="ampsync-demo-"))
    parts = _Parts(folder)
    # SIGTERM (a closed terminal, `kill`, a CI timeout) cleans up as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(parts, users, timeout)
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopping the worker, Redis and the emulator", file=sys.stderr)
        return 130
    finally:
        parts.stop()
        signal.signal(signal.SIGTERM, previous)
        if keep:
            print(f"demo folder kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class _Parts:
    """What the demo starts, each stopped once whatever happened."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.emulator: Emulator | None = None
        self.redis: EmbeddedRedis | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.engine: Engine | None = None

    def stop(self) -> None:
        self.stop_worker()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.terminate()
            try:
                self.worker.wait(20)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
            self.worker = None
        if self.log is not None:
            self.log.close()
            self.log = None


def _run(parts: _Parts, users: int, timeout: float) -> int:
    folder = parts.folder
    parts.emulator = Emulator()
    base_url = parts.emulator.start()
    (folder / "redis").mkdir()
    parts.redis = EmbeddedRedis(str(folder / "redis"))
    broker_url = parts.redis.start()
    env = {
        "AMPSYNC_DATABASE_URL": f"sqlite:///{folder / 'demo.db'}",
        "AMPLITUDE_API_KEY": "demo-api-key-0000",
        "AMPLITUDE_SERVER_URL": base_url,
        "CELERY_BROKER_URL": broker_url,
        "AMPSYNC_SYNC_INTERVAL": "2",
        "AMPSYNC_BACKOFF_BASE": "1",
    }
    os.environ.update(env)
    settings.get.cache_clear()
    s = settings.get()
    tables = schema.define_tables(s.queue_table)
    engine = parts.engine = db_engine.make_engine(s.database_url)
    setup.init_db(engine, tables)
    rows = sample_rows(users)
    with engine.begin() as conn:
        queue.insert_rows(conn, tables, rows)
    print(
        f"demo: {len(rows)} rows in {settings.mask_url(s.database_url)}, emulator at {base_url}",
        flush=True,
    )

    parts.log = open(folder / "worker.log", "wb")  # noqa: SIM115 - closed by parts.stop()
    parts.worker = subprocess.Popen(
        worker_command(
            beat=True,
            concurrency=2,
            loglevel="WARNING",
            beat_schedule_file=str(folder / "beat-schedule"),
        ),
        env={**os.environ, **env},
        stdout=parts.log,
        stderr=subprocess.STDOUT,
    )
    started = time.monotonic()
    bar = Progress(len(rows), label="demo:")
    while True:
        counts = _counts(engine, tables)
        outcome = {name: counts.get(name, 0) for name in ("sent", "failed")}
        done = sum(outcome.values())
        if done == len(rows):
            bar.finish(done, **outcome)
            break
        bar.update(done, **outcome)
        if parts.worker.poll() is not None or time.monotonic() - started > timeout:
            bar.finish(done, **outcome)
            print("demo: the worker stopped or the queue did not drain; its log:")
            parts.log.flush()
            sys.stdout.write((folder / "worker.log").read_text(errors="replace")[-3000:])
            return 1
        time.sleep(0.5)
    parts.stop_worker()  # nothing changes while the report is read
    report(engine, tables, parts.emulator.snapshot())
    return 0 if counts.get("failed", 0) == INVALID_ROWS else 1


def _counts(engine: Engine, tables: schema.QueueTables) -> dict[str, int]:
    """Rows by status, all kinds together."""
    with engine.connect() as conn:
        return reports.by_status(reports.row_counts(conn, tables))


def report(engine: Engine, tables: schema.QueueTables, state: dict) -> None:
    print("\nqueue table by kind and status:")
    with engine.connect() as conn:
        counts = reports.row_counts(conn, tables)
        failed = reports.failed_rows(conn, tables)
    for kind, statuses in counts.items():
        for status, n in statuses.items():
            print(f"  {kind:<15} {status:<8} {n:>6}")
    for row_id, error in failed:
        print(f"  row {row_id} failed: {error}")
    received = received_by_kind(state.get("events", []))
    print(
        f"\nAmplitude (emulator) received {received['event']} events, "
        f"{received['identify']} identifies ($identify) and {received['group_identify']} group "
        f"identifies ($groupidentify), for {len(state.get('users', {}))} users."
    )
    example = next((e for e in state.get("events", []) if e.get("event_type") == DEMO_EVENT), None)
    if example is not None:
        shown = {k: example[k] for k in EVENT_FIELDS_SHOWN if k in example}
        print(f"An event as Amplitude received it:\n  {json.dumps(shown, sort_keys=True)}")
    print("A few profiles:")
    for user_id in sorted(state.get("users", {}))[:5]:
        props = state["users"][user_id].get("user_properties", {})
        print(f"  {user_id}: {json.dumps(props, sort_keys=True)}")
    for key, props in list(state.get("groups", {}).items())[:2]:
        print(f"  group {key}: {json.dumps(props, sort_keys=True, default=str)}")


def received_by_kind(events: list[dict]) -> dict[str, int]:
    """Events Amplitude received, by the queue kind they stand for: `$identify` events carry
    identify rows and `$groupidentify` events group rows; the rest are events."""
    counts = {"event": 0, "identify": 0, "group_identify": 0}
    for e in events:
        kind = SPECIAL_EVENT_KINDS.get(e.get("event_type", ""), "event")
        counts[kind] += 1
    return counts
