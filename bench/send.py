"""Python CPU of one send task's work per row, in this process, against the emulator.

    python bench/send.py --kind identify --batches 10 --repeat 3

Loads (batches + 1) × 2000 rows into a fresh PostgreSQL queue table, claims them with
`Pipeline.sync`, sends one batch to warm up, then times `Pipeline.send` — load, build, HTTP,
acknowledge, exactly as a send task runs it, without Celery — on `--batches` batches, and
prints the process CPU per row (user + system) of each repeat and their median. The emulator
answers at once, in its own process, so its CPU is not counted. For quick, low-noise
comparisons of Python changes: run it for the old and the new code in turn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import harness  # noqa: E402
from run import drop_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kind", choices=["identify", "event"], default="identify")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    p.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/13",
        help="for the claim floor; the keys are named after the random table",
    )
    args = p.parse_args(argv)

    from tasks.db import setup
    from tasks.delivery.pipeline import Pipeline
    from tasks.settings import Settings

    emulator = harness.EmulatorProcess(latency_ms=0, log_dir=Path(tempfile.mkdtemp()))
    emulator.start()
    per_row = []
    try:
        for _ in range(args.repeat):
            name = f"bench_send_{time.time_ns() % 10**10}"
            settings = Settings(
                AMPSYNC_DATABASE_URL=args.pg_url,
                AMPSYNC_QUEUE_TABLE=name,
                AMPLITUDE_API_KEY=harness.API_KEY,
                AMPLITUDE_SERVER_URL=emulator.url,
                AMPSYNC_EVENTS_PER_SECOND="0",
                CELERY_BROKER_URL=args.redis_url,
            )
            pipeline = Pipeline(settings)
            setup.init_db(pipeline.engine, pipeline.tables)
            try:
                harness.bulk_insert(
                    pipeline.engine, name, harness.generate(args.kind, 0, 2000 * (args.batches + 1))
                )
                tokens: list[str] = []
                while len(tokens) < args.batches + 1:
                    before = len(tokens)
                    pipeline.sync([args.kind], lambda _k, token, _r, t=tokens: t.append(token), 0)
                    if len(tokens) == before:
                        raise RuntimeError("the sync claimed nothing")
                pipeline.send(args.kind, tokens.pop())  # warm-up: connections, caches
                started = time.process_time()
                for token in tokens[: args.batches]:
                    result = pipeline.send(args.kind, token)
                    if result.sent != result.claimed:
                        raise RuntimeError(f"batch not all sent: {result}")
                used = time.process_time() - started
                per_row.append(used / (2000 * args.batches) * 1e6)
                print(f"{args.kind}: {per_row[-1]:.1f} µs of Python CPU per row", flush=True)
            finally:
                drop_table(pipeline.engine, name)
                pipeline.engine.dispose()
    finally:
        emulator.stop()
    print(f"median of {len(per_row)}: {statistics.median(per_row):.1f} µs per row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
