"""What the integration and end-to-end tests share: the test services' URLs, the environment
of the test process, and `Stack` — one configuration of ampsync under test (a queue table on a
real database, the emulator as Amplitude, and the Celery workers a test starts).

Importing this module prepares the environment of the test process (the broker the workers
consume, no API key, no rate cap) before anything here imports `tasks`, which reads its
settings on import: tests/conftest.py imports it first, so it is in place for every test.
Nothing here connects to a service on import.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path


def _redis_url() -> str:
    """The tests' Redis database; each pytest-xdist worker (gw0, gw1, …) gets the next one up,
    so one worker's Celery workers never consume another's tasks."""
    base = os.environ.get("AMPSYNC_TEST_REDIS", "redis://127.0.0.1:6379/7")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return base
    head, _, db = base.rpartition("/")
    return f"{head}/{(int(db or 0) + int(worker[2:])) % 16}"


REDIS_URL = _redis_url()
PG_URL = os.environ.get("AMPSYNC_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("AMPSYNC_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
API_KEY = "test-api-key-123456"
# The environment of a user who has set nothing (for commands run as subprocesses).
CLEAN_ENV = {
    k: v for k, v in os.environ.items() if not k.startswith(("AMPSYNC_", "AMPLITUDE_", "CELERY_"))
}

# The test process publishes to the same broker the workers consume.
os.environ["CELERY_BROKER_URL"] = REDIS_URL
os.environ.pop("AMPLITUDE_API_KEY", None)
os.environ.setdefault("AMPSYNC_EVENTS_PER_SECOND", "0")

# The repository: the working directory of the commands the tests run.
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sqlalchemy import delete, func, select  # noqa: E402

from ampsync_emulator import Emulator, Faults  # noqa: E402
from tasks.broker import redis_client  # noqa: E402
from tasks.db import engine as db_engine  # noqa: E402
from tasks.db import queue, schema, setup  # noqa: E402

# Fast clocks for tests: backoff, pauses and throttle waits in fractions of a second.
FAST = {
    "AMPSYNC_BACKOFF_BASE": "0.2",
    "AMPSYNC_BACKOFF_MAX": "1",
    "AMPSYNC_PAUSE_BASE": "0.5",
    "AMPSYNC_PAUSE_MAX": "2",
    "AMPSYNC_THROTTLE_WAIT_V2": "0.5",
    "AMPSYNC_THROTTLE_WAIT_BATCH": "0.5",
    "AMPSYNC_DAILY_QUOTA_WAIT": "1",
    "AMPSYNC_LEASE_SECONDS": "30",
    "AMPSYNC_EVENTS_PER_SECOND": "0",
}


# The databases a statement test runs on; SQLite's file is made per test (None here).
BACKENDS: dict[str, str | None] = {"postgresql": PG_URL, "mariadb": MARIADB_URL, "sqlite": None}


def run_cli(
    *args: str, env: dict[str, str], cwd: Path | str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`ampsync ARGS` as a user runs it, in its own process; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def poll_until(check, timeout: float = 20.0, step: float = 0.2):
    """`check()`'s first truthy value, or its last value once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


@dataclass
class Stack:
    """One configuration of ampsync under test: database, table, emulator, worker."""

    url: str
    table: str
    emulator: Emulator
    base_url: str
    env: dict[str, str]
    workers: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tables = schema.define_tables(self.table)
        self.engine = db_engine.make_engine(self.url)

    # --- rows --------------------------------------------------------------------------------
    def insert(self, rows: list[dict]) -> list[int]:
        with self.engine.begin() as conn:
            return queue.insert_rows_ids(conn, self.tables, rows)

    def rows(self, *ids: int) -> dict[int, dict]:
        q = self.tables.queue
        stmt = select(q).order_by(q.c.id)
        if ids:
            stmt = stmt.where(q.c.id.in_(ids))
        with self.engine.connect() as conn:
            return {r.id: dict(r._mapping) for r in conn.execute(stmt)}

    def counts(self) -> dict[str, int]:
        q = self.tables.queue
        with self.engine.connect() as conn:
            return dict(conn.execute(select(q.c.status, func.count()).group_by(q.c.status)).all())

    def clear(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(self.tables.queue))
            conn.execute(delete(self.tables.endpoints))
            conn.execute(delete(self.tables.runs))
        self.emulator.reset()
        self.emulator.set_faults(**DEFAULT_FAULTS)

    # --- workers -----------------------------------------------------------------------------
    def start_worker(
        self,
        concurrency: int = 2,
        beat: bool = False,
        extra_env: dict | None = None,
        wait: bool = True,
        queues: str | None = None,
    ) -> subprocess.Popen:
        from tasks.worker.process import worker_command

        log = Path(tempfile.mkstemp(prefix="ampsync-worker-", suffix=".log")[1])
        self.logs.append(log)
        env = {**os.environ, **self.env, **(extra_env or {})}
        cmd = worker_command(
            beat=beat,
            concurrency=concurrency,
            loglevel="INFO",
            beat_schedule_file=str(log.with_suffix(".beat")),
        )
        cmd += ["-n", f"w{uuid.uuid4().hex[:6]}@%h"]
        if queues:
            cmd[cmd.index("-Q") + 1] = queues
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        if wait:
            wait_for_worker(proc, log)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            stop_process(proc)
        self.workers.clear()

    def log_tail(self, chars: int = 4000) -> str:
        return "\n".join(p.read_text(errors="replace")[-chars:] for p in self.logs)

    # --- running -----------------------------------------------------------------------------
    def sync(self, kind: str | None = None, timeout: float = 30) -> dict:
        from tasks import sync

        return sync.delay(kind=kind).get(timeout=timeout)

    def drain(self, timeout: float = 60, kind: str | None = None) -> dict[str, int]:
        """Sync until no row is pending or in flight; returns the final counts."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if not counts.get("pending") and not counts.get("in_flight"):
                return counts
            if time.monotonic() > deadline:
                raise AssertionError(f"queue did not drain: {counts}\n{self.log_tail()}")
            self.sync(kind)
            time.sleep(0.3)

    def state(self) -> dict:
        return self.emulator.snapshot()

    def status(self) -> dict:
        """What `ampsync status --json` reports for this stack."""
        from tasks import settings
        from tasks.cli import status

        s = settings.Settings(AMPSYNC_DATABASE_URL=self.url, AMPSYNC_QUEUE_TABLE=self.table)
        return status.collect(s, self.tables, self.engine)


# Every fault the emulator has, at its default: tests reset to this, so a fault one test set
# (a new one included) never leaks into the next.
DEFAULT_FAULTS = asdict(Faults())


def wait_for_worker(proc: subprocess.Popen, log: Path, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if " ready." in text:
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"worker not ready after {timeout} s:\n{log.read_text()[-4000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(10)


def flush_redis() -> None:
    client = redis_client(REDIS_URL)
    client.flushdb()
    client.close()


# --- stacks for the fixtures (tests/conftest.py) ---------------------------------------------


def new_stack(emulator: tuple[Emulator, str], url: str, env: dict[str, str] | None = None) -> Stack:
    """A stack on a fresh queue table (created here) at `url`, talking to `emulator`."""
    emu, base_url = emulator
    table = f"q_{uuid.uuid4().hex[:10]}"
    full_env = {
        **FAST,
        "AMPSYNC_DATABASE_URL": url,
        "AMPSYNC_QUEUE_TABLE": table,
        "AMPLITUDE_API_KEY": API_KEY,
        "AMPLITUDE_SERVER_URL": base_url,
        "CELERY_BROKER_URL": REDIS_URL,
        **(env or {}),
    }
    stack = Stack(url=url, table=table, emulator=emu, base_url=base_url, env=full_env)
    setup.init_db(stack.engine, stack.tables)
    return stack


def drop_stack(stack: Stack) -> None:
    """Stop the stack's workers and drop its tables."""
    stack.stop_workers()
    with contextlib.suppress(Exception), stack.engine.begin() as conn:
        for table in reversed(stack.tables.metadata.sorted_tables):
            table.drop(conn, checkfirst=True)
    stack.engine.dispose()


# Stacks whose workers are running: workers of different stacks share the test broker, so
# only one stack may have workers at a time (another's worker would take its send tasks).
RUNNING: list[Stack] = []


def stop_running_workers() -> None:
    """Stop the workers of every running stack."""
    for other in list(RUNNING):
        other.stop_workers()
        RUNNING.remove(other)


def run_alone(stack: Stack) -> None:
    """Stop the workers of every other stack, and count this one as running."""
    for other in list(RUNNING):
        if other is not stack:
            other.stop_workers()
            RUNNING.remove(other)
    if stack not in RUNNING:
        RUNNING.append(stack)


# --- rows --------------------------------------------------------------------------------------


def identify(user_id: str, props: dict, **extra) -> dict:
    return {"kind": "identify", "user_id": user_id, "properties": json.dumps(props), **extra}


def event(user_id: str, event_type: str, props: dict | None = None, **extra) -> dict:
    row = {
        "kind": "event",
        "user_id": user_id,
        "event_type": event_type,
        "properties": json.dumps(props) if props is not None else None,
    }
    row.update(extra)
    return row


def group(group_type: str, value: str, props: dict) -> dict:
    return {
        "kind": "group_identify",
        "group_type": group_type,
        "group_value": value,
        "properties": json.dumps(props),
    }


BAD_JSON = "{segment: gold"


def settle_a_day_of_outcomes(stack: Stack) -> None:
    """Rows of every outcome, as `status` and the metrics report them: three identifies sent,
    two identical broken JSONs and one placeholder id failed, then Amplitude answering 500 to
    the next events request and a gateway's HTML 400 page to group identify (a 400 about the
    request: that endpoint pauses), so three rows wait pending. Needs a running worker."""
    stack.insert([identify(f"user-0000{n}", {"CRM_Segment": "gold"}) for n in range(3)])
    stack.insert([{"kind": "identify", "user_id": "user-00009", "properties": BAD_JSON}] * 2)
    stack.insert([event("null", "Order Picked Up")])
    assert stack.drain() == {"sent": 3, "failed": 3}
    stack.emulator.set_faults(
        fail_next=[
            {"path": "/batch", "code": 500},
            {"path": "/groupidentify", "code": 400, "html": True},
        ]
    )
    stack.insert(
        [
            event("user-00001", "Store Visit"),
            event("user-00002", "Store Visit"),
            {
                "kind": "group_identify",
                "group_type": "company",
                "group_value": "Acme",
                "properties": json.dumps({"plan": "enterprise"}),
            },
        ]
    )
    stack.sync()
    assert poll_until(lambda: stack.counts().get("pending") == 3), stack.counts()


def free_port() -> int:
    """A TCP port nothing listens on now, for a server the test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ampsync_run(cwd: Path, env: dict[str, str], concurrency: int = 1) -> subprocess.Popen:
    """`ampsync run` as a user starts it in `cwd`, in a session of its own (so the test can
    signal the whole group), its output in cwd/run.log."""
    with (cwd / "run.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "run", "--concurrency", str(concurrency)],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
