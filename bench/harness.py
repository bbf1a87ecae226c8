"""The parts a benchmark run starts and watches: rows, the emulator, a worker, a sampler.

Everything here is real: the emulator is `ampsync emulator` in its own process, the worker is
`celery -A tasks worker` as `tasks.worker.process.worker_command` builds it, the rows are in a real
PostgreSQL or SQLite table made by `setup.init_db`. The benchmark process only inserts rows,
publishes `ampsync.sync` (as beat would) and reads counts, results and process statistics.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
API_KEY = "bench-api-key-000001"

# --- machine -----------------------------------------------------------------------------------


def machine_facts(database_url: str) -> dict[str, str]:
    """What a reader needs to compare numbers across machines."""
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    facts = {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu model": cpu_model or "unknown",
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load average (1/5/15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "cpu speed (pure-Python loop of 10M additions, best of 3; lower is faster)": f"{cpu_speed():.2f} s",
    }
    import celery
    import sqlalchemy

    facts["celery / sqlalchemy"] = f"{celery.__version__} / {sqlalchemy.__version__}"
    facts["code"] = git_state()
    if database_url.startswith("postgresql"):
        from sqlalchemy import create_engine, text

        engine = create_engine(database_url)
        with engine.connect() as conn:
            facts["database"] = conn.execute(text("show server_version")).scalar_one()
            facts["database"] = "PostgreSQL " + facts["database"]
        engine.dispose()
    else:
        import sqlite3

        facts["database"] = f"SQLite {sqlite3.sqlite_version}"
    with contextlib.suppress(Exception):
        import redis

        info = redis.Redis.from_url("redis://127.0.0.1:6379/0").info("server")
        facts["redis"] = str(info.get("redis_version"))
    return facts


def cpu_speed() -> float:
    """Seconds for one core to run a fixed pure-Python loop, at the start of the run: a rough
    gauge of the machine at that moment (one shared build machine gave 0.40-1.65 s within an
    hour). Across machines the emulator's CPU per row is the steadier yardstick: the same code
    doing the same work in every run (bench/README.md)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(10_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return best


def git_state(root: Path = ROOT) -> str:
    """The commit measured, and whether tasks/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tasks", "beat_schedule.py"],
            cwd=root,
            text=True,
            capture_output=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


# --- rows --------------------------------------------------------------------------------------

# Column order of generated rows (COPY on PostgreSQL, executemany on SQLite).
ROW_COLUMNS = (
    "kind",
    "user_id",
    "event_type",
    "event_time",
    "properties",
    "status",
    "attempts",
    "sent_at",
)
_SEGMENTS = ("gold", "silver", "bronze", "vip", "new")
_EPOCH = datetime(2024, 1, 1)


def row_kind(kind: str, i: int) -> str:
    if kind == "mixed":
        return "identify" if i % 2 == 0 else "event"
    return kind


def make_row(kind: str, i: int, sent_at: datetime | None = None) -> tuple:
    """Row number i of a data set: deterministic, so two tables can hold the same rows.

    Identify rows are one per user (a CRM export: a user's attributes), events ten per user
    (a backfill of offline conversions), like the seed article's two jobs.
    """
    k = row_kind(kind, i)
    status = "sent" if sent_at else "pending"
    attempts = 1 if sent_at else 0
    if k == "identify":
        props = {
            "CRM_Segment": _SEGMENTS[i % 5],
            "CRM_Group": f"group-{i % 17}",
            "CRM_Level": i % 10,
            "purchases": i % 97,
            "signup_date": f"2021-{1 + i % 12:02d}-{1 + i % 28:02d}",
        }
        return (k, f"user-{i:09d}", None, None, json.dumps(props), status, attempts, sent_at)
    props = {
        "order_id": f"order-{i}",
        "store": f"store-{i % 50}",
        "amount": (i % 1000) + 0.5,
        "channel": "click-and-collect",
    }
    return (
        k,
        f"user-{i // 10:09d}",
        "order picked up",
        _EPOCH + timedelta(seconds=i),
        json.dumps(props),
        status,
        attempts,
        sent_at,
    )


def generate(kind: str, start: int, count: int, sent_at: datetime | None = None) -> Iterator[tuple]:
    for i in range(start, start + count):
        yield make_row(kind, i, sent_at)


def bulk_insert(engine, table_name: str, rows: Iterator[tuple]) -> None:
    """Fast load: COPY on PostgreSQL, one executemany transaction in chunks on SQLite."""
    cols = ", ".join(ROW_COLUMNS)
    if engine.dialect.name == "postgresql":
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            with conn.cursor() as cur, cur.copy(f"COPY {table_name} ({cols}) FROM STDIN") as cp:
                for row in rows:
                    cp.write_row(row)
            conn.commit()
        finally:
            raw.close()
        return
    marks = ", ".join("?" for _ in ROW_COLUMNS)
    raw = engine.raw_connection()
    try:
        cur = raw.driver_connection.cursor()
        cur.execute("BEGIN")
        chunk: list[tuple] = []
        for row in rows:
            chunk.append(
                tuple(
                    v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v
                    for v in row
                )
            )
            if len(chunk) >= 50_000:
                cur.executemany(f"INSERT INTO {table_name} ({cols}) VALUES ({marks})", chunk)
                chunk.clear()
        if chunk:
            cur.executemany(f"INSERT INTO {table_name} ({cols}) VALUES ({marks})", chunk)
        cur.execute("COMMIT")
    finally:
        raw.close()


def analyze(engine, table_name: str) -> None:
    """Fresh planner statistics, as autovacuum would have them by the time a sync runs."""
    with engine.connect() as conn:
        conn.exec_driver_sql(f"ANALYZE {table_name}")
        conn.commit()


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process we started (and its own children) by its process group."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def emulator_command() -> list[str]:
    """`ampsync emulator`, through the interpreter running the benchmark."""
    return [sys.executable, "-m", "tasks.cli", "emulator"]


@dataclass
class EmulatorProcess:
    """`ampsync emulator` as Amplitude, in its own process, keeping only counts."""

    latency_ms: float
    log_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    # Flags that keep the emulator small and neutral in a long run: no event list kept
    # (counts stay complete) and no per-user 429s (an Enterprise project's volume).
    FLAGS = ("--keep-events", "0", "--no-eps-limit")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            *emulator_command(),
            "--port",
            str(self.port),
            "--latency-ms",
            f"{self.latency_ms:g}",
            *self.FLAGS,
        ]

    def start(self) -> None:
        log = (self.log_dir / "emulator.log").open("wb")
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/_emulator/faults", timeout=1).ok:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"emulator exited: {(self.log_dir / 'emulator.log').read_text()}"
                )
            time.sleep(0.1)
        raise RuntimeError("emulator did not answer within 30 s")

    def counts(self) -> dict:
        return requests.get(self.url + "/_emulator/state?events=0", timeout=30).json()["counts"]

    def reset(self) -> None:
        # Control endpoints take JSON only (the emulator refuses cross-site form posts).
        requests.post(self.url + "/_emulator/reset", json={}, timeout=30).raise_for_status()

    def set_faults(self, **faults: object) -> None:
        """Merge fault settings (`Faults` fields); a reset keeps them, so a clean run sets its
        rates back to 0."""
        requests.post(self.url + "/_emulator/faults", json=faults, timeout=30).raise_for_status()

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc)


def requests_sent(before: dict, after: dict) -> dict[str, int]:
    """API requests per path and status between two /_emulator/state counts."""
    out: dict[str, int] = {}
    for path, per in after["requests"].items():
        if path.startswith("/_emulator") or path in ("/", "/favicon.ico"):
            continue
        for status, n in per.items():
            d = n - before["requests"].get(path, {}).get(status, 0)
            if d:
                out[f"{path} {status}"] = d
    return out


@dataclass
class WorkerProcess:
    """A real Celery worker on the sync and send queues, as `ampsync`'s docs start it."""

    env: dict[str, str]
    concurrency: int
    log_path: Path
    # The checkout whose `tasks` the worker runs (another git worktree to compare versions):
    # Celery imports the app from its working directory, and PYTHONPATH puts it before the
    # editable install.
    code: Path = ROOT
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        from tasks.worker.process import worker_command

        cmd = worker_command(beat=False, concurrency=self.concurrency, loglevel="INFO")
        cmd += ["-n", f"bench{os.getpid()}-{int(time.time())}@%h"]
        env = {**os.environ, **self.env}
        if self.code != ROOT:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(self.code), env.get("PYTHONPATH")])
            )
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=self.code,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if " ready." in text:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(
            f"worker not ready after {timeout} s:\n{self.log_path.read_text()[-3000:]}"
        )

    def pool_pids(self) -> list[int]:
        assert self.proc
        with contextlib.suppress(psutil.NoSuchProcess):
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        return []

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc, timeout=30)


# --- sampling: RSS, CPU per stage, broker queue depth ------------------------------------------


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _find(name_test, cmd_test=None) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if name_test(p.info["name"] or "") and (
                cmd_test is None or cmd_test(" ".join(p.info["cmdline"] or []))
            ):
                found.append(p)
    return found


class Sampler:
    """Samples, every `period` seconds, the RSS of every worker process, the broker's send queue
    length and the CPU seconds of each stage (worker tree, database, broker, emulator, this
    process). CPU is summed per pid from the first sample that saw it, so processes that come
    and go (PostgreSQL backends, pool restarts) are counted."""

    def __init__(
        self,
        worker_pid: int,
        emulator_pid: int,
        redis_client,
        send_queue: str,
        backend_pids: Callable[[], set[int]] | None = None,
        period: float = 0.25,
    ) -> None:
        self.worker_pid = worker_pid
        self.emulator_pid = emulator_pid
        self.redis = redis_client
        self.send_queue = send_queue
        # PostgreSQL is shared with other users of the machine: only the worker's backends
        # (found by application_name) count as this pipeline's database CPU.
        self.backend_pids = backend_pids
        self.period = period
        self.peak_rss: dict[int, int] = {}  # pid -> bytes
        self.role: dict[int, str] = {}
        self.queue_depth: list[int] = []  # send tasks waiting in the broker
        self.held: list[int] = []  # tasks delivered to the worker and not yet acknowledged
        self._first: dict[tuple[str, int], float] = {}
        self._last: dict[tuple[str, int], float] = {}
        self._procs: dict[tuple[str, int], psutil.Process] = {}
        self._machine0 = psutil.cpu_times()
        self._machine1 = self._machine0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-sampler")
        self._refreshed = 0.0
        self._at_start: dict[int, float] = {}  # CPU seconds of PostgreSQL processes at start
        self.started = self.stopped = 0.0

    def _refresh(self) -> None:
        """Find the processes of each stage (the worker's children, PostgreSQL, redis-server)."""
        stages: dict[str, list[psutil.Process]] = {"bench": [psutil.Process()]}
        with contextlib.suppress(psutil.Error):
            main = psutil.Process(self.worker_pid)
            stages["worker"] = [main, *main.children(recursive=True)]
            self.role[main.pid] = "main"
            for c in stages["worker"][1:]:
                self.role.setdefault(c.pid, "pool")
        with contextlib.suppress(psutil.Error):
            stages["emulator"] = [psutil.Process(self.emulator_pid)]
        if self.backend_pids is not None:
            with contextlib.suppress(Exception):
                mine = self.backend_pids()
                postgres = _find(lambda n: n.startswith("postgres"))
                stages["database"] = [p for p in postgres if p.pid in mine]
                # WAL writer, checkpointer, autovacuum: shared, but mostly this run's writes.
                stages["database background"] = [
                    p
                    for p in postgres
                    if p.pid not in mine
                    and not re.search(r"postgres: \S+: \S+ \S+ [\d.]+\(", " ".join(p.cmdline()))
                ]
        # SQLite runs inside the worker processes: its CPU is the worker's.
        stages["broker"] = _find(lambda n: n.startswith("redis-server"), lambda c: ":6379" in c)
        for stage, procs in stages.items():
            for p in procs:
                self._procs.setdefault((stage, p.pid), p)

    def _sample(self) -> None:
        now = time.monotonic()
        if now - self._refreshed > 0.5:
            self._refresh()
            self._refreshed = now
        for key, p in list(self._procs.items()):
            try:
                cpu = _cpu(p)
                if key[0] == "worker" or key[0] == "emulator":
                    rss = p.memory_info().rss
                    self.peak_rss[p.pid] = max(self.peak_rss.get(p.pid, 0), rss)
            except psutil.Error:
                self._procs.pop(key, None)
                continue
            if key not in self._first:
                # Counted from its CPU at the start, or from zero when it was born since
                # (a PostgreSQL backend is known to be the worker's only once it shows its
                # application_name, so every PostgreSQL process is noted at the start).
                self._first[key] = self._at_start.get(p.pid, 0.0)
            self._last[key] = cpu
        with contextlib.suppress(Exception):
            # acks_late: a task stays in kombu's `unacked` hash while reserved or running.
            waiting, held = self.redis.pipeline().llen(self.send_queue).hlen("unacked").execute()
            self.queue_depth.append(int(waiting))
            self.held.append(int(held))
        self._machine1 = psutil.cpu_times()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def start(self) -> None:
        self._refresh()
        for p in [*_find(lambda n: n.startswith("postgres")), *self._procs.values()]:
            with contextlib.suppress(psutil.Error):
                self._at_start[p.pid] = _cpu(p)
        self._refreshed = time.monotonic()
        self._sample()
        self._machine0 = psutil.cpu_times()
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._refreshed = 0.0  # find processes born since the last refresh
        self._sample()
        self.stopped = time.monotonic()

    def cpu_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (stage, pid), last in self._last.items():
            used = last - self._first[(stage, pid)]
            out[stage] = out.get(stage, 0.0) + used
            if self.role.get(pid) == "main":  # a part of "worker", not a stage of its own
                out["worker main process"] = used
        m0, m1 = self._machine0, self._machine1
        total = sum(m1) - sum(m0)
        idle = (m1.idle - m0.idle) + (getattr(m1, "iowait", 0) - getattr(m0, "iowait", 0))
        ours = sum(v for k, v in out.items() if k != "worker main process")
        out["machine (all processes)"] = (total - idle) / (os.cpu_count() or 1)
        # CPU this benchmark did not cause (other users of a shared machine): noise to report.
        out["other processes"] = max(0.0, total - idle - ours)
        return out

    def worker_rss(self) -> tuple[int, int]:
        """(peak RSS of the main worker process, peak RSS of the largest pool process)."""
        main = max((v for p, v in self.peak_rss.items() if self.role.get(p) == "main"), default=0)
        pool = max((v for p, v in self.peak_rss.items() if self.role.get(p) == "pool"), default=0)
        return main, pool

    @property
    def emulator_rss(self) -> int:
        return self.peak_rss.get(self.emulator_pid, 0)


# --- results of the tasks ----------------------------------------------------------------------

_SUCCEEDED = re.compile(r"Task (ampsync\.\w+)\[([0-9a-f-]+)\] succeeded in ([0-9.e+-]+)s")
_FAILED = re.compile(r"Task (ampsync\.\w+)\[([0-9a-f-]+)\] raised unexpected: (.{0,200})")


def task_results(redis_client) -> dict[str, dict]:
    """Every task's result by task id, from the Celery result backend (both tasks keep their
    results, ignore_result=False, in the benchmark's own Redis database)."""
    out: dict[str, dict] = {}
    keys = list(redis_client.scan_iter(match="celery-task-meta-*", count=1000))
    for start in range(0, len(keys), 500):
        for raw in redis_client.mget(keys[start : start + 500]):
            meta = json.loads(raw) if raw else {}
            if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict):
                out[meta["task_id"]] = meta["result"]
    return out


def task_runtimes(log_path: Path) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Seconds each task ran by task name and id, as the worker logged it
    ("Task ampsync.send_batch[id] succeeded in 0.05s: …"), and the errors tasks raised."""
    out: dict[str, dict[str, float]] = {}
    errors: list[str] = []
    with log_path.open(errors="replace") as f:
        for line in f:
            if m := _SUCCEEDED.search(line):
                out.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
            elif m := _FAILED.search(line):
                errors.append(f"{m.group(1)}: {m.group(3)}")
    return out, errors


def run_dir(label: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{label}-", dir=RESULTS))
