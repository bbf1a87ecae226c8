"""Benchmark: drain N queued rows through the real pipeline, and through the seed-style loop.

    python bench/run.py --rows 10000 --kind identify --db postgresql --latency-ms 5 --repeat 3

Per repeat: N rows go into a fresh queue table (COPY / executemany; not timed), a real Celery
worker starts on a real Redis (database 13 by default), `ampsync emulator` answers as Amplitude
with the given latency, and the benchmark publishes `ampsync.sync` once and then every
--sync-every seconds (as beat would) until no row is pending or in flight. Then the baseline
(bench/baseline.py) drains a fresh copy of the same rows one request per row for at most
--baseline-seconds. Medians over the repeats are printed as a Markdown table. See README.md.

`--faults 0.2,0.1` adds, in every repeat, a drain from an emulator failing that share of requests
with a 5xx before ingesting them and that share with a 500 after (issue 13), next to the clean
drain; `--code DIR` (repeatable) runs the worker from other checkouts too (a `git worktree` of
an older commit). The conditions alternate (reversed every other repeat) so a machine that gets
busier during the invocation weighs on each alike; a summary table gives the faulty ÷ clean
ratio of the steady rate per code.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import harness  # noqa: E402

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
STAGES = ("claim", "load", "build", "http", "ack")


def count(text: str) -> int:
    """10000, 10k, 1M, 1_000_000."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if scale > 1 else t) * scale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=count, default=10_000, help="pending rows to drain (10k, 1M …)")
    p.add_argument("--kind", choices=["identify", "event", "mixed"], default="identify")
    p.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    p.add_argument("--latency-ms", type=float, default=5.0, help="emulator latency per request")
    p.add_argument("--repeat", type=int, default=3, help="runs; the table shows their median")
    p.add_argument("--concurrency", type=int, default=4, help="worker pool processes")
    p.add_argument("--batch-size", type=int, default=None, help="AMPSYNC_BATCH_SIZE (default 2000)")
    p.add_argument(
        "--preload-sent",
        type=count,
        default=0,
        help="rows already `sent` in the table before the run (history)",
    )
    p.add_argument(
        "--baseline-seconds",
        type=float,
        default=20.0,
        help="time budget of the seed-style baseline per repeat; 0 skips it",
    )
    p.add_argument(
        "--sync-every",
        type=float,
        default=1.0,
        help="publish ampsync.sync this often, as beat would (0: only once)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds a drain may take at most")
    p.add_argument(
        "--profile",
        action="store_true",
        help="record the worker (and emulator) with py-spy; summary in the output",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for the worker, e.g. AMPSYNC_MAX_QUEUED_BATCHES=16",
    )
    p.add_argument("--redis-url", default=DEFAULT_REDIS, help="broker and result backend (flushed)")
    p.add_argument("--pg-url", default=os.environ.get("AMPSYNC_BENCH_PG", DEFAULT_PG))
    p.add_argument(
        "--analyze",
        action="store_true",
        help="ANALYZE the table after loading, as autovacuum would soon after a bulk "
        "insert: statistics then say every row is pending (see README)",
    )
    p.add_argument("--keep", action="store_true", help="keep the tables (default: dropped)")
    p.add_argument(
        "--faults",
        type=fault_rates,
        default=None,
        metavar="BEFORE,AFTER",
        help="also drain with the emulator failing BEFORE of requests with a 5xx before "
        "ingesting them and AFTER with a 500 after, e.g. 0.2,0.1; clean and faulty alternate",
    )
    p.add_argument(
        "--code",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="also run the worker from this checkout (e.g. a git worktree of HEAD); repeatable",
    )
    return p.parse_args(argv)


def fault_rates(text: str) -> tuple[float, float]:
    """'0.2,0.1' -> (0.2, 0.1): the shares of requests failing before and after ingest."""
    try:
        before, after = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--faults wants two shares BEFORE,AFTER such as 0.2,0.1, not {text!r}"
        ) from None
    if not (0 <= before < 1 and 0 <= after < 1):
        raise argparse.ArgumentTypeError(f"--faults shares must be in [0, 1): {text!r}")
    return before, after


@dataclass(frozen=True)
class Condition:
    """What one drain runs: which checkout's worker, and the emulator's fault rates."""

    code: Path
    label: str  # the code, as `git_state` names it
    faults: tuple[float, float] = (0.0, 0.0)

    @property
    def mode(self) -> str:
        return "faulty" if any(self.faults) else "clean"

    @property
    def name(self) -> str:
        return f"{self.label}, {self.mode}"


def conditions(args) -> list[Condition]:
    codes = [harness.ROOT, *(c.resolve() for c in args.code)]
    out = []
    for code in codes:
        # The commit, and only whether tasks/ had changes: the list is in the header.
        state = harness.git_state(code)
        label = state.split(" + ")[0] + (" + uncommitted changes" if " + " in state else "")
        if state.startswith("unknown"):  # a copy outside git: its folder names it
            label = code.name
        out.append(Condition(code, label))
        if args.faults:
            out.append(Condition(code, label, args.faults))
    return out


# --- one run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    rows: int
    sent: int
    failed: int
    drain_seconds: float
    first_ack_seconds: float
    steady_rps: float
    drain_rps: float
    api_requests: dict[str, int]
    rows_per_request: float
    http_in_flight: float
    busy: float  # share of pool process-time spent running tasks
    stage_p50: dict[str, float]
    stage_p95: dict[str, float]
    syncs: int
    sync_p50: float  # seconds a sync task ran
    sync_p95: float
    syncs_running: float  # sync tasks running at once, mean (each holds a pool process)
    batches: int
    queue_empty: float  # share of samples with no send task waiting in the broker
    queue_mean: float  # send tasks waiting in the broker, mean of samples
    held_mean: float  # tasks delivered to the worker and not yet acknowledged, mean of samples
    rss_main_mb: float
    rss_pool_mb: float
    rss_emulator_mb: float
    cpu_cores: dict[str, float]  # CPU seconds per wall second, per stage
    cpu_seconds: dict[str, float]  # CPU seconds per stage over the run
    task_errors: list[str] = field(default_factory=list)
    condition: str = ""
    baseline_rps: float | None = None
    baseline_rows: int = 0
    baseline_not_ok: int = 0
    profile: dict = field(default_factory=dict)


# Per benchmark process: several benchmarks may share one PostgreSQL server.
WORKER_APP = f"ampsync-bench-{os.getpid()}-worker"


def database_url(args, folder: Path, application: str = "ampsync-bench") -> str:
    """The database URL; on PostgreSQL tagged with an application_name, so the worker's own
    backends can be told from everyone else's on a shared server."""
    if args.db == "postgresql":
        from sqlalchemy.engine import make_url

        url = make_url(args.pg_url).update_query_dict({"application_name": application})
        return url.render_as_string(hide_password=False)
    return f"sqlite:///{folder / 'queue.db'}"


def backend_pids(engine):
    from sqlalchemy import text

    def pids() -> set[int]:
        with engine.connect() as conn:
            return set(
                conn.execute(
                    text("SELECT pid FROM pg_stat_activity WHERE application_name = :a"),
                    {"a": WORKER_APP},
                ).scalars()
            )

    return pids


def create_table(engine, args, rows: int) -> tuple[str, int]:
    """A fresh queue table holding --preload-sent sent rows, then `rows` pending rows;
    returns its name and the first pending id."""
    from sqlalchemy import func, select

    from tasks.db import schema, setup

    name = f"bench_{uuid.uuid4().hex[:10]}"
    tables = schema.define_tables(name)
    setup.init_db(engine, tables)
    if args.preload_sent:
        long_ago = datetime.utcnow() - timedelta(days=1)
        harness.bulk_insert(
            engine, name, harness.generate(args.kind, 10**9, args.preload_sent, sent_at=long_ago)
        )
    harness.bulk_insert(engine, name, harness.generate(args.kind, 0, rows))
    if args.analyze:
        harness.analyze(engine, name)
    q = tables.queue
    with engine.connect() as conn:
        first = conn.execute(select(func.min(q.c.id)).where(q.c.status == "pending")).scalar_one()
    return name, first


def drop_table(engine, name: str) -> None:
    from tasks.db import schema

    tables = schema.define_tables(name)
    with engine.begin() as conn:
        for t in reversed(tables.metadata.sorted_tables):
            t.drop(conn, checkfirst=True)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def timeline(engine, name: str, first_id: int) -> list[tuple[datetime, int]]:
    """(ack time, rows) for every acknowledgement, from the rows' sent_at (database clock)."""
    from sqlalchemy import func, select

    from tasks.db import schema

    q = schema.define_tables(name).queue
    with engine.connect() as conn:
        return [
            (_as_dt(t), n)
            for t, n in conn.execute(
                select(q.c.sent_at, func.count())
                .where(q.c.id >= first_id, q.c.status == "sent")
                .group_by(q.c.sent_at)
                .order_by(q.c.sent_at)
            )
        ]


def _as_dt(value) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def rates(
    points: list[tuple[datetime, int]], started: datetime
) -> tuple[float, float, float, float]:
    """(steady rows/s over the middle 80% of rows, drain rows/s from the first sync to the
    last ack, drain seconds, seconds to the first ack)."""
    total = sum(n for _, n in points)
    if not total:
        return 0.0, 0.0, 0.0, 0.0
    last = points[-1][0]
    drain = max(1e-6, (last - started).total_seconds())
    cum, marks = 0, {}
    for t, n in points:
        cum += n
        for share in (0.1, 0.9):
            if share not in marks and cum >= share * total:
                marks[share] = (t, cum)
    (t10, c10), (t90, c90) = marks[0.1], marks[0.9]
    span = (t90 - t10).total_seconds()
    steady = (c90 - c10) / span if span > 0 and c90 > c10 else total / drain
    return steady, total / drain, drain, (points[0][0] - started).total_seconds()


def worker_env(args, url: str, table: str, emulator_url: str) -> dict[str, str]:
    env = {
        "AMPSYNC_DATABASE_URL": url,
        "AMPSYNC_QUEUE_TABLE": table,
        "AMPLITUDE_API_KEY": harness.API_KEY,
        "AMPLITUDE_SERVER_URL": emulator_url,
        "CELERY_BROKER_URL": args.redis_url,
        "AMPSYNC_EVENTS_PER_SECOND": "0",  # a Growth/Enterprise project: no cap
        "AMPSYNC_LEASE_SECONDS": "300",
        "AMPSYNC_SYNC_INTERVAL": "3600",  # no beat runs; the benchmark publishes syncs
    }
    if args.batch_size:
        env["AMPSYNC_BATCH_SIZE"] = str(args.batch_size)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def run_pipeline(
    args,
    emulator: harness.EmulatorProcess,
    repeat: int,
    out: Path,
    cond: Condition | None = None,
    tag: str = "",
) -> RunResult:
    from sqlalchemy import func, select

    from tasks import sync
    from tasks.broker import redis_client
    from tasks.db import engine as db_engine
    from tasks.db import schema, sql
    from tasks.worker.app import SEND_QUEUE

    url = database_url(args, out)
    engine = db_engine.make_engine(url)
    print(
        f"[run {repeat}] loading {args.rows:,} {args.kind} rows"
        + (f" after {args.preload_sent:,} sent rows" if args.preload_sent else ""),
        flush=True,
    )
    t = time.monotonic()
    name, first_id = create_table(engine, args, args.rows)
    print(f"[run {repeat}] loaded into {name} in {time.monotonic() - t:.1f} s", flush=True)
    redis = redis_client(args.redis_url)
    redis.flushdb()
    emulator.reset()
    cond = cond or Condition(harness.ROOT, "")
    before_rate, after_rate = cond.faults
    # Seeded per repeat: the faulty drains of every code meet the same sequence of faults.
    emulator.set_faults(fail_before_rate=before_rate, fail_after_rate=after_rate, seed=repeat)
    worker_url = database_url(args, out, WORKER_APP)
    worker = harness.WorkerProcess(
        worker_env(args, worker_url, name, emulator.url),
        args.concurrency,
        out / f"worker-{repeat}{tag}.log",
        code=cond.code,
    )
    worker.start()
    assert worker.proc
    sampler = harness.Sampler(
        worker.proc.pid,
        emulator.proc.pid,
        redis,
        SEND_QUEUE,
        backend_pids(engine) if args.db == "postgresql" else None,
    )
    spies = start_profilers(args, worker, emulator, out, repeat)
    q = schema.define_tables(name).queue
    # Whether any row is open, not how many: a count(*) of 1M rows every 0.25 s would cost
    # the database a good share of a core and hold snapshots that slow pruning.
    is_open = select(q.c.id).where(q.c.status.in_(["pending", "in_flight"])).limit(1)
    try:
        before = emulator.counts()
        with engine.connect() as conn:
            started = _as_dt(conn.execute(select(sql.utcnow())).scalar_one())
        sampler.start()
        sync.delay()
        t0 = time.monotonic()
        next_sync = t0 + args.sync_every if args.sync_every else float("inf")
        still_open = True
        while still_open:
            time.sleep(0.25)
            now = time.monotonic()
            if now >= next_sync:
                sync.delay()
                next_sync = now + args.sync_every
            if now - t0 > args.timeout:
                raise SystemExit(
                    f"not drained after {args.timeout:g} s; worker log {worker.log_path}"
                )
            with engine.connect() as conn:
                still_open = conn.execute(is_open).first() is not None
        sampler.stop()
        profile = stop_profilers(spies)
        after = emulator.counts()
    except BaseException:
        worker.stop()
        if not args.keep:
            drop_table(engine, name)
        raise
    finally:
        if sampler.started and not sampler.stopped:
            sampler.stop()
        stop_profilers(spies)
        worker.stop()
    results = harness.task_results(redis)
    runtimes, errors = harness.task_runtimes(worker.log_path)
    sends = [r for r in results.values() if "token" in r]
    sync_runs = runtimes.get("ampsync.sync", {})
    send_runs = runtimes.get("ampsync.send_batch", {})
    points = timeline(engine, name, first_id)
    with engine.connect() as conn:
        failed = conn.execute(
            select(func.count()).where(q.c.id >= first_id, q.c.status == "failed")
        ).scalar_one()
    steady, drain_rps, drain, first_ack = rates(points, started)
    sent = sum(n for _, n in points)
    api = harness.requests_sent(before, after)
    n_requests = sum(api.values())
    # Claim time per batch: a sync is a sweep, pause checks and one claim per batch it enqueues
    # (plus one empty claim per kind at the end); its runtime over its batches.
    claims = [
        seconds / results[tid]["batches_enqueued"]
        for tid, seconds in sync_runs.items()
        if results.get(tid, {}).get("batches_enqueued")
    ]
    per_stage = {"claim": claims}
    for stage in STAGES[1:]:
        per_stage[stage] = [r["seconds"][stage] for r in sends if r.get("seconds")]
    cpu = sampler.cpu_seconds()
    wall = max(1e-6, sampler.stopped - sampler.started)
    busy_seconds = sum(send_runs.values()) + sum(sync_runs.values())
    main_rss, pool_rss = sampler.worker_rss()
    if not args.keep:
        drop_table(engine, name)
    engine.dispose()
    redis.close()
    return RunResult(
        rows=args.rows,
        sent=sent,
        failed=failed,
        drain_seconds=drain,
        first_ack_seconds=first_ack,
        steady_rps=steady,
        drain_rps=drain_rps,
        api_requests=api,
        rows_per_request=sent / n_requests if n_requests else 0.0,
        http_in_flight=sum(per_stage["http"]) / drain,
        busy=busy_seconds / (args.concurrency * drain),
        stage_p50={s: percentile(v, 50) for s, v in per_stage.items()},
        stage_p95={s: percentile(v, 95) for s, v in per_stage.items()},
        syncs=len(sync_runs),
        batches=len(sends),
        sync_p50=percentile(list(sync_runs.values()), 50),
        sync_p95=percentile(list(sync_runs.values()), 95),
        syncs_running=sum(sync_runs.values()) / drain,
        queue_empty=(
            sum(1 for d in sampler.queue_depth if d == 0) / len(sampler.queue_depth)
            if sampler.queue_depth
            else float("nan")
        ),
        queue_mean=_mean(sampler.queue_depth),
        held_mean=_mean(sampler.held),
        rss_main_mb=main_rss / 2**20,
        rss_pool_mb=pool_rss / 2**20,
        rss_emulator_mb=sampler.emulator_rss / 2**20,
        cpu_cores={k: v / wall for k, v in cpu.items()},
        cpu_seconds=cpu,
        profile=profile,
        task_errors=errors,
        condition=cond.name,
    )


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_baseline(args, emulator: harness.EmulatorProcess, repeat: int, out: Path) -> tuple:
    import baseline

    from tasks.db import engine as db_engine

    url = database_url(args, out)
    engine = db_engine.make_engine(url)
    # The seed loop gets through a few hundred rows a second at best: load what it can reach.
    rows = min(args.rows, int(args.baseline_seconds * 2000) + 1000)
    name, _ = create_table(engine, args, rows)
    emulator.reset()
    result = baseline.run(engine, name, emulator.url, harness.API_KEY, args.baseline_seconds)
    if not args.keep:
        drop_table(engine, name)
    engine.dispose()
    print(
        f"[run {repeat}] baseline: {result.rows:,} rows in {result.seconds:.1f} s = "
        f"{result.rows_per_second:,.0f} rows/s",
        flush=True,
    )
    return result


# --- profiling -----------------------------------------------------------------------------------


def start_profilers(args, worker, emulator, out: Path, repeat: int) -> list[tuple]:
    if not args.profile:
        return []
    spies = []
    # The worker tree with --idle: wall time, including waits on the database, on Amplitude
    # and for the next task. The emulator without: where its CPU goes.
    for label, pid, extra in (
        ("worker", worker.proc.pid, ["--subprocesses", "--idle"]),
        ("emulator", emulator.proc.pid, []),
    ):
        path = out / f"profile-{label}-{repeat}.txt"
        cmd = [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--rate",
            "50",
            "--nonblocking",
            "--format",
            "raw",
            "-o",
            str(path),
            *extra,
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        spies.append((label, proc, path))
    time.sleep(1)  # py-spy attaches before the clock starts
    return spies


def stop_profilers(spies: list[tuple]) -> dict:
    import profiles

    summary = {}
    for label, proc, path in spies:
        if proc.poll() is None:
            proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if path.exists() and label not in summary:
            summary[label] = profiles.summarize(path, worker=label == "worker")
    spies.clear()
    return summary


# --- report --------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 0) -> str:
    if value != value:
        return "–"
    return f"{value:,.{digits}f}"


def comparison(
    args, argv: list[str], facts: dict, conds: list[Condition], runs: list[RunResult]
) -> str:
    """One line per condition: the steady rate of each run, the median, and for a faulty
    condition the ratio to the clean one of the same code (median of the per-repeat ratios,
    each faulty run against the clean run of its own repeat)."""
    lines = [f"## `{command_line(argv)}`", "", "| machine | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    lines += [
        "",
        "| code | emulator | rows/s steady (runs) | median | faulty ÷ clean (per repeat) "
        "| median ratio | drain s (median) | API requests (failed) | rows failed |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | --- | ---: |",
    ]
    by = {c.name: [r for r in runs if r.condition == c.name] for c in conds}
    for c in conds:
        mine = by[c.name]
        steady = [r.steady_rps for r in mine]
        ratios: list[float] = []
        if c.mode == "faulty":
            clean = by[Condition(c.code, c.label).name]
            ratios = [
                f.steady_rps / k.steady_rps
                for f, k in zip(mine, clean, strict=False)
                if k.steady_rps
            ]
        faults = (
            "clean" if c.mode == "clean" else "5xx {:.0%} before, {:.0%} after".format(*c.faults)
        )
        requests_ = [sum(r.api_requests.values()) for r in mine]
        failed_requests = [
            sum(n for k, n in r.api_requests.items() if not k.endswith(" 200")) for r in mine
        ]
        lines.append(
            f"| {c.label} | {faults} | {' · '.join(fmt(v) for v in steady)} | "
            f"**{fmt(median(steady))}** | {' · '.join(fmt(v, 2) for v in ratios) or '–'} | "
            f"{'**' + fmt(median(ratios), 2) + '**' if ratios else '–'} | "
            f"{fmt(median([r.drain_seconds for r in mine]), 1)} | "
            f"{fmt(median(requests_))} ({fmt(median(failed_requests))}) | "
            f"{sum(r.failed for r in mine)} |"
        )
    return "\n".join(lines)


def report(
    args,
    argv: list[str],
    facts: dict,
    runs: list[RunResult],
    out: Path,
    title: str = "",
) -> str:
    lines = [f"## `{command_line(argv)}`" if not title else f"### {title}", ""]
    if facts:
        lines += ["| machine | |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in facts.items()]
    setup = (
        f"rows {args.rows:,} {args.kind} on {args.db}, emulator latency "
        f"{args.latency_ms:g} ms, concurrency {args.concurrency}, batch size "
        f"{args.batch_size or 2000}, preloaded sent rows {args.preload_sent:,}, "
        f"sync every {args.sync_every:g} s, ANALYZE after loading: "
        f"{'yes' if args.analyze else 'no'}"
    )
    lines += ["", setup + (f", env {' '.join(args.env)}" if args.env else ""), ""]
    head = "| metric | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | median |"
    lines += [head, "|---" * (len(runs) + 2) + "|"]

    def row(name: str, values: list[float], digits: int = 0) -> None:
        lines.append(
            f"| {name} | "
            + " | ".join(fmt(v, digits) for v in values)
            + f" | **{fmt(median(values), digits)}** |"
        )

    row("rows/s steady (middle 80% of rows)", [r.steady_rps for r in runs])
    row("rows/s drain (first sync → last ack)", [r.drain_rps for r in runs])
    row("drain seconds", [r.drain_seconds for r in runs], 2)
    row("seconds to first ack", [r.first_ack_seconds for r in runs], 2)
    row("rows sent", [r.sent for r in runs])
    row("failed rows", [r.failed for r in runs])
    row("task errors (see the worker log)", [len(r.task_errors) for r in runs])
    row("API requests", [sum(r.api_requests.values()) for r in runs])
    row("rows per request", [r.rows_per_request for r in runs], 1)
    row("HTTP requests in flight (mean)", [r.http_in_flight for r in runs], 2)
    row("pool busy running tasks (%)", [100 * r.busy for r in runs])
    row("send tasks waiting in the broker (mean)", [r.queue_mean for r in runs], 1)
    row("broker send queue empty (% of samples)", [100 * r.queue_empty for r in runs])
    row("tasks held by the worker, reserved or running (mean)", [r.held_mean for r in runs], 1)
    row("syncs run", [r.syncs for r in runs])
    row("sync task seconds p50", [r.sync_p50 for r in runs], 2)
    row("sync task seconds p95", [r.sync_p95 for r in runs], 2)
    row(
        "sync tasks running at once (mean; each holds a pool process)",
        [r.syncs_running for r in runs],
        2,
    )
    row("send batches", [r.batches for r in runs])
    for stage in STAGES:
        row(f"{stage} ms per batch p50", [1000 * r.stage_p50[stage] for r in runs], 1)
        row(f"{stage} ms per batch p95", [1000 * r.stage_p95[stage] for r in runs], 1)
    row("peak RSS worker main process (MB)", [r.rss_main_mb for r in runs], 1)
    row("peak RSS largest pool process (MB)", [r.rss_pool_mb for r in runs], 1)
    row("peak RSS emulator (MB)", [r.rss_emulator_mb for r in runs], 1)
    stages = [
        "worker",
        "database",
        "database background",
        "broker",
        "emulator",
        "bench",
        "other processes",
        "machine (all processes)",
    ]
    for stage in stages:
        if any(stage in r.cpu_cores for r in runs):
            unit = "share of all cores, %" if stage.startswith("machine") else "cores"
            scale = 100 if stage.startswith("machine") else 1
            row(
                f"CPU {stage} ({unit})",
                [scale * r.cpu_cores.get(stage, float("nan")) for r in runs],
                2,
            )
    # CPU per row does not depend on how busy the machine is; it bounds what 2 cores can do.
    pipeline = ("worker", "database", "database background", "broker")
    for stage in ("worker", "worker main process", *pipeline[1:], "emulator"):
        if any(stage in r.cpu_seconds for r in runs):
            row(
                f"CPU ms per 1000 rows: {stage}",
                [1e6 * r.cpu_seconds.get(stage, float("nan")) / max(1, r.sent) for r in runs],
                1,
            )
    cores = os.cpu_count() or 1

    def ceiling(r: RunResult, stages: tuple[str, ...]) -> float:
        per_row = sum(r.cpu_seconds.get(s, 0.0) for s in stages) / max(1, r.sent)
        return cores / per_row if per_row else float("nan")

    row(
        f"CPU-bound ceiling rows/s ({cores} cores ÷ CPU per row of worker, database, broker)",
        [ceiling(r, pipeline) for r in runs],
    )
    row(
        "… the same, counting the emulator's CPU too (it shares the cores here)",
        [ceiling(r, (*pipeline, "emulator")) for r in runs],
    )
    if any(r.baseline_rps is not None for r in runs):
        row("baseline rows/s (seed-style loop)", [r.baseline_rps or float("nan") for r in runs], 1)
        row("baseline rows done in budget", [r.baseline_rows for r in runs])
        row(
            "ratio steady / baseline",
            [r.steady_rps / r.baseline_rps if r.baseline_rps else float("nan") for r in runs],
            1,
        )
        row(
            "ratio drain / baseline",
            [r.drain_rps / r.baseline_rps if r.baseline_rps else float("nan") for r in runs],
            1,
        )
    paths = sorted({k for r in runs for k in r.api_requests})
    lines += [
        "",
        "API requests by path and status: "
        + "; ".join(
            f"{p}: " + "/".join(str(r.api_requests.get(p, 0)) for r in runs) for p in paths
        ),
    ]
    errors = sorted({e for r in runs for e in r.task_errors})
    if errors:
        lines += ["", "task errors: " + "; ".join(errors[:5])]
    for r in runs[:1]:
        for label, summary in r.profile.items():
            lines += ["", f"### py-spy profile of the {label} (run 1)", "", summary]
    lines += ["", f"raw results: {out.relative_to(harness.ROOT)}/results.json"]
    return "\n".join(lines)


def command_line(argv: list[str]) -> str:
    return "python bench/run.py " + " ".join(shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = harness.run_dir(f"{args.kind}-{args.db}-{args.rows}")
    # The benchmark publishes syncs on the worker's broker; settings are read at import.
    os.environ["CELERY_BROKER_URL"] = args.redis_url
    os.environ["AMPLITUDE_API_KEY"] = harness.API_KEY
    facts = harness.machine_facts(database_url(args, out))
    emulator = harness.EmulatorProcess(args.latency_ms, out)
    emulator.start()
    facts["emulator"] = " ".join(emulator.command[1:])
    runs: list[RunResult] = []
    conds = conditions(args)
    compare = len(conds) > 1
    try:
        for i in range(1, args.repeat + 1):
            order = conds if i % 2 else conds[::-1]
            for cond in order:
                tag = f"-{conds.index(cond) + 1}" if compare else ""
                result = run_pipeline(args, emulator, i, out, cond if compare else None, tag)
                print(
                    f"[run {i}] pipeline{' (' + cond.name + ')' if compare else ''}: "
                    f"{result.sent:,} rows, steady {result.steady_rps:,.0f} "
                    f"rows/s, drain {result.drain_rps:,.0f} rows/s in {result.drain_seconds:.1f} s",
                    flush=True,
                )
                if args.baseline_seconds > 0 and cond is conds[0]:
                    b = run_baseline(args, emulator, i, out)
                    result.baseline_rps = b.rows_per_second
                    result.baseline_rows = b.rows
                    result.baseline_not_ok = b.not_ok
                runs.append(result)
                (out / "results.json").write_text(
                    json.dumps(
                        {
                            "command": command_line(argv),
                            "facts": facts,
                            "runs": [r.__dict__ for r in runs],
                        },
                        indent=2,
                        default=str,
                    )
                )
    finally:
        emulator.stop()
    if compare:
        text = "\n\n".join(
            [comparison(args, argv, facts, conds, runs)]
            + [
                report(args, argv, {}, [r for r in runs if r.condition == c.name], out, c.name)
                for c in conds
            ]
        )
    else:
        text = report(args, argv, facts, runs, out)
    (out / "report.md").write_text(text + "\n")
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
