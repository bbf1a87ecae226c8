"""Time each step of one batch's trip through the queue table, outside Celery.

    python bench/statements.py --rows 100k --kind identify --in-flight 8 --cycles 10

Loads N rows (as bench/run.py does), claims --in-flight batches and leaves them in flight (as
a sync ahead of busy workers does), then runs --cycles times what a sync and a send task do to
one batch — claim, renew and load, defer_out_of_order, build payloads, build the request
body, acknowledge — with the functions of tasks/db/queue.py, tasks/amplitude/payloads.py and tasks/amplitude/client.py,
on one connection. Prints, per step, the median wall time per batch and the CPU the
PostgreSQL backend and this Python process spent per row. For quick iterations on SQL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import harness  # noqa: E402
from run import count, create_table, database_url, drop_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=count, default=100_000)
    p.add_argument("--kind", choices=["identify", "event"], default="identify")
    p.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    p.add_argument("--in-flight", type=int, default=8, help="batches left in flight first")
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument(
        "--done-first",
        type=count,
        default=0,
        help="claim and acknowledge this many rows before timing (a drain under way)",
    )
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--preload-sent", type=count, default=0)
    p.add_argument(
        "--pg-url",
        default=os.environ.get(
            "AMPSYNC_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    p.add_argument("--analyze", action="store_true", help="ANALYZE after loading (see run.py)")
    p.add_argument(
        "--claim",
        choices=["current", "keyset", "proposed"],
        default="current",
        help="current: from the oldest due row, as a beat sync's first claim; keyset: "
        "with the floor follow-up syncs keep (KeysetClaim); proposed: an "
        "earlier sketch, see proposed_claim()",
    )
    p.add_argument(
        "--overlap",
        action="store_true",
        help="hold a snapshot open on a second connection, renewed every 5 claims, "
        "as concurrent workers do (dead index entries then cannot be pruned)",
    )
    p.add_argument(
        "--skip-renew",
        action="store_true",
        help="leave out the renew UPDATE (a fresh claim needs none)",
    )
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("AMPLITUDE_API_KEY", harness.API_KEY)

    from sqlalchemy import select, text, update

    from tasks.amplitude import client as amplitude
    from tasks.amplitude import payloads
    from tasks.db import engine as db_engine
    from tasks.db import queue, schema, sql
    from tasks.delivery import policy

    out = harness.run_dir(f"statements-{args.kind}-{args.db}-{args.rows}")
    engine = db_engine.make_engine(database_url(args, out, "ampsync-bench-statements"))
    name, _ = create_table(engine, args, args.rows)
    tables = schema.define_tables(name)
    endpoint = "batch"  # the default API of every kind
    client = amplitude.Client("http://127.0.0.1:9", harness.API_KEY, 30)
    lease = 300.0
    me = psutil.Process()
    timings: dict[str, list[tuple[float, float, float]]] = {}
    with engine.connect() as conn:
        backend = None
        if args.db == "postgresql":
            backend = psutil.Process(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
            conn.commit()

        def timed(step: str, fn):
            db0 = backend.cpu_times() if backend else None
            py0 = me.cpu_times()
            t0 = time.perf_counter()
            value = fn()
            wall = time.perf_counter() - t0
            py1 = me.cpu_times()
            db1 = backend.cpu_times() if backend else None
            db = (db1.user + db1.system - db0.user - db0.system) if backend else float("nan")
            py = py1.user + py1.system - py0.user - py0.system
            timings.setdefault(step, []).append((wall, db, py))
            return value

        claim_fn = {"proposed": proposed_claim, "keyset": KeysetClaim(), "current": queue.claim}[
            args.claim
        ]
        overlap = Overlap(engine) if args.overlap else None
        drain = args.done_first // args.batch_size
        for n in range(drain):
            if overlap:
                overlap.tick()
            t0 = time.perf_counter()
            done = claim_fn(conn, tables, args.kind, args.batch_size, lease)
            if n % max(1, drain // 6) == 0 or n == drain - 1:
                print(
                    f"draining: claim after {n * args.batch_size:,} rows: "
                    f"{1000 * (time.perf_counter() - t0):.0f} ms",
                    flush=True,
                )
            with conn.begin():
                conn.execute(
                    update(tables.queue)
                    .where(tables.queue.c.claim_token == done.token)
                    .values(
                        status=sql.SENT, claim_token=None, locked_until=None, sent_at=sql.utcnow()
                    )
                )
        for _ in range(args.in_flight):
            claim_fn(conn, tables, args.kind, args.batch_size, lease)
        for _ in range(args.cycles):
            if overlap:
                overlap.tick()
            claim = timed(
                "claim", lambda: claim_fn(conn, tables, args.kind, args.batch_size, lease)
            )
            if not claim.rows:
                break
            if args.skip_renew:
                rows = timed("load", lambda c=claim: queue.load(conn, tables, c.token))
            elif hasattr(queue, "renew_and_load"):  # one UPDATE … RETURNING since 77e34d0
                rows = timed(
                    "renew + load",
                    lambda c=claim: queue.renew_and_load(
                        conn, tables, c.token, lease, policy.send_time_limit(lease)
                    ),
                )
            else:
                timed("renew", lambda c=claim: queue.renew(conn, tables, c.token, lease))
                rows = timed("load", lambda c=claim: queue.load(conn, tables, c.token))
            timed(
                "defer_out_of_order",
                lambda c=claim: queue.defer_out_of_order(conn, tables, args.kind, c.token),
            )
            with conn.begin():
                now = conn.execute(select(sql.utcnow())).scalar_one()
            builder = payloads.Builder(endpoint, 5, 86400, now)
            prepared = timed("build payloads", lambda r=rows, b=builder: b.prepare(r))
            timed("request body", lambda pr=prepared: client.body(endpoint, pr.items))
            ack = queue.Acknowledgement(
                sent=[i.row_id for i in prepared.items], failed={}, retry={}
            )
            ack.all_sent = True  # as Pipeline.send marks a batch Amplitude took whole
            timed("acknowledge", lambda c=claim, a=ack: queue.acknowledge(conn, tables, c.token, a))
        # What every sync does once, whatever it claims: its cost is per sync, so it grows
        # with the table when a statement scans it.
        from tasks import settings

        s = settings.load()
        max_age = getattr(s, "max_age_seconds", 0)
        for _ in range(3):
            timed("per sync: sweep", lambda: queue.sweep(conn, tables, s.max_attempts, max_age))
            timed("per sync: has_due_rows", lambda: queue.has_due_rows(conn, tables, args.kind))
    if overlap:
        overlap.close()
    if not args.keep:
        drop_table(engine, name)
    engine.dispose()
    batch = args.batch_size
    print(
        f"{args.rows:,} {args.kind} rows on {args.db}, {args.in_flight} batches of {batch} in "
        f"flight, {args.preload_sent:,} sent rows before, {args.done_first:,} drained first, "
        f"{args.claim} claim{', overlapping snapshot' if args.overlap else ''}"
        f"{', no renew' if args.skip_renew else ''}; {args.cycles} cycles (wall: median; CPU: mean)\n"
    )
    print("| step | wall ms per batch | database CPU µs per row | Python CPU µs per row |")
    print("| --- | ---: | ---: | ---: |")
    totals = [0.0, 0.0, 0.0]
    per_sync = {k: v for k, v in timings.items() if k.startswith("per sync")}
    for step, values in timings.items():
        if step in per_sync:
            continue
        # CPU times tick in 10 ms: the mean over cycles, not a median of ticks.
        med = [
            statistics.median(v[0] for v in values),
            *(max(0.0, statistics.fmean(v[i] for v in values)) for i in (1, 2)),
        ]
        totals = [a + b for a, b in zip(totals, med, strict=True)]
        print(
            f"| {step} | {1000 * med[0]:.1f} | {1e6 * med[1] / batch:.1f} | {1e6 * med[2] / batch:.1f} |"
        )
    print(
        f"| **all steps** | **{1000 * totals[0]:.1f}** | **{1e6 * totals[1] / batch:.1f}** | "
        f"**{1e6 * totals[2] / batch:.1f}** |"
    )
    print(
        "\n| once per sync | wall ms | database CPU ms | Python CPU ms |\n| --- | ---: | ---: | ---: |"
    )
    for step, values in per_sync.items():
        med = [
            statistics.median(v[0] for v in values),
            *(max(0.0, statistics.fmean(v[i] for v in values)) for i in (1, 2)),
        ]
        print(
            f"| {step.removeprefix('per sync: ')} | {1000 * med[0]:.1f} | {1000 * med[1]:.1f} | "
            f"{1000 * med[2]:.1f} |"
        )
    return 0


class KeysetClaim:
    """`queue.claim` with the floor follow-up syncs keep (`delivery/sync.py`): only ids
    above the highest the previous full claim took, and from the oldest due row again after a
    short claim. The index seek then starts past every row already claimed, whatever the
    planner's statistics say and however many dead index entries the claimed rows left."""

    def __init__(self) -> None:
        self.floor = 0

    def __call__(self, conn, tables, kind: str, limit: int, lease_seconds: float):
        from tasks.db import queue

        claim = queue.claim(conn, tables, kind, limit, lease_seconds, after_id=self.floor)
        self.floor = claim.next_floor(limit)
        return claim


class Overlap:
    """A REPEATABLE READ snapshot on a second connection, renewed every 5 claims."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.conn = None
        self.claims = 0

    def tick(self) -> None:
        if self.claims % 5 == 0:
            self.close()
            self.conn = self.engine.connect()
            self.conn.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
            self.conn.exec_driver_sql("SELECT 1")
        self.claims += 1

    def close(self) -> None:
        if self.conn is not None:
            self.conn.rollback()
            self.conn.close()
            self.conn = None


def proposed_claim(conn, tables, kind: str, limit: int, lease_seconds: float):
    """The claim as this benchmark recommends it (tasks/db/queue.py claim_statement otherwise):

    - the same-key check as two EXISTS of plain equalities (user_id; device_id when user_id is
      NULL) instead of one EXISTS with an OR inside: PostgreSQL then probes ix_<table>_user per
      candidate instead of an anti-join against every in-flight row, which grows with the rows
      in flight (2000 candidates × 16,000 in-flight rows = 32M comparisons per claim);
    - UPDATE … FROM the picked ids (a CTE) instead of `id IN (subquery)`, which PostgreSQL
      may plan as a hash semi-join over a sequential scan of the whole table;
    - a floor: candidates start at the oldest pending id of the kind (see below).
    """
    import uuid

    from sqlalchemy import and_, exists, func, or_, select, update

    from tasks import outcomes
    from tasks.db import queue, sql

    assert kind in ("identify", "event"), "group_identify is left out of this sketch"
    q = tables.queue
    c = q.alias("candidate")
    e = q.alias("earlier")
    now = sql.utcnow()
    due = and_(
        c.c.kind == sql.lit(kind),
        c.c.status == sql.PENDING,
        or_(c.c.next_attempt_at.is_(None), c.c.next_attempt_at <= now),
    )
    if kind in outcomes.ORDERED_KINDS:
        waiting = or_(
            e.c.status == sql.IN_FLIGHT, and_(e.c.status == sql.PENDING, e.c.next_attempt_at > now)
        )
        by_user = exists().where(
            e.c.kind == sql.lit(kind), e.c.user_id == c.c.user_id, e.c.id < c.c.id, waiting
        )
        by_device = exists().where(
            e.c.kind == sql.lit(kind),
            e.c.user_id.is_(None),
            e.c.device_id == c.c.device_id,
            e.c.id < c.c.id,
            waiting,
        )
        due = and_(
            due, ~and_(c.c.user_id.is_not(None), by_user), ~and_(c.c.user_id.is_(None), by_device)
        )
    # Start at the oldest pending row of the kind (a min() the claim index answers at once):
    # the candidate scan then never walks the rows already sent, whichever index the planner
    # takes — with statistics from before the drain it takes the primary key, and without a
    # floor each claim filtered its way through every row sent so far.
    e2 = q.alias("oldest")
    floor = (
        select(func.min(e2.c.id))
        .where(e2.c.kind == sql.lit(kind), e2.c.status == sql.PENDING)
        .scalar_subquery()
    )
    due = and_(due, c.c.id >= floor)
    picked = (
        select(c.c.id)
        .where(due)
        .order_by(c.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=c)
        .cte("picked")
    )
    token = uuid.uuid4().hex
    stamp = (
        update(q)
        .where(q.c.id == picked.c.id)
        .values(
            status=sql.IN_FLIGHT,
            claim_token=token,
            locked_until=sql.utcnow_plus(lease_seconds),
            attempts=q.c.attempts + 1,
            first_attempt_at=func.coalesce(q.c.first_attempt_at, sql.utcnow()),
        )
        .returning(q.c.id)
    )
    with conn.begin():
        rows = len(conn.execute(stamp).all())
    return queue.Claim(token, rows)


if __name__ == "__main__":
    sys.exit(main())
