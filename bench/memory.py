"""Peak memory of one send of big rows: a claim bounded by count only, against one bounded by
the byte budget too (issue 15, point 7).

    python bench/memory.py --rows 120 --row-mb 1 --repeat 3

Inserts `--rows` event rows whose properties are `--row-mb` MB of JSON each into a fresh
PostgreSQL queue table, then, `--repeat` times and alternating, runs one claim and its send in
a fresh Python process, exactly as a send task runs it (`queue.claim`, then `Pipeline.send`:
load, build, HTTP to the emulator, acknowledge), without Celery:

- `count only`: the claim takes up to 2,000 rows whatever their size (the code before issue
  15: every claimed row was loaded at once);
- `byte budget`: the claim stops at `queue.CLAIM_BYTES` of stored JSON, as syncs now claim.

Each process prints its peak RSS (getrusage's ru_maxrss) and its RSS just before the send; the
run prints the medians of both variants and their ratio. The rows are put back to pending
between runs. The emulator runs in its own process and keeps no event list.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import harness  # noqa: E402
from run import drop_table  # noqa: E402

# One claim and its send, in a process of its own so that its peak RSS is the send's.
CHILD = """
import json, resource, sys
from tasks.db import queue
from tasks.delivery.pipeline import Pipeline
from tasks.settings import Settings

args = json.loads(sys.argv[1])
pipeline = Pipeline(Settings(**args["settings"]))
with pipeline.engine.connect() as conn:
    claim = queue.claim(
        conn, pipeline.tables, "event", 2000, 300, budget_bytes=args["budget"]
    )
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = pipeline.send("event", claim.token)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": claim.rows, "sent": result.sent, "before_kb": before, "peak_kb": peak}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=120)
    p.add_argument("--row-mb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    args = p.parse_args(argv)

    from sqlalchemy import update

    from tasks.db import engine as db_engine
    from tasks.db import queue, schema, setup

    print(json.dumps(harness.machine_facts(args.pg_url), indent=2), flush=True)
    emulator = harness.EmulatorProcess(latency_ms=0, log_dir=Path(tempfile.mkdtemp()))
    emulator.start()
    name = f"bench_memory_{time.time_ns() % 10**10}"
    tables = schema.define_tables(name)
    engine = db_engine.make_engine(args.pg_url)
    setup.init_db(engine, tables)
    settings = {
        "AMPSYNC_DATABASE_URL": args.pg_url,
        "AMPSYNC_QUEUE_TABLE": name,
        "AMPLITUDE_API_KEY": harness.API_KEY,
        "AMPLITUDE_SERVER_URL": emulator.url,
        "AMPSYNC_EVENTS_PER_SECOND": "0",
        "CELERY_BROKER_URL": args.redis_url,
    }
    variants = {"count only": 10**15, "byte budget": queue.CLAIM_BYTES}
    results: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        # Many small values: the shape of a wide CRM export, and what costs memory once
        # parsed; within Amplitude's limits (1,000 keys, strings under 1,024 characters).
        per_key = max(1, int(args.row_mb * 1_000_000 / 1000 / 30))
        props = json.dumps(
            {
                f"attribute_{k:04d}": [f"value {k:04d}-{v:012d}" for v in range(per_key)]
                for k in range(1000)
            }
        )
        with engine.begin() as conn:
            queue.insert_rows(
                conn,
                tables,
                [
                    {
                        "kind": "event",
                        "user_id": f"user-{i:06d}",
                        "event_type": "Big Export",
                        "properties": props,
                    }
                    for i in range(args.rows)
                ],
            )
        print(f"{args.rows} rows of {len(props) / 1e6:.2f} MB of JSON each", flush=True)
        for _ in range(args.repeat):
            for variant, budget in variants.items():
                with engine.begin() as conn:
                    conn.execute(
                        update(tables.queue).values(
                            status="pending", claim_token=None, locked_until=None, attempts=0
                        )
                    )
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        json.dumps({"settings": settings, "budget": budget}),
                    ],
                    cwd=BENCH.parent,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                one = json.loads(out.stdout.strip().splitlines()[-1])
                results[variant].append(one)
                print(
                    f"{variant:12}: {one['rows']:5} rows claimed, {one['sent']:5} sent, "
                    f"peak RSS {one['peak_kb'] / 1024:7.1f} MB "
                    f"(before the send {one['before_kb'] / 1024:6.1f} MB)",
                    flush=True,
                )
    finally:
        drop_table(engine, name)
        engine.dispose()
        emulator.stop()
    peak = {v: statistics.median(r["peak_kb"] for r in rs) / 1024 for v, rs in results.items()}
    grown = {
        v: statistics.median((r["peak_kb"] - r["before_kb"]) for r in rs) / 1024
        for v, rs in results.items()
    }
    for v in variants:
        print(f"median {v:12}: peak {peak[v]:7.1f} MB, grown by the send {grown[v]:7.1f} MB")
    print(
        f"byte budget / count only: peak {peak['byte budget'] / peak['count only']:.2f}, "
        f"growth {grown['byte budget'] / grown['count only']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
