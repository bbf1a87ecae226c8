"""Benchmark: a drain from a flaky Amplitude against a clean one, in the same invocation (issue 13).

    python bench/flaky.py --rows 5000 --batch-size 200 --repeat 3

Per repeat, two drains of the same workload, clean first, then with the emulator failing
--fail-before of requests before ingesting them and --fail-after after (5xx): a fresh queue
table on PostgreSQL, a real Celery worker (--concurrency) on real Redis, the emulator in this
process, and syncs every 0.3 s until no row is pending or in flight. The workload is the
reliability suite's (`tests/support/reliability.py`): per-user sequences of identify rows that
`$add` and `$append` (a double application or a reordering shows) interleaved with events, over
--users users. Each drain is audited from both ends: rows lost, rows applied twice, users out
of order. The worker runs with the production defaults for backoff and pauses, not the tests'
fast clocks. `--code DIR` runs the worker from another checkout (a `git worktree` of an older
commit) to compare before and after. Prints a Markdown table with medians; see README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH), str(BENCH.parent / "tests")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--fail-before", type=float, default=0.2, help="5xx before ingest")
    p.add_argument("--fail-after", type=float, default=0.1, help="500 after ingest")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--code", default=None, help="run the worker from this checkout")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/13", help="flushed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["AMPSYNC_TEST_REDIS"] = args.redis_url
    import harness
    import support
    from support.reliability import Workload, audit, production_delivery

    from ampsync_emulator import Emulator

    if args.code:  # the worker's working directory decides which `tasks` Celery imports
        support.ROOT = Path(args.code).resolve()
    emulator = Emulator(api_keys={support.API_KEY})
    url = emulator.start()
    facts = harness.machine_facts(support.PG_URL)
    runs: list[dict] = []
    try:
        for repeat in range(1, args.repeat + 1):
            run = {}
            for mode in ("clean", "flaky"):
                support.stop_running_workers()
                support.flush_redis()
                emulator.reset()
                emulator.set_faults(**support.DEFAULT_FAULTS)
                # the settings a user runs with: the target is about them
                env = {**production_delivery(), "AMPSYNC_BATCH_SIZE": str(args.batch_size)}
                if args.code:
                    env["PYTHONPATH"] = str(support.ROOT)
                stack = support.new_stack((emulator, url), support.PG_URL, env)
                support.RUNNING.append(stack)
                try:
                    work = Workload(users=args.users)
                    work.insert(stack, args.rows)
                    if mode == "flaky":
                        emulator.set_faults(
                            fail_before_rate=args.fail_before,
                            fail_after_rate=args.fail_after,
                            seed=repeat,
                        )
                    stack.start_worker(concurrency=args.concurrency)
                    t0 = time.monotonic()
                    stack.drain(timeout=args.timeout)
                    seconds = time.monotonic() - t0
                    state = stack.state()
                    result = audit(stack, work)
                    failing = sum(
                        n
                        for per in state["counts"]["requests"].values()
                        for code, n in per.items()
                        if code != "200"
                    )
                    requests = sum(
                        n for per in state["counts"]["requests"].values() for n in per.values()
                    )
                    run[mode] = {
                        "seconds": seconds,
                        "rows_per_s": args.rows / seconds,
                        "requests": requests,
                        "failed_requests": failing,
                        "lost": result.lost,
                        "duplicated": result.duplicated,
                        "out_of_order": len(result.out_of_order_users),
                    }
                    print(f"[run {repeat}] {mode}: {run[mode]}", flush=True)
                finally:
                    support.RUNNING.remove(stack)
                    support.drop_stack(stack)
            runs.append(run)
    finally:
        support.stop_running_workers()
        emulator.stop()
    print(report(args, facts, runs))
    return 0


def report(args: argparse.Namespace, facts: dict, runs: list[dict]) -> str:
    lines = [
        f"`python bench/flaky.py {' '.join(sys.argv[1:])}`",
        "",
        "machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()),
        "",
        "| run | clean s | flaky s | flaky ÷ clean rows/s | bound 3×clean+30 s | within | "
        "requests clean / flaky (failed) | lost | duplicated | out of order |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    ratios, flaky_s, clean_s = [], [], []
    for n, r in enumerate(runs, 1):
        c, f = r["clean"], r["flaky"]
        ratio = f["rows_per_s"] / c["rows_per_s"]
        bound = 3 * c["seconds"] + 30
        ratios.append(ratio)
        flaky_s.append(f["seconds"])
        clean_s.append(c["seconds"])
        lines.append(
            f"| {n} | {c['seconds']:.1f} | {f['seconds']:.1f} | {ratio:.2f} | {bound:.0f} | "
            f"{'yes' if f['seconds'] <= bound else 'NO'} | {c['requests']} / "
            f"{f['requests']} ({f['failed_requests']}) | {c['lost'] + f['lost']} | "
            f"{c['duplicated'] + f['duplicated']} | {c['out_of_order'] + f['out_of_order']} |"
        )
    lines.append(
        f"| median | {statistics.median(clean_s):.1f} | {statistics.median(flaky_s):.1f} | "
        f"{statistics.median(ratios):.2f} | | | | | | |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
