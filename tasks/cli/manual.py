"""`ampsync sync` and `ampsync retry-failed`: what an operator does to the queue by hand.

Each says what stops it in one line a person can act on and returns the exit code: 0 done,
1 the system could not do it (no worker, a timeout), 2 the command or the setup is wrong (a
missing queue table, `--since` after `--until`; settings errors are raised as SettingsError).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TextIO

from celery.exceptions import TimeoutError as ResultTimeout
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from .. import broker
from ..amplitude.limits import DEDUP_WINDOW_SECONDS
from ..db import engine as db_engine
from ..db import queue, reports, setup
from ..db.schema import QueueTables
from ..settings import Settings, SettingsError, mask_url
from ..worker import presence
from ..worker.app import SEND_QUEUE, SYNC_QUEUE
from .progress import Progress

# A sync starts within seconds behind any backlog (it has its own queue) and returns once it
# has fanned out: two minutes is a stuck system, not a slow one.
SUMMARY_TIMEOUT = 120.0
WAIT_TIMEOUT = 3600.0
# How often `sync --wait` makes sure some worker still consumes the send queue.
WORKER_CHECK_SECONDS = 5.0


def require_table(s: Settings, tables: QueueTables, engine: Engine) -> None:
    """Stop with one line when the database cannot be reached or the queue table (or a part
    of it) is missing — "run `ampsync init-db`" — before a command reads or writes it."""
    try:
        with engine.connect() as conn:
            problem = setup.check_table(conn, tables)
    except SQLAlchemyError as exc:
        raise SettingsError(
            "AMPSYNC_DATABASE_URL: " + db_engine.describe_db_error(exc, s.database_url)
        ) from None
    if problem:
        raise SettingsError(problem)


def no_worker_line(s: Settings, queue_name: str) -> str | None:
    """One line when no live worker consumes `queue_name` (tasks/worker/presence.py)."""
    client = broker.redis_client(s.celery_broker_url)
    if client is None:
        raise SettingsError(broker.NO_BROKER)
    try:
        workers = presence.live_workers(client)
    finally:
        client.close()
    if presence.consumers_of(workers, queue_name):
        return None
    where = mask_url(s.celery_broker_url or "")
    seen = (
        f"; live workers consume only {', '.join(sorted({q for w in workers for q in w.queues}))}"
        if workers
        else f" (no worker heartbeat in the last {presence.WORKER_TTL_SECONDS} s)"
    )
    return (
        f"ampsync: no worker consumes the {queue_name} queue on {where}{seen}: start one with "
        "`ampsync run` or `celery -A tasks worker -Q ampsync.sync,ampsync.send`"
    )


def sync_command(
    s: Settings,
    tables: QueueTables,
    engine: Engine,
    kind: str | None = None,
    wait: bool = False,
    timeout: float | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Enqueue a sync and print its summary (JSON, on `out`); with `wait`, follow the rows open
    when it was asked for until each is sent or failed, the progress bar on `err`. `timeout`
    bounds everything, the summary and the rows (default: an hour with `wait`, else
    SUMMARY_TIMEOUT)."""
    out, err = out or sys.stdout, err or sys.stderr
    if timeout is None:
        timeout = WAIT_TIMEOUT if wait else SUMMARY_TIMEOUT
    deadline = time.monotonic() + timeout
    require_table(s, tables, engine)
    broker.check(s.celery_broker_url)
    missing = no_worker_line(s, SYNC_QUEUE)
    if missing:
        print(missing + "; nothing was enqueued", file=err)
        return 1
    if wait:
        with engine.connect() as conn:
            started_max = reports.max_id(conn, tables, kind)
        before = _by_status(engine, tables, kind, started_max)

    from ..worker.jobs import sync  # the Celery app, only for the commands that publish

    asked = sync.delay(kind=kind)
    try:
        summary = asked.get(timeout=max(0.1, deadline - time.monotonic()))
    except ResultTimeout:
        print(
            f"ampsync: the sync was not done within {timeout:g} s: the workers are busy or "
            "stuck (`ampsync status` shows them); it stays queued and runs when one takes it",
            file=err,
        )
        return 1
    except Exception as exc:  # noqa: BLE001 - the worker's error, in one line
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"ampsync: the sync failed on the worker: {type(exc).__name__}: {first}", file=err)
        return 1
    finally:
        # Stop listening for the result now: left to the garbage collector at interpreter
        # exit, Celery's unsubscribe prints a traceback after our one line.
        with contextlib.suppress(Exception):
            asked.backend.remove_pending_result(asked)
    print(json.dumps(summary, indent=2, default=str), file=out)
    if not wait:
        return 0
    # The bar follows the rows that were open when the sync was asked for.
    total = before.get("pending", 0) + before.get("in_flight", 0)
    bar = Progress(total, stream=err)
    checked = time.monotonic()
    while True:
        counts = _by_status(engine, tables, kind, started_max)
        open_rows = counts.get("pending", 0) + counts.get("in_flight", 0)
        outcome = {
            name: max(0, counts.get(name, 0) - before.get(name, 0)) for name in ("sent", "failed")
        }
        if open_rows == 0:
            bar.finish(total, **outcome)
            return 0
        bar.update(max(0, total - open_rows), **outcome)
        now = time.monotonic()
        stop = None
        if now > deadline:
            stop = f"ampsync: {open_rows} rows still open after {timeout:g} s"
        elif now - checked > WORKER_CHECK_SECONDS:
            checked = now
            gone = no_worker_line(s, SEND_QUEUE)
            if gone:
                stop = f"{gone}; {open_rows} rows still open"
        if stop:
            bar.finish(max(0, total - open_rows), **outcome)
            print(stop, file=err)
            return 1
        time.sleep(0.5)


def _by_status(
    engine: Engine, tables: QueueTables, kind: str | None, max_id: int
) -> dict[str, int]:
    """Rows up to `max_id` (of one kind) by status."""
    with engine.connect() as conn:
        return reports.by_status(reports.row_counts(conn, tables, kind, max_id))


def retry_failed_command(
    s: Settings,
    tables: QueueTables,
    engine: Engine,
    kind: str | None = None,
    ids: Sequence[int] | None = None,
    failure_class: str | None = "gave-up",
    since: datetime | None = None,
    until: datetime | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Put the selected failed rows back to pending; say when failed rows of other classes
    were left as they are, and which `--class` takes them."""
    out, err = out or sys.stdout, err or sys.stderr
    if since is not None and until is not None and since >= until:
        print(
            f"ampsync: --since {since:%Y-%m-%dT%H:%M:%S} is not before --until "
            f"{until:%Y-%m-%dT%H:%M:%S} (UTC): no row can match; swap them?",
            file=err,
        )
        return 2
    require_table(s, tables, engine)
    with engine.connect() as conn:
        old = queue.failed_first_tried_before(
            conn, tables, DEDUP_WINDOW_SECONDS, kind, ids, failure_class, since, until
        )
        n = queue.retry_failed(conn, tables, kind, ids, failure_class, since, until)
        left = reports.failed_by_class(conn, tables, kind, ids, since, until)
    if old:
        print(
            f"warning: {old} of these rows were first tried over 7 days ago; Amplitude drops "
            "a re-sent insert_id for 7 days only, so any of them that reached Amplitude then "
            "will count twice",
            file=err,
        )
    print(f"{n} failed rows put back to pending", file=out)
    if left:
        counts = ", ".join(f"{name} {rows}" for name, rows in left.items())
        options = " or ".join(f"--class {name}" for name in left if name != "other")
        print(
            f"note: {sum(left.values())} failed rows of the selection are of other classes "
            f"and were left as they are ({counts}); "
            + (f"{options} or --class all" if options else "--class all")
            + " puts them back",
            file=err,
        )
    return 0
