"""The `ampsync` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

import ampsync_emulator

from .. import broker, feeds, logs
from .. import settings as settings_module
from ..amplitude.limits import DEDUP_WINDOW_SECONDS
from ..db import engine as db_engine
from ..db import queue, reports, schema, setup
from ..outcomes import FAILURE_CLASSES, KINDS
from ..settings import SettingsError
from ..worker.jobs import sync
from ..worker.process import worker_command
from . import check, demo, statements, status
from .progress import Progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ampsync", description="Deliver rows of a SQL queue table to Amplitude."
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="log lines as text or one JSON object per line, for log shippers "
        "(default: AMPSYNC_LOG_FORMAT, else text); workers it starts follow",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init-db", help="create what is missing of the queue table (never drops)")
    p.add_argument(
        "--print-sql",
        action="store_true",
        help="print the DDL for the configured database instead of running it",
    )
    p.add_argument(
        "--create-database",
        action="store_true",
        help="first create the database named in AMPSYNC_DATABASE_URL if the server "
        "lacks it (connects to the server's default database to do so)",
    )
    p.set_defaults(func=cmd_init_db)

    p = sub.add_parser("run", help="worker and beat in one process, for a single machine")
    p.add_argument("--concurrency", type=int, default=None, help="send processes (default: cores)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sync", help="enqueue a sync now")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument(
        "--wait", action="store_true", help="follow the rows until each is sent or failed"
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds --wait waits at most")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("status", help="rows by kind and status, paused endpoints, recent errors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry-failed", help="put failed rows back to pending")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--ids", type=int, nargs="+", help="only these row ids")
    p.add_argument(
        "--class",
        dest="failure_class",
        default="gave-up",
        choices=[*FAILURE_CLASSES, "all"],
        help="which failures (default: gave-up, rows that ran out of attempts)",
    )
    p.add_argument(
        "--since",
        type=_utc_time,
        metavar="TIME",
        help="only rows created at or after TIME (ISO 8601; UTC unless it has an "
        "offset), e.g. 2026-11-28T09:00",
    )
    p.add_argument("--until", type=_utc_time, metavar="TIME", help="only rows created before TIME")
    p.set_defaults(func=cmd_retry_failed)

    p = sub.add_parser("emulator", help="a local Amplitude-compatible server", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_emulator)

    p = sub.add_parser("demo", help="the whole job on embedded defaults, with sample CRM rows")
    p.add_argument("--users", type=int, default=300, help="sample users (default 300)")
    p.add_argument("--keep", action="store_true", help="keep the demo's folder")
    p.set_defaults(func=cmd_demo)

    check.add_parser(sub)
    statements.add_parser(sub)

    p = sub.add_parser("feed", help="feeds: queue rows from a SQL query, sending only changes")
    feed = p.add_subparsers(dest="feed_command", required=True, metavar="FEED_COMMAND")
    f = feed.add_parser("run", help="run a feed now, in this process (it only enqueues rows)")
    f.add_argument("name")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=cmd_feed_run)
    f = feed.add_parser("preview", help="what the next run would enqueue; writes nothing")
    f.add_argument("name")
    f.add_argument("--limit", type=int, default=20, help="rows shown (default 20, 0 = all)")
    f.add_argument("--diff", action="store_true", help="old → new property values per id")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=cmd_feed_preview)
    f = feed.add_parser("list", help="the feeds of AMPSYNC_FEEDS_FILE and their last runs")
    f.set_defaults(func=cmd_feed_list)

    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if args.command == "emulator":
        # Everything after `emulator` is the emulator's own (argparse's REMAINDER refuses a
        # first argument that starts with `-`, such as `--port`).
        args.rest = argv[argv.index("emulator") + 1 :]
    elif unknown:
        parser.error("unrecognized arguments: " + " ".join(unknown))
    logs.configure(args.log_format)
    try:
        return args.func(args) or 0
    except SettingsError as exc:
        print(exc.code, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# --- commands ----------------------------------------------------------------------------------


def _context():
    s = settings_module.get()
    return s, schema.define_tables(s.queue_table), db_engine.make_engine(s.database_url)


def _db_error(exc: Exception, s) -> SettingsError:
    return SettingsError(
        "AMPSYNC_DATABASE_URL: " + db_engine.describe_db_error(exc, s.database_url)
    )


def cmd_init_db(args) -> int:
    s, tables, engine = _context()
    if getattr(args, "create_database", False) and not args.print_sql:
        try:
            created = setup.create_database(s.database_url)
        except SQLAlchemyError as exc:
            raise _db_error(exc, s) from None
        if created is not None:
            print(f"database {created[0]}: " + ("created" if created[1] else "exists"))
    try:
        if args.print_sql:
            try:
                with engine.connect() as conn:
                    ddl = setup.missing_ddl(conn, tables)
            except SQLAlchemyError as exc:
                # The DBA may apply it elsewhere: print everything, say why on stderr.
                print(
                    f"ampsync: {db_engine.describe_db_error(exc, s.database_url)}; printing the "
                    "complete DDL",
                    file=sys.stderr,
                )
                ddl = setup.create_ddl(tables)
            print(setup.compile_ddl(ddl, engine.dialect) or "-- nothing is missing", end="")
            print()
            return 0
    except SQLAlchemyError as exc:
        raise _db_error(exc, s) from None
    _init_db(s, tables, engine)
    return 0


def _init_db(s: settings_module.Settings, tables: schema.QueueTables, engine: Engine) -> None:
    try:
        done = setup.init_db(engine, tables)
    except SQLAlchemyError as exc:
        raise _db_error(exc, s) from None
    print(f"{tables.queue.fullname}: " + (f"{len(done)} statements run" if done else "up to date"))


def cmd_run(args) -> int:
    s, tables, engine = _context()
    s.require_api_key()
    _init_db(s, tables, engine)
    env = dict(os.environ)
    embedded = None
    if not s.celery_broker_url:
        embedded = broker.EmbeddedRedis()
        env["CELERY_BROKER_URL"] = embedded.start()
        print(f"embedded Redis at {env['CELERY_BROKER_URL']}")
    command = worker_command(beat=True, concurrency=args.concurrency)
    child = subprocess.Popen(command, env=env)
    # A SIGTERM (docker stop, systemd) must stop the worker and the embedded Redis too.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGTERM)
        return child.wait()
    finally:
        if embedded:
            embedded.stop()


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def cmd_sync(args) -> int:
    s, tables, engine = _context()
    broker.check(s.celery_broker_url)
    if args.wait:
        with engine.connect() as conn:
            started_max = reports.max_id(conn, tables, args.kind)
        before = _by_status(engine, tables, args.kind, started_max)
    summary = sync.delay(kind=args.kind).get(timeout=120)
    print(json.dumps(summary, indent=2, default=str))
    if not args.wait:
        return 0
    # The bar follows the rows that were open when the sync was asked for.
    total = before.get("pending", 0) + before.get("in_flight", 0)
    bar = Progress(total)
    deadline = time.monotonic() + args.timeout
    while True:
        counts = _by_status(engine, tables, args.kind, started_max)
        open_rows = counts.get("pending", 0) + counts.get("in_flight", 0)
        outcome = {
            name: max(0, counts.get(name, 0) - before.get(name, 0)) for name in ("sent", "failed")
        }
        if open_rows == 0:
            bar.finish(total, **outcome)
            return 0
        bar.update(max(0, total - open_rows), **outcome)
        if time.monotonic() > deadline:
            bar.finish(max(0, total - open_rows), **outcome)
            print(f"{open_rows} rows still open after {args.timeout:g} s", file=sys.stderr)
            return 1
        time.sleep(0.5)


def _by_status(
    engine: Engine, tables: schema.QueueTables, kind: str | None, max_id: int
) -> dict[str, int]:
    """Rows up to `max_id` (of one kind) by status."""
    with engine.connect() as conn:
        return reports.by_status(reports.row_counts(conn, tables, kind, max_id))


def cmd_status(args) -> int:
    s, tables, engine = _context()
    try:
        report = status.collect(s, tables, engine)
    except Exception as exc:  # noqa: BLE001 - any database error becomes one line
        if isinstance(exc, SQLAlchemyError):
            raise _db_error(exc, s) from None
        raise
    if args.json:
        print(json.dumps(report, indent=2, default=_json_default))
    else:
        print(status.render(report))
    return 0


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat() + "Z"
    return str(value)


def _utc_time(text: str) -> datetime:
    """An ISO 8601 time as the naive UTC the queue table stores."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time such as 2026-11-28T09:00"
        ) from None
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def cmd_retry_failed(args) -> int:
    s, tables, engine = _context()
    selection = dict(
        kind=args.kind,
        ids=args.ids,
        since=args.since,
        until=args.until,
        failure_class=None if args.failure_class == "all" else args.failure_class,
    )
    with engine.connect() as conn:
        old = queue.failed_first_tried_before(conn, tables, DEDUP_WINDOW_SECONDS, **selection)
        n = queue.retry_failed(conn, tables, **selection)
    if old:
        print(
            f"warning: {old} of these rows were first tried over 7 days ago; Amplitude drops "
            "a re-sent insert_id for 7 days only, so any of them that reached Amplitude then "
            "will count twice",
            file=sys.stderr,
        )
    print(f"{n} failed rows put back to pending")
    return 0


def cmd_emulator(args) -> int:
    return ampsync_emulator.main(args.rest)


def cmd_demo(args) -> int:
    return demo.run_demo(users=args.users, keep=args.keep)


# --- feeds (tasks/feeds/) -----------------------------------------------------------------------


def _feed_failed(exc: Exception) -> int:
    print(f"ampsync: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, feeds.FeedConfigError) else 1


def cmd_feed_run(args) -> int:
    try:
        result = feeds.run_feed(settings_module.get(), args.name)
    except feeds.FeedError as exc:
        return _feed_failed(exc)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(result.summary())
    for line in result.errors + ([f"note: {result.note}"] if result.note else []):
        print(f"  {line}")
    return 0


def cmd_feed_preview(args) -> int:
    s = settings_module.get()
    limit = args.limit or None
    try:
        plan = feeds.FeedRunner(s).preview(feeds.config_for(s).get(args.name))
    except feeds.FeedError as exc:
        return _feed_failed(exc)
    if args.json:
        print(json.dumps(feeds.plan_as_dict(plan, limit), indent=2, default=str))
    else:
        print(feeds.render_preview(plan, limit, diff=args.diff))
    return 0


def cmd_feed_list(args) -> int:
    s = settings_module.get()
    try:
        config = feeds.config_for(s)
    except feeds.FeedError as exc:
        return _feed_failed(exc)
    if not config.feeds:
        print(f"no feeds: {config.path} does not exist or declares none (AMPSYNC_FEEDS_FILE)")
        return 0
    try:
        runs = feeds.FeedRunner(s).status()
    except (feeds.FeedError, SQLAlchemyError) as exc:
        runs = {}
        print(f"(last runs unknown: {str(exc).splitlines()[0][:200]})")
    for feed in config.feeds.values():
        print(feeds.describe(feed))
        last = runs.get(feed.name)
        if last and last["last_error"]:
            print(
                f"  last run {last['last_run_at']:%Y-%m-%d %H:%M:%S} UTC failed: "
                f"{last['last_error']}"
            )
        elif last and last["last_result"]:
            r = last["last_result"]
            print(
                f"  last run {last['last_run_at']:%Y-%m-%d %H:%M:%S} UTC: read "
                f"{r['rows_read']} rows, enqueued {r['rows_enqueued']}, {r['invalid']} invalid"
            )
        else:
            print("  never run")
    return 0
