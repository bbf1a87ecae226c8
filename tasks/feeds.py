"""Feeds: a SQL query or stored-procedure call turned into queue rows, sending only what changed.

A feed is declared in a TOML file in the user's repository (AMPSYNC_FEEDS_FILE). A run reads
the feed's source and enqueues rows into the queue table; delivering them is the pipeline's job.

- identify / group_identify feeds keep, per feed and id, the properties Amplitude accepted and
  those enqueued but not yet confirmed (`<queue>_feed_state`). A run first settles the pending
  ones from their queue rows (`sent` → accepted; `failed` or gone → not delivered), then enqueues
  one row per id whose mapped properties differ, carrying only those properties.
- event feeds read incrementally by a cursor that never skips a row committing late: below
  `MIN_ACTIVE_ROWVERSION()` on SQL Server, below the snapshot's xmin on PostgreSQL, and with an
  overlap window elsewhere. The cursor lives in `<queue>_feeds` and moves in the transaction that
  enqueues the rows; a stable insert_id from business-key columns keeps any re-read harmless.

Preview runs the same planning code without writing, and builds the payloads with
`payloads.Builder`, so what it shows is what the pipeline sends.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    Table,
    Unicode,
    bindparam,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.sql.elements import TextClause

from . import payloads, queue
from .queue import _JSON_TEXT, _TIME, INVALID, QueueTables, utcnow
from .settings import Settings, mask_url

KINDS = queue.KINDS
NULL_MODES = ("unset", "skip")
DELETED_MODES = ("keep", "unset")
CURSOR_MODES = ("rowversion", "xid", "overlap")
# The cursor mode a source gets unless the feed names one.
DEFAULT_CURSOR_MODE = {"mssql": "rowversion", "postgresql": "xid"}
UNSET = "-"  # the value Amplitude's `$unset` takes
MAX_SHOWN_ERRORS = 20  # in a run's summary; preview shows every one

_COMMON_KEYS = {"kind", "query", "procedure", "params", "source_url", "schedule", "properties"}
ALLOWED_KEYS = {
    "identify": _COMMON_KEYS | {"user_id", "device_id", "null", "deleted", "marker_event"},
    "group_identify": _COMMON_KEYS | {"group_type", "group_value", "null", "deleted"},
    "event": _COMMON_KEYS | {"user_id", "device_id", "event_type", "event_type_column", "time",
                             "insert_id", "cursor", "cursor_mode", "overlap", "fields"},
}  # fmt: skip
_ALL_KEYS = set().union(*ALLOWED_KEYS.values())
# Event fields a column may fill through `[feeds.NAME.fields]` (shared/reference/amplitude-api.md).
EVENT_FIELDS = frozenset(
    ["app_version", "platform", "os_name", "os_version", "device_brand", "device_manufacturer",
     "device_model", "carrier", "country", "region", "city", "dma", "language", "location_lat",
     "location_lng", "ip", "idfa", "idfv", "adid", "android_id", "android_app_set_id",
     "user_agent", "price", "quantity", "revenue", "productId", "revenueType", "currency",
     "session_id", "event_id"]
)  # fmt: skip
_FEED_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_PROCEDURE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,2}$")
_PARAM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class FeedError(RuntimeError):
    """A feed cannot run (source unreachable, query failed, a mapped column missing, …).
    The message says which feed and what to change; nothing was enqueued."""


class FeedConfigError(FeedError):
    """The feeds file is wrong; one line per problem, each naming the file, line and key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class FeedConflict(FeedError):
    """Another run of the same feed committed while this one read its source."""


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Feed:
    name: str
    kind: str
    source_url: str
    query: str | None = None
    procedure: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    schedule: float | None = None
    properties: dict[str, str] = field(default_factory=dict)  # column → property name
    user_id: str | None = None  # columns, except where noted
    device_id: str | None = None
    group_type: str | None = None  # a constant
    group_value: str | None = None
    null: str = "unset"
    deleted: str = "keep"
    marker_event: str | None = None
    event_type: str | None = None  # a constant
    event_type_column: str | None = None
    time: str | None = None
    insert_id: tuple[str, ...] = ()
    cursor: str | None = None
    cursor_mode: str | None = None
    overlap: float | None = None
    fields: dict[str, str] = field(default_factory=dict)  # column → Amplitude event field
    path: str = ""
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def dialect(self) -> str:
        return make_url(self.source_url).get_backend_name()

    def where(self, key: str | None = None) -> str:
        """`file:line: feeds.NAME.key` for messages about this feed."""
        line = self.lines.get(key or "") or self.lines.get("")
        dotted = f"feeds.{self.name}" + (f".{key}" if key else "")
        return f"{self.path}:{line}: {dotted}" if line else f"{self.path}: {dotted}"


@dataclass(frozen=True)
class FeedsConfig:
    path: str
    feeds: dict[str, Feed]

    def get(self, name: str) -> Feed:
        if name not in self.feeds:
            known = ", ".join(sorted(self.feeds)) or "none"
            hint = difflib.get_close_matches(name, list(self.feeds), n=1)
            raise FeedError(
                f"no feed named {name!r} in {self.path}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; feeds: {known}"
            )
        return self.feeds[name]

    def scheduled(self) -> list[Feed]:
        return [f for f in self.feeds.values() if f.schedule]


def load_config(path: str | os.PathLike, default_source_url: str) -> FeedsConfig:
    """Read and validate the feeds file; a missing file means no feeds."""
    p = Path(path)
    if not p.exists():
        return FeedsConfig(str(path), {})
    try:
        source = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FeedConfigError([f"{path}: cannot read the feeds file: {exc}"]) from None
    return parse_config(source, default_source_url, str(path))


def parse_config(source: str, default_source_url: str, path: str = "ampsync-feeds.toml",
                 environ: dict[str, str] | None = None) -> FeedsConfig:  # fmt: skip
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if at:
            message = message[: at.start()].strip()
            raise FeedConfigError(
                [f"{path}:{at.group(1)}: invalid TOML: {message} (column {at.group(2)})"]
            ) from None
        raise FeedConfigError([f"{path}: invalid TOML: {message}"]) from None
    lines = _key_lines(source)
    problems: list[str] = []

    def at(keys: tuple[str, ...]) -> str:
        for n in range(len(keys), 0, -1):
            if keys[:n] in lines:
                return f"{path}:{lines[keys[:n]]}: {'.'.join(keys)}"
        return f"{path}: {'.'.join(keys)}"

    for key in data:
        if key != "feeds":
            problems.append(f"{at((key,))}: unknown top-level key; feeds are declared as "
                            "[feeds.NAME] tables")  # fmt: skip
    feeds_table = data.get("feeds", {})
    if not isinstance(feeds_table, dict):
        problems.append(f"{at(('feeds',))}: must be a table of feeds ([feeds.NAME])")
        feeds_table = {}
    feeds: dict[str, Feed] = {}
    env = os.environ if environ is None else environ
    for name, table in feeds_table.items():
        errors: list[str] = []

        def bad(key: str | None, message: str, name: str = name, errors: list = errors) -> None:
            keys = ("feeds", name) + (tuple(key.split(".", 1)) if key else ())
            errors.append(f"{at(keys)}: {message}")

        if not _FEED_NAME.match(name):
            bad(None, "a feed name is 1-100 letters, digits, _ or -")
        if not isinstance(table, dict):
            bad(None, "must be a table: [feeds.NAME] with kind, query, …")
            problems.extend(errors)
            continue
        feed = _validate_feed(name, table, bad, default_source_url, env)
        problems.extend(errors)
        if feed is not None and not errors:
            line_map = {"": lines.get(("feeds", name), 0)}
            for keys, line in lines.items():
                if keys[:2] == ("feeds", name) and len(keys) > 2:
                    line_map[".".join(keys[2:])] = line
            feeds[name] = _replace(feed, path=path, lines=line_map)
    if problems:
        raise FeedConfigError(problems)
    return FeedsConfig(path, feeds)


def _replace(feed: Feed, **changes) -> Feed:
    return Feed(**{**{k: getattr(feed, k) for k in Feed.__dataclass_fields__}, **changes})


def _validate_feed(name: str, t: dict, bad, default_source_url: str,
                   env: dict[str, str]) -> Feed | None:  # fmt: skip
    kind = t.get("kind")
    if kind is None:
        bad(None, "kind is missing: identify, event or group_identify")
        return None
    if kind not in KINDS:
        bad("kind", f"must be identify, event or group_identify, not {kind!r}")
        return None
    for key in t:
        if key not in ALLOWED_KEYS[kind]:
            hint = difflib.get_close_matches(key, sorted(ALLOWED_KEYS[kind]), n=1)
            if key in _ALL_KEYS:
                bad(key, f"is not used by {kind} feeds")
            else:
                bad(key, "unknown key" + (f" (did you mean {hint[0]}?)" if hint else ""))

    def string(key: str, required: bool = False) -> str | None:
        value = t.get(key)
        if value is None:
            if required:
                bad(None, f"{key} is missing")
            return None
        if not isinstance(value, str) or not value.strip():
            bad(key, "must be a non-empty string")
            return None
        return value

    def choice(key: str, options: tuple[str, ...], default: str) -> str:
        value = t.get(key, default)
        if value not in options:
            bad(key, f"must be {' or '.join(repr(o) for o in options)}, not {value!r}")
            return default
        return value

    def mapping(key: str, check_value) -> dict[str, str]:
        value = t.get(key, {})
        if not isinstance(value, dict):
            bad(key, "must be a table: column = name")
            return {}
        out: dict[str, str] = {}
        for column, target in value.items():
            if not isinstance(target, str) or not target.strip():
                bad(f"{key}.{column}", "must be a non-empty string")
                continue
            problem = check_value(target)
            if problem:
                bad(f"{key}.{column}", problem)
                continue
            out[column] = target
        return out

    # Source
    raw_url = t.get("source_url")
    source_url = default_source_url
    if raw_url is not None:
        if not isinstance(raw_url, str) or not raw_url.strip():
            bad("source_url", "must be a SQLAlchemy URL string")
        else:
            missing = [m for m in _ENV_REF.findall(raw_url) if m not in env]
            if missing:
                bad("source_url", f"refers to ${{{missing[0]}}}, which is not set in the "
                    "environment")  # fmt: skip
            else:
                expanded = _ENV_REF.sub(lambda m: env[m.group(1)], raw_url)
                try:
                    make_url(expanded)
                    source_url = expanded
                except ArgumentError:
                    bad("source_url", "is not a SQLAlchemy URL, e.g. "
                        "mssql+pymssql://user:pw@host:1433/crm")  # fmt: skip
    try:
        dialect = make_url(source_url).get_backend_name()
    except ArgumentError:
        dialect = ""
    query, procedure = string("query"), string("procedure")
    if "query" not in t and "procedure" not in t:
        bad(None, "needs query = \"SELECT …\" or procedure = \"dbo.name\"")
    elif "query" in t and "procedure" in t:
        bad("procedure", "a feed has a query or a procedure, not both")
    if procedure is not None:
        if not _PROCEDURE.match(procedure):
            bad("procedure", "must be a procedure name such as dbo.crm_segments (parameters go "
                "in [feeds.NAME.params])")  # fmt: skip
        elif dialect == "sqlite":
            bad("procedure", "SQLite has no stored procedures: write a query")
    params = t.get("params", {})
    if not isinstance(params, dict):
        bad("params", "must be a table: parameter = value")
        params = {}
    for pname, pvalue in params.items():
        if procedure is None:
            bad("params", "only a procedure takes params")
            break
        if not _PARAM.match(pname) or pname in ("after", "before"):
            bad(f"params.{pname}", "must be a parameter name of letters, digits and _ (after "
                "and before are the cursor's)")  # fmt: skip
        elif not isinstance(pvalue, str | int | float | bool):
            bad(f"params.{pname}", "must be a string, number or boolean")
    schedule = t.get("schedule")
    if schedule is not None and (isinstance(schedule, bool) or not isinstance(schedule, int | float)
                                 or not 0 < schedule <= 7 * 86400):  # fmt: skip
        bad("schedule", "must be seconds between runs, above 0 and at most a week")
        schedule = None

    # Mapping
    def property_name(target: str) -> str | None:
        return "property names cannot start with $" if target.startswith("$") else None

    props = mapping("properties", property_name)
    if kind != "event" and "properties" not in t:
        bad(None, f"[feeds.{name}.properties] is missing: map columns to property names, "
            "e.g. SEGMENT = \"CRM_Segment\"")  # fmt: skip
    elif kind != "event" and t["properties"] == {}:
        bad("properties", "is empty: map at least one column to a property name")
    seen_targets: dict[str, str] = {}
    for column, target in props.items():
        if target in seen_targets:
            bad(f"properties.{column}", f"property {target!r} is already filled by column "
                f"{seen_targets[target]}")  # fmt: skip
        seen_targets[target] = column
    user_id, device_id = string("user_id"), string("device_id")
    group_type, group_value = string("group_type"), string("group_value")
    if kind in ("identify", "event") and not user_id and not device_id:
        bad(None, "user_id (or device_id) is missing: the column holding Amplitude's user id")
    if kind == "group_identify":
        string("group_type", required=True)
        string("group_value", required=True)
    null = choice("null", NULL_MODES, "unset")
    deleted = choice("deleted", DELETED_MODES, "keep")
    marker = string("marker_event")
    if marker and marker in payloads.RESERVED_EVENT_TYPES:
        bad("marker_event", f"{marker!r} is reserved by Amplitude")

    event_type = string("event_type")
    event_type_column = string("event_type_column")
    insert_id: tuple[str, ...] = ()
    cursor_mode = t.get("cursor_mode")
    overlap = t.get("overlap")
    fields = {}
    if kind == "event":
        if (event_type is None) == (event_type_column is None):
            bad(None, "needs event_type = \"Order Picked Up\" or event_type_column = \"column\"")
        elif event_type in payloads.RESERVED_EVENT_TYPES:
            bad("event_type", f"{event_type!r} is reserved by Amplitude")
        raw_ids = t.get("insert_id")
        if isinstance(raw_ids, str):
            raw_ids = [raw_ids]
        if raw_ids is None:
            bad(None, "insert_id is missing: the business-key columns that identify an event "
                "(e.g. insert_id = [\"order_id\"]), so a re-read never duplicates it")  # fmt: skip
        elif (not isinstance(raw_ids, list) or not raw_ids
              or not all(isinstance(c, str) and c.strip() for c in raw_ids)):  # fmt: skip
            bad("insert_id", "must be a column name or a list of column names")
        else:
            insert_id = tuple(raw_ids)
        string("cursor", required=True)
        if cursor_mode is None:
            cursor_mode = DEFAULT_CURSOR_MODE.get(dialect, "overlap")
        elif cursor_mode not in CURSOR_MODES:
            bad("cursor_mode", f"must be rowversion, xid or overlap, not {cursor_mode!r}")
        elif cursor_mode == "rowversion" and dialect != "mssql":
            bad("cursor_mode", "rowversion needs SQL Server")
        elif cursor_mode == "xid" and dialect != "postgresql":
            bad("cursor_mode", "xid needs PostgreSQL")
        if cursor_mode == "overlap":
            if overlap is None:
                bad(None, "overlap is missing: seconds (timestamp cursor) or ids (id cursor) "
                    "re-read each run, longer than your longest write transaction")  # fmt: skip
            elif isinstance(overlap, bool) or not isinstance(overlap, int | float) or overlap < 0:
                bad("overlap", "must be a number of seconds or ids, 0 or more")
        elif overlap is not None:
            bad("overlap", f"is only for cursor_mode = \"overlap\"; {cursor_mode} cursors "
                "never need one")  # fmt: skip

        def event_field(target: str) -> str | None:
            if target in EVENT_FIELDS:
                return None
            if target in payloads.COLUMN_FIELDS or target in ("user_properties", "groups"):
                return f"{target} is filled by the feed itself, not by fields"
            hint = difflib.get_close_matches(target, sorted(EVENT_FIELDS), n=1)
            return f"{target!r} is not an Amplitude event field" + (
                f" (did you mean {hint[0]}?)" if hint else ""
            )

        fields = mapping("fields", event_field)
    return Feed(
        name=name, kind=kind, source_url=source_url, query=query, procedure=procedure,
        params=dict(params), schedule=float(schedule) if schedule else None, properties=props,
        user_id=user_id, device_id=device_id, group_type=group_type, group_value=group_value,
        null=null, deleted=deleted, marker_event=marker, event_type=event_type,
        event_type_column=event_type_column, time=string("time"), insert_id=insert_id,
        cursor=t.get("cursor") if isinstance(t.get("cursor"), str) else None,
        cursor_mode=cursor_mode if kind == "event" else None,
        overlap=float(overlap) if isinstance(overlap, int | float) and kind == "event" else None,
        fields=fields,
    )  # fmt: skip


_BARE_KEY = r"[A-Za-z0-9_-]+"
_KEY_PART = rf"(?:{_BARE_KEY}|\"[^\"]*\"|'[^']*')"
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"


def _split_key(dotted: str) -> tuple[str, ...]:
    return tuple(p.strip().strip("\"'") for p in re.findall(_KEY_PART, dotted))


def _key_lines(source: str) -> dict[tuple[str, ...], int]:
    """Where each table and key is written (tomllib keeps no positions): key path → line."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    closing: str | None = None  # inside a multi-line string until this delimiter
    for number, raw in enumerate(source.splitlines(), 1):
        stripped = raw.strip()
        if closing:
            if closing in stripped:
                closing = None
            continue
        if not stripped or stripped.startswith("#"):
            continue
        header = re.match(rf"^\[\[?\s*({_DOTTED})\s*\]\]?", stripped)
        if header:
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
            continue
        pair = re.match(rf"^({_DOTTED})\s*=\s*(.*)$", stripped)
        if not pair:
            continue
        key = table + _split_key(pair.group(1))
        lines.setdefault(key, number)
        value = pair.group(2)
        for delimiter in ('"""', "'''"):
            if value.startswith(delimiter) and value.count(delimiter) == 1:
                closing = delimiter
        if value.startswith("{"):  # an inline table: its keys sit on this line
            for inner in re.finditer(rf"(?:^\{{|,)\s*({_DOTTED})\s*=", value):
                lines.setdefault(key + _split_key(inner.group(1)), number)
    return lines


# --- ampsync's tables for feeds ----------------------------------------------------------------


def define_feed_tables(md: MetaData, queue_name: str) -> None:
    """Add the feed tables, named after the queue table, to the queue's MetaData, so
    `ampsync init-db` creates them and `--print-sql` shows them."""
    Table(
        f"{queue_name}_feeds",
        md,
        Column("feed", Unicode(100), primary_key=True),
        # Bumped by every run that enqueues: two runs of a feed never both commit.
        Column("version", Integer, nullable=False, server_default="0"),
        Column("cursor_value", Unicode(255)),  # event feeds: JSON
        Column("seen", _JSON_TEXT),  # event feeds, overlap mode: insert_ids in the window
        Column("last_run_at", _TIME),
        Column("last_result", _JSON_TEXT),
        Column("last_error", Unicode(2000)),
    )
    Table(
        f"{queue_name}_feed_state",
        md,
        Column("feed", Unicode(100), primary_key=True),
        # user id, "@device:" + device id, or group value; 300 keeps the key within SQL
        # Server's 900-byte index limit
        Column("entity", Unicode(300), primary_key=True),
        Column("accepted", _JSON_TEXT),  # properties Amplitude accepted: {name: value|null}
        Column("pending", _JSON_TEXT),  # enqueued, not yet confirmed: {queue id: {name: value}}
        Column("updated_at", _TIME, nullable=False, server_default=utcnow()),
    )


@dataclass(frozen=True)
class FeedTables:
    queue: Table
    feeds: Table
    state: Table

    @classmethod
    def of(cls, tables: QueueTables) -> FeedTables:
        q = tables.queue
        prefix = f"{q.schema}." if q.schema else ""
        md = tables.metadata
        return cls(q, md.tables[f"{prefix}{q.name}_feeds"], md.tables[f"{prefix}{q.name}_feed_state"])


def check_tables(conn: Connection, ft: FeedTables) -> None:
    insp = inspect(conn)
    missing = [t.fullname for t in (ft.feeds, ft.state) if not insp.has_table(t.name, schema=t.schema)]
    if missing:
        raise FeedError(f"table {', '.join(missing)} does not exist: run `ampsync init-db` "
                        "(it only adds what is missing)")  # fmt: skip


# --- reading the source ------------------------------------------------------------------------

_BOUND_SQL = {
    # Rows below the lowest rowversion of an open transaction are committed.
    "rowversion": "SELECT CAST(MIN_ACTIVE_ROWVERSION() AS BIGINT) AS bound",
    # Every transaction below the snapshot's xmin has finished.
    "xid": "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS bound",
}
_SOURCE_ALIAS = "ampsync_source"


def _escape_colons(sql: str) -> str:
    """User SQL goes through text(): `:word` in it is not one of our parameters."""
    return re.sub(r"(?<![:\w\\]):(?=\w)", r"\\:", sql)


def source_statement(feed: Feed, dialect, first_run: bool = False) -> TextClause:
    """The statement a run executes on the source. Event feeds get the cursor's bounds: a
    query is wrapped and filtered; a procedure receives them as parameters `after`/`before`."""
    bounds: list[str] = []
    if feed.kind == "event":
        bounds = ["after"] if feed.cursor_mode == "overlap" else ["after", "before"]
        if feed.cursor_mode == "overlap" and first_run and not feed.procedure:
            bounds = []  # a procedure gets after = NULL instead
    if feed.procedure:
        names = list(feed.params) + bounds
        if dialect.name == "mssql":
            sql = f"EXEC {feed.procedure}" + (
                " " + ", ".join(f"@{n} = :{n}" for n in names) if names else ""
            )
        elif dialect.name == "postgresql":
            sql = f"SELECT * FROM {feed.procedure}({', '.join(f'{n} => :{n}' for n in names)})"
        else:
            sql = f"CALL {feed.procedure}({', '.join(f':{n}' for n in names)})"
        return text(sql)
    sql = _escape_colons(feed.query.strip().rstrip(";"))
    if not bounds:
        return text(sql)
    column = f"{_SOURCE_ALIAS}.{dialect.identifier_preparer.quote(feed.cursor)}"
    if feed.cursor_mode == "rowversion":
        where = (f"{column} > CAST(:after AS BINARY(8)) AND {column} < CAST(:before AS BINARY(8))")
    elif feed.cursor_mode == "xid":
        where = f"{column} > :after AND {column} < :before"
    else:
        where = f"{column} >= :after"
    return text(f"SELECT * FROM ({sql}) AS {_SOURCE_ALIAS} WHERE {where}")


@dataclass
class SourceRows:
    columns: list[str]
    rows: list[Sequence[Any]]
    bound: int | None = None  # rowversion / xid: everything below it has finished


_engines: dict[str, Engine] = {}


def source_engine(url: str) -> Engine:
    if url not in _engines:
        _engines[url] = queue.make_engine(url)
    return _engines[url]


def read_source(feed: Feed, engine: Engine, cursor: Cursor) -> SourceRows:
    what = "procedure" if feed.procedure else "query"
    try:
        with engine.connect() as conn, conn.begin():
            bound = None
            params: dict[str, Any] = dict(feed.params)
            if feed.kind == "event":
                if feed.cursor_mode in _BOUND_SQL:
                    bound = int(conn.execute(text(_BOUND_SQL[feed.cursor_mode])).scalar_one())
                    params.update(after=cursor.position or 0, before=bound)
                elif cursor.position is not None or feed.procedure:
                    params["after"] = cursor.lower_bound(feed.overlap or 0)
            statement = source_statement(feed, conn.dialect, first_run=cursor.position is None)
            result = conn.execute(statement, params)
            if not result.returns_rows:
                raise FeedError(f"{feed.where(what)}: returned no result set (a procedure must "
                                "end with a SELECT; on SQL Server add SET NOCOUNT ON)")  # fmt: skip
            return SourceRows(list(result.keys()), list(result.fetchall()), bound)
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0][:400]
        raise FeedError(f"{feed.where(what)}: the {what} failed on "
                        f"{mask_url(feed.source_url)}: {first}") from None  # fmt: skip


class _Columns:
    """Result columns by name, matched case-insensitively (SQL names are)."""

    def __init__(self, feed: Feed, names: list[str]) -> None:
        self.feed = feed
        self.names = names
        self.index: dict[str, int] = {}
        for i, n in enumerate(names):
            self.index.setdefault(n.lower(), i)

    def find(self, column: str, key: str) -> int:
        i = self.index.get(column.lower())
        if i is None:
            raise FeedError(
                f"{self.feed.where(key)}: the result has no column {column!r}; it has "
                f"{', '.join(self.names) or 'no columns'}"
            )
        return i


# --- values ------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A database value as the JSON value Amplitude receives (and state compares)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat()
    if isinstance(value, date | dtime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def _same(a: Any, b: Any) -> bool:
    return orjson.dumps(a) == orjson.dumps(b)


def _id_text(value: Any) -> str | None:
    if value is None:
        return None
    text_value = plain(value)
    return text_value if isinstance(text_value, str) else orjson.dumps(text_value).decode()


def _utc_naive(value: Any) -> datetime | None:
    """An event time for the queue's UTC DATETIME2 column."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise ValueError(f"is {type(value).__name__}, not a date/time")
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


# --- the cursor of an event feed ---------------------------------------------------------------


@dataclass
class Cursor:
    """Where an event feed stands. rowversion/xid: every row at or below `position` has been
    enqueued. overlap: the highest value read; rows from `position - overlap` on are read again
    and those whose insert_id is in `seen` skipped."""

    position: int | datetime | str | None = None
    seen: set[str] = field(default_factory=set)
    text_sep: str | None = None  # a datetime kept as text (SQLite): its date/time separator

    def to_json(self) -> str | None:
        if self.position is None:
            return None
        value = self.position
        if isinstance(value, datetime):
            return orjson.dumps({"datetime": value.isoformat(), "sep": self.text_sep}).decode()
        return orjson.dumps({"value": value}).decode()

    @classmethod
    def from_row(cls, position: str | None, seen: str | None) -> Cursor:
        cursor = cls(seen=set(orjson.loads(seen)) if seen else set())
        if position:
            data = orjson.loads(position)
            if "datetime" in data:
                cursor.position = datetime.fromisoformat(data["datetime"])
                cursor.text_sep = data.get("sep")
            else:
                cursor.position = data["value"]
        return cursor

    def lower_bound(self, overlap: float):
        """The overlap window's start, in the type the source compares with."""
        value = self.position
        if value is None:
            return None
        if isinstance(value, datetime):
            start = value - timedelta(seconds=overlap)
            return start.isoformat(sep=self.text_sep) if self.text_sep else start
        return value - int(math.ceil(overlap))


def _cursor_value(value: Any) -> tuple[int | datetime | None, str | None]:
    """A cursor column value as something ordered, and the separator of a textual datetime."""
    if value is None or isinstance(value, bool):
        return None, None
    if isinstance(value, int):
        return value, None
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value), None
    if isinstance(value, bytes | bytearray) and len(value) == 8:  # a SQL Server rowversion
        return int.from_bytes(value, "big"), None
    if isinstance(value, datetime):
        # An aware time stays aware: it is bound back as such, whatever the session's zone.
        return (value.astimezone(UTC) if value.tzinfo else value), None
    if isinstance(value, str):
        stripped = value.strip()
        if re.fullmatch(r"-?\d+", stripped):
            return int(stripped), None
        try:
            parsed = _utc_naive(stripped)
        except ValueError:
            return None, None
        return parsed, ("T" if "T" in stripped else " ")
    return None, None


# --- planning ----------------------------------------------------------------------------------


@dataclass
class Change:
    old: Any
    new: Any
    known: bool  # False: nothing was ever sent for this property


@dataclass
class Planned:
    """One queue row the run would enqueue, with what Amplitude would receive."""

    key: str  # the id (user, device, group value) or the event's insert_id
    row: dict[str, Any]
    payload: dict | None = None
    error: str | None = None  # event rows Amplitude would refuse are enqueued as failed
    changes: dict[str, Change] = field(default_factory=dict)
    marker: dict[str, Any] | None = None
    marker_payload: dict | None = None


@dataclass
class EntityState:
    accepted: dict[str, Any] = field(default_factory=dict)
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)  # queue id → changes
    exists: bool = False
    dirty: bool = False

    def baseline(self) -> dict[str, Any]:
        """What Amplitude will hold once the rows on their way are delivered."""
        values = dict(self.accepted)
        for qid in sorted(self.pending):
            values.update(self.pending[qid])
        return values


@dataclass
class Plan:
    feed: Feed
    rows_read: int = 0
    planned: list[Planned] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # rows not enqueued, and why
    state: dict[str, EntityState] = field(default_factory=dict)
    cursor: Cursor | None = None
    settled: dict[str, int] = field(default_factory=dict)  # pending rows now sent / not delivered
    note: str | None = None

    @property
    def markers(self) -> int:
        return sum(1 for p in self.planned if p.marker)


QUEUE_COLUMNS = ("kind", "user_id", "device_id", "event_type", "event_time", "insert_id",
                 "group_type", "group_value", "properties", "extra")  # fmt: skip


def _queue_row(**values: Any) -> dict[str, Any]:
    return {c: values.get(c) for c in QUEUE_COLUMNS}


class _Payloads:
    """payloads.Builder, fed the same rows the queue will hold."""

    def __init__(self, s: Settings, now: datetime) -> None:
        self.s, self.now = s, now
        self.builders: dict[str, payloads.Builder] = {}

    def build(self, row: dict[str, Any]) -> tuple[dict | None, str | None]:
        endpoint = payloads.endpoint_for(row["kind"], self.s.event_api, self.s.identify_api)
        if endpoint not in self.builders:
            self.builders[endpoint] = payloads.Builder(
                endpoint, self.s.min_id_length, self.s.max_future_seconds, self.now
            )
        # The queue assigns id and created_at on insert; an identify row's insert_id and time
        # derive from them, so preview shows those two as they would be if written now.
        r = payloads.Row(id=0, attempts=0, created_at=self.now, **row)
        try:
            payload = self.builders[endpoint].payload(r)
            orjson.dumps(payload)
        except payloads.RowError as exc:
            return None, str(exc)
        except TypeError:
            return None, "a value is not valid UTF-8 text"
        return payload, None


def _ops(changes: dict[str, Any]) -> dict[str, dict]:
    ops: dict[str, dict] = {}
    sets = {k: v for k, v in changes.items() if v is not None}
    unsets = {k: UNSET for k, v in changes.items() if v is None}
    if sets:
        ops["$set"] = sets
    if unsets:
        ops["$unset"] = unsets
    return ops


def plan_entities(feed: Feed, source: SourceRows, state: dict[str, EntityState],
                  build: _Payloads) -> Plan:  # fmt: skip
    """identify / group_identify: one row per id whose mapped properties changed."""
    plan = Plan(feed, rows_read=len(source.rows), state=state)
    cols = _Columns(feed, source.columns)
    prop_index = {prop: cols.find(column, f"properties.{column}")
                  for column, prop in feed.properties.items()}  # fmt: skip
    if feed.kind == "group_identify":
        id_index = {"group_value": cols.find(feed.group_value, "group_value")}
    else:
        id_index = {c: cols.find(getattr(feed, c), c) for c in ("user_id", "device_id")
                    if getattr(feed, c)}  # fmt: skip
    current: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    duplicates: dict[str, int] = {}
    for number, record in enumerate(source.rows, 1):
        ids = {c: _id_text(record[i]) for c, i in id_index.items()}
        if feed.kind == "group_identify":
            key = ids["group_value"]
        else:
            key = ids.get("user_id") or (
                f"@device:{ids['device_id']}" if ids.get("device_id") else None
            )
        if not key:
            names = " and ".join(getattr(feed, c) for c in id_index)
            plan.invalid.append(f"result row {number}: {names} is NULL or empty")
            continue
        if key in current or key in duplicates:
            duplicates[key] = duplicates.get(key, 1) + 1
            current.pop(key, None)
            continue
        values = {prop: plain(record[i]) for prop, i in prop_index.items()}
        if feed.null == "skip":
            values = {p: v for p, v in values.items() if v is not None}
        current[key] = (ids, values)
    for key, count in duplicates.items():
        plan.invalid.append(f"{_shown(key)}: appears in {count} rows of the result; each id must "
                            "appear once, so none of them is sent")  # fmt: skip

    def add(key: str, ids: dict[str, Any], changes: dict[str, Any], baseline: dict) -> None:
        if feed.kind == "group_identify":
            row = _queue_row(kind="group_identify", group_type=feed.group_type,
                             group_value=ids["group_value"],
                             properties=orjson.dumps(_ops(changes)).decode())  # fmt: skip
        else:
            row = _queue_row(kind="identify", user_id=ids.get("user_id"),
                             device_id=ids.get("device_id"),
                             properties=orjson.dumps(_ops(changes)).decode())  # fmt: skip
        payload, error = build.build(row)
        if error:
            plan.invalid.append(f"{_shown(key)}: {error}")
            return
        planned = Planned(key, row, payload, changes={
            p: Change(baseline.get(p), v, p in baseline) for p, v in changes.items()
        })  # fmt: skip
        if feed.marker_event:
            planned.marker = _queue_row(
                kind="event", user_id=row["user_id"], device_id=row["device_id"],
                event_type=feed.marker_event,
                properties=orjson.dumps({"feed": feed.name}).decode(),
                # The event carries the new values itself, so charts show them at once.
                extra=orjson.dumps({"user_properties": _ops(changes)}).decode(),
            )  # fmt: skip
            planned.marker_payload, _ = build.build(planned.marker)
        plan.planned.append(planned)

    for key, (ids, values) in current.items():
        baseline = state[key].baseline() if key in state else {}
        changes = {p: v for p, v in values.items() if p not in baseline or not _same(baseline[p], v)}
        if changes:
            add(key, ids, changes, baseline)
    if feed.deleted == "unset":
        gone = [k for k in state if k not in current and k not in duplicates]
        if gone and not source.rows:
            plan.note = (f"the result is empty: not unsetting the properties of {len(gone)} ids "
                         "(an empty result is more likely a broken source than every id gone)")  # fmt: skip
        elif gone:
            for key in gone:
                baseline = state[key].baseline()
                changes = {p: None for p, v in baseline.items() if v is not None}
                if changes:
                    add(key, _ids_of(feed, key), changes, baseline)
    return plan


def _ids_of(feed: Feed, key: str) -> dict[str, Any]:
    if feed.kind == "group_identify":
        return {"group_value": key}
    if key.startswith("@device:"):
        return {"device_id": key.removeprefix("@device:")}
    return {"user_id": key}


def _shown(key: str) -> str:
    return repr(key.removeprefix("@device:"))


def plan_events(feed: Feed, source: SourceRows, cursor: Cursor, build: _Payloads) -> Plan:
    """event: every row past the cursor once; insert_id from the business-key columns."""
    plan = Plan(feed, rows_read=len(source.rows))
    cols = _Columns(feed, source.columns)
    cursor_i = cols.find(feed.cursor, "cursor")
    key_i = [cols.find(c, "insert_id") for c in feed.insert_id]
    id_i = {c: cols.find(getattr(feed, c), c) for c in ("user_id", "device_id") if getattr(feed, c)}
    type_i = cols.find(feed.event_type_column, "event_type_column") if feed.event_type_column else None
    time_i = cols.find(feed.time, "time") if feed.time else None
    prop_i = {p: cols.find(c, f"properties.{c}") for c, p in feed.properties.items()}
    field_i = {f: cols.find(c, f"fields.{c}") for c, f in feed.fields.items()}

    overlap = feed.cursor_mode == "overlap"
    lower = None
    if overlap and cursor.position is not None:
        lower, _ = _cursor_value(cursor.lower_bound(feed.overlap or 0))
    top = cursor.position if overlap else None
    text_sep = cursor.text_sep
    window: list[tuple[Any, str]] = []  # (cursor value, insert_id) read this run
    taken: set[str] = set()
    for number, record in enumerate(source.rows, 1):
        position, sep = _cursor_value(record[cursor_i])
        if position is None:
            plan.invalid.append(f"result row {number}: cursor column {feed.cursor} is NULL or "
                                "not a number or date/time")  # fmt: skip
            continue
        # Bounds again in Python: a procedure may ignore its `after`/`before` parameters.
        try:
            if overlap:
                if lower is not None and position < lower:
                    continue
            elif position <= (cursor.position or 0) or position >= source.bound:
                continue
        except TypeError:
            raise FeedError(f"{feed.where('cursor')}: column {feed.cursor} changed type "
                            f"(stored cursor {cursor.position!r}, now {position!r})") from None  # fmt: skip
        key_values = [record[i] for i in key_i]
        if any(v is None for v in key_values):
            plan.invalid.append(f"result row {number}: insert_id column "
                                f"{feed.insert_id[key_values.index(None)]} is NULL")  # fmt: skip
            continue
        insert_id = _insert_id(feed, key_values)
        if overlap:
            window.append((position, insert_id))
            if top is None or position > top:
                top, text_sep = position, sep or text_sep
            if insert_id in cursor.seen:
                continue  # enqueued by an earlier run; the overlap read it again
        if insert_id in taken:
            continue  # the same business key twice in one read: one event
        taken.add(insert_id)
        ids = {c: _id_text(record[i]) for c, i in id_i.items()}
        error = None
        try:
            event_time = _utc_naive(record[time_i]) if time_i is not None else None
        except ValueError as exc:
            event_time, error = None, f"time column {feed.time} {exc}"
        props = {p: plain(record[i]) for p, i in prop_i.items()}
        extra = {f: plain(record[i]) for f, i in field_i.items()}
        props = {p: v for p, v in props.items() if v is not None}
        extra = {f: v for f, v in extra.items() if v is not None}
        event_type = feed.event_type if type_i is None else _id_text(record[type_i])
        row = _queue_row(kind="event", user_id=ids.get("user_id"), device_id=ids.get("device_id"),
                         event_type=event_type, event_time=event_time, insert_id=insert_id,
                         properties=orjson.dumps(props).decode() if props else None,
                         extra=orjson.dumps(extra).decode() if extra else None)  # fmt: skip
        payload, build_error = build.build(row)
        plan.planned.append(Planned(insert_id, row, payload, error=error or build_error))
    if overlap:
        if top is None:
            plan.cursor = Cursor(cursor.position, set(cursor.seen), cursor.text_sep)
        else:
            start, _ = _cursor_value(Cursor(top, text_sep=text_sep).lower_bound(feed.overlap or 0))
            plan.cursor = Cursor(top, {i for p, i in window if p >= start}, text_sep)
    else:
        # Everything below the bound has finished and was read: the next run starts there.
        plan.cursor = Cursor(max(source.bound - 1, cursor.position or 0))
    return plan


def _insert_id(feed: Feed, values: list[Any]) -> str:
    """Stable across runs: the feed name and the business key; hashed if it would not fit."""
    joined = ":".join(_id_text(v) or "" for v in values)
    candidate = f"{feed.name}:{joined}"
    if len(candidate) <= 255:
        return candidate
    return f"{feed.name}:sha1:{hashlib.sha1(joined.encode()).hexdigest()}"


# --- state of identify / group_identify feeds --------------------------------------------------


def _state_select(ft: FeedTables, feed_name: str):
    t = ft.state
    return select(t.c.entity, t.c.accepted, t.c.pending).where(t.c.feed == feed_name)


def _status_select(ft: FeedTables, ids: list[int]):
    return select(ft.queue.c.id, ft.queue.c.status).where(ft.queue.c.id.in_(ids))


def _state_update(ft: FeedTables):
    t = ft.state
    return (
        update(t)
        .where(t.c.feed == bindparam("b_feed"), t.c.entity == bindparam("b_entity"))
        .values(accepted=bindparam("b_accepted"), pending=bindparam("b_pending"),
                updated_at=utcnow())
    )  # fmt: skip


def _state_insert(ft: FeedTables):
    t = ft.state
    return insert(t).values(feed=bindparam("b_feed"), entity=bindparam("b_entity"),
                            accepted=bindparam("b_accepted"), pending=bindparam("b_pending"))  # fmt: skip


def _take_turn(ft: FeedTables, feed_name: str, version: int):
    """This run's turn: locks the feed's row until commit; matches nothing when another run
    committed since this one read the cursor."""
    f = ft.feeds
    return (
        update(f)
        .where(f.c.feed == feed_name, f.c.version == version)
        .values(version=f.c.version + 1)
    )


def load_state(conn: Connection, ft: FeedTables, feed: Feed) -> tuple[dict[str, EntityState],
                                                                       dict[str, int]]:  # fmt: skip
    """The feed's state, with rows that were pending settled from the queue table: the changes
    of a `sent` row become accepted; a `failed` (or vanished) row's are forgotten, so the next
    plan enqueues them again. Returns the state and how many rows were settled each way."""
    state: dict[str, EntityState] = {}
    for entity, accepted, pending in conn.execute(_state_select(ft, feed.name)):
        state[entity] = EntityState(
            accepted=orjson.loads(accepted) if accepted else {},
            pending={int(k): v for k, v in orjson.loads(pending).items()} if pending else {},
            exists=True,
        )
    waiting = sorted({qid for s in state.values() for qid in s.pending})
    status: dict[int, str] = {}
    for start in range(0, len(waiting), 1000):  # within SQL Server's 2100 parameters
        chunk = waiting[start : start + 1000]
        status.update(conn.execute(_status_select(ft, chunk)).all())
    settled = {"sent": 0, "not_delivered": 0}
    for s in state.values():
        for qid in sorted(s.pending):
            st = status.get(qid)
            if st in ("pending", "in_flight"):
                continue
            changes = s.pending.pop(qid)
            s.dirty = True
            if st == "sent":
                s.accepted.update(changes)
                settled["sent"] += 1
            else:
                settled["not_delivered"] += 1
    return state, settled


def _write_state(conn: Connection, ft: FeedTables, feed: Feed,
                 state: dict[str, EntityState]) -> None:  # fmt: skip
    def values(s: EntityState) -> dict[str, Any]:
        return {
            "b_accepted": orjson.dumps(s.accepted).decode(),
            "b_pending": orjson.dumps({str(k): v for k, v in s.pending.items()}).decode()
            if s.pending else None,
        }  # fmt: skip

    changed = [(k, s) for k, s in state.items() if s.dirty and s.exists]
    new = [(k, s) for k, s in state.items() if s.dirty and not s.exists]
    if changed:
        conn.execute(_state_update(ft),
                     [{"b_feed": feed.name, "b_entity": k, **values(s)} for k, s in changed])  # fmt: skip
    if new:
        conn.execute(_state_insert(ft),
                     [{"b_feed": feed.name, "b_entity": k, **values(s)} for k, s in new])  # fmt: skip


# --- run and preview ---------------------------------------------------------------------------


@dataclass
class RunResult:
    feed: str
    kind: str
    rows_read: int = 0
    rows_enqueued: int = 0
    markers_enqueued: int = 0
    failed_enqueued: int = 0  # event rows Amplitude would refuse, enqueued as failed
    invalid: int = 0
    errors: list[str] = field(default_factory=list)
    settled: dict[str, int] = field(default_factory=dict)
    first_id: int | None = None
    last_id: int | None = None
    cursor: str | None = None
    note: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"feed {self.feed} ({self.kind}): read {_n(self.rows_read, 'row')}, enqueued "
                 f"{self.rows_enqueued}"]  # fmt: skip
        if self.first_id is not None:
            parts[0] += f" (queue ids {self.first_id}–{self.last_id})"
        if self.markers_enqueued:
            parts.append(_n(self.markers_enqueued, "marker event"))
        if self.failed_enqueued:
            parts.append(f"{_n(self.failed_enqueued, 'invalid event')} enqueued as failed")
        if self.invalid:
            parts.append(f"{_n(self.invalid, 'row')} not sent (invalid)")
        if self.settled.get("not_delivered"):
            parts.append(f"{_n(self.settled['not_delivered'], 'earlier row')} not delivered, "
                         "enqueued again where still changed")  # fmt: skip
        return "; ".join(parts) + f" in {self.seconds:.2f} s"


class FeedRunner:
    """Runs and previews feeds against the queue database of `settings`."""

    def __init__(self, settings: Settings, engine: Engine | None = None,
                 tables: QueueTables | None = None) -> None:  # fmt: skip
        self.s = settings
        self.tables = tables or queue.define_tables(settings.queue_table)
        self.ft = FeedTables.of(self.tables)
        self.engine = engine or source_engine(settings.database_url)

    def _source(self, feed: Feed) -> Engine:
        return self.engine if feed.source_url == self.s.database_url else source_engine(feed.source_url)

    def _prepare(self, feed: Feed) -> tuple[int, Cursor]:
        """Make sure the feed has its row; return its version and cursor."""
        f = self.ft.feeds
        with self.engine.connect() as conn:
            with conn.begin():
                check_tables(conn, self.ft)
                row = conn.execute(select(f.c.version, f.c.cursor_value, f.c.seen)
                                   .where(f.c.feed == feed.name)).first()  # fmt: skip
            if row is None:
                try:
                    with conn.begin():
                        conn.execute(insert(f).values(feed=feed.name, version=0))
                except IntegrityError:
                    pass  # another run created it
                with conn.begin():
                    row = conn.execute(select(f.c.version, f.c.cursor_value, f.c.seen)
                                       .where(f.c.feed == feed.name)).one()  # fmt: skip
        return row[0], Cursor.from_row(row[1], row[2])

    def _plan(self, conn: Connection, feed: Feed, source: SourceRows, cursor: Cursor) -> Plan:
        build = _Payloads(self.s, conn.execute(select(utcnow())).scalar_one())
        if feed.kind == "event":
            return plan_events(feed, source, cursor, build)
        state, settled = load_state(conn, self.ft, feed)
        plan = plan_entities(feed, source, state, build)
        plan.settled = settled
        return plan

    def preview(self, feed: Feed) -> Plan:
        """What the next run would enqueue; writes nothing."""
        _, cursor = self._prepare(feed)
        source = read_source(feed, self._source(feed), cursor)
        with self.engine.connect() as conn:
            transaction = conn.begin()
            try:
                return self._plan(conn, feed, source, cursor)
            finally:
                transaction.rollback()  # settling pending rows is only shown, never written

    def run(self, feed: Feed) -> RunResult:
        """Read the source and enqueue what changed, in one transaction with the feed's state
        (and cursor). A failure enqueues nothing and is recorded for `ampsync feed list`."""
        started = time.monotonic()
        try:
            version, cursor = self._prepare(feed)
            source = read_source(feed, self._source(feed), cursor)
            with self.engine.begin() as conn:
                result = self._apply(conn, feed, version, source, cursor)
        except FeedConflict:
            raise
        except FeedError as exc:
            self._record_error(feed, str(exc))
            raise
        except SQLAlchemyError as exc:
            message = f"feed {feed.name}: " + queue.describe_db_error(exc, self.s.database_url)
            self._record_error(feed, message)
            raise FeedError(message) from None
        result.seconds = time.monotonic() - started
        return result

    def _apply(self, conn: Connection, feed: Feed, version: int, source: SourceRows,
               cursor: Cursor) -> RunResult:  # fmt: skip
        f = self.ft.feeds
        if conn.execute(_take_turn(self.ft, feed.name, version)).rowcount != 1:
            raise FeedConflict(f"feed {feed.name}: another run of this feed finished while this "
                               "one read its source; nothing enqueued (the next run goes on)")  # fmt: skip
        plan = self._plan(conn, feed, source, cursor)
        result = RunResult(feed.name, feed.kind, rows_read=plan.rows_read, settled=plan.settled,
                           note=plan.note)  # fmt: skip
        ids = _insert_returning_ids(conn, self.ft.queue, [p.row for p in plan.planned])
        if ids:
            result.first_id, result.last_id = ids[0], ids[-1]
        failed = [(qid, p.error) for qid, p in zip(ids, plan.planned, strict=True) if p.error]
        for qid, error in failed:
            conn.execute(update(self.ft.queue).where(self.ft.queue.c.id == qid)
                         .values(status=queue.FAILED, last_error=f"{INVALID} {error}"[:2000]))  # fmt: skip
        markers = [p.marker for p in plan.planned if p.marker]
        if markers:
            queue.insert_rows(conn, self.tables, markers)
        if feed.kind != "event":
            for qid, planned in zip(ids, plan.planned, strict=True):
                s = plan.state.setdefault(planned.key, EntityState())
                s.pending[qid] = {p: c.new for p, c in planned.changes.items()}
                s.dirty = True
            _write_state(conn, self.ft, feed, plan.state)
        result.rows_enqueued = len(ids)
        result.failed_enqueued = len(failed)
        result.markers_enqueued = len(markers)
        result.invalid = len(plan.invalid)
        result.errors = plan.invalid[:MAX_SHOWN_ERRORS] + [
            f"{p.key}: {p.error} (enqueued as failed)" for p in plan.planned if p.error
        ][:MAX_SHOWN_ERRORS]
        values: dict[str, Any] = dict(last_run_at=utcnow(), last_error=None)
        if plan.cursor is not None:
            values.update(cursor_value=plan.cursor.to_json(),
                          seen=orjson.dumps(sorted(plan.cursor.seen)).decode()
                          if plan.cursor.seen else None)  # fmt: skip
            result.cursor = values["cursor_value"]
        summary = {k: v for k, v in result.as_dict().items() if k != "errors"}
        values["last_result"] = orjson.dumps(summary).decode()
        conn.execute(update(f).where(f.c.feed == feed.name).values(**values))
        return result

    def _record_error(self, feed: Feed, message: str) -> None:
        f = self.ft.feeds
        try:
            with self.engine.begin() as conn:
                conn.execute(update(f).where(f.c.feed == feed.name)
                             .values(last_run_at=utcnow(), last_error=message[:2000]))  # fmt: skip
        except SQLAlchemyError:
            pass  # the queue database itself is the problem; the raised error says so

    def status(self) -> dict[str, dict]:
        """The last run of every feed that has run, by name."""
        f = self.ft.feeds
        with self.engine.connect() as conn, conn.begin():
            check_tables(conn, self.ft)
            rows = conn.execute(select(f.c.feed, f.c.last_run_at, f.c.last_result,
                                           f.c.last_error, f.c.cursor_value)).all()  # fmt: skip
        return {
            name: {"last_run_at": at, "last_result": orjson.loads(res) if res else None,
                   "last_error": err, "cursor": cur}
            for name, at, res, err, cur in rows
        }  # fmt: skip


def review_statements(feed: Feed, tables: QueueTables, dialect) -> dict[str, str]:
    """Every statement a run of `feed` executes, as `dialect` compiles it (for a DBA's review
    and for tests that parse them)."""
    ft = FeedTables.of(tables)

    def sql(statement, literal: bool = True) -> str:
        kwargs = {"compile_kwargs": {"literal_binds": True}} if literal else {}
        return str(statement.compile(dialect=dialect, **kwargs)).strip()

    bounds = {"after": 0, "before": 1000} if feed.kind == "event" else {}
    if feed.cursor_mode == "overlap":
        bounds = {"after": 0}
    source = source_statement(feed, dialect)
    out = {"source": sql(source.bindparams(**bounds, **feed.params))}
    if feed.kind == "event" and feed.cursor_mode in _BOUND_SQL:
        out["bound"] = _BOUND_SQL[feed.cursor_mode]
    f = ft.feeds
    out.update({
        "take_turn": sql(_take_turn(ft, feed.name, 7)),
        "cursor": sql(update(f).where(f.c.feed == feed.name).values(
            cursor_value='{"value": 1}', seen=None, last_run_at=utcnow(), last_error=None,
            last_result="{}")),
        "state": sql(_state_select(ft, feed.name)),
        "queue_status": sql(_status_select(ft, [1, 2, 3])),
        "state_update": sql(_state_update(ft), literal=False),
        "state_insert": sql(_state_insert(ft), literal=False),
        "enqueue": sql(insert(ft.queue).values({c: bindparam(c) for c in QUEUE_COLUMNS})
                       .returning(ft.queue.c.id), literal=False),
    })  # fmt: skip
    return out


def _insert_returning_ids(conn: Connection, table: Table, rows: list[dict]) -> list[int]:
    """Insert rows and return their ids in order (a pending change is remembered by its row)."""
    if not rows:
        return []
    if conn.dialect.insert_executemany_returning_sort_by_parameter_order:
        statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        return list(conn.execute(statement, rows).scalars())
    return [conn.execute(insert(table), row).inserted_primary_key[0] for row in rows]


# --- entry points for the CLI and the Celery task ----------------------------------------------


def config_for(s: Settings) -> FeedsConfig:
    return load_config(s.feeds_file, s.database_url)


def run_feed(s: Settings, name: str, engine: Engine | None = None) -> RunResult:
    return FeedRunner(s, engine).run(config_for(s).get(name))


def render_preview(plan: Plan, limit: int | None = None, diff: bool = False) -> str:
    feed = plan.feed
    shown = plan.planned if limit is None else plan.planned[:limit]
    out = [f"feed {feed.name} ({feed.kind}) from {mask_url(feed.source_url)}",
           f"the next run would enqueue {_n(len(plan.planned), 'row')}"
           + (f" and {_n(plan.markers, 'marker event')}" if plan.markers else "")
           + f" from {_n(plan.rows_read, 'row')} read; {len(plan.invalid)} invalid"]  # fmt: skip
    if plan.settled.get("sent") or plan.settled.get("not_delivered"):
        out.append(f"earlier rows since confirmed: {plan.settled.get('sent', 0)} sent, "
                   f"{plan.settled.get('not_delivered', 0)} not delivered")  # fmt: skip
    if plan.note:
        out.append(f"note: {plan.note}")
    for n, p in enumerate(shown, 1):
        out.append("")
        out.append(f"{n}. {_shown(p.key) if feed.kind != 'event' else p.key}")
        if diff and p.changes:
            for prop, c in p.changes.items():
                old = _fmt(c.old) if c.known else "(never sent)"
                new = "(unset)" if c.new is None else _fmt(c.new)
                out.append(f"   {prop}: {old} → {new}")
        else:
            out.append(f"   queue row: {_json(_shown_row(p.row))}")
            if p.error:
                out.append(f"   invalid, would be enqueued as failed: {p.error}")
            else:
                out.append(f"   payload:   {_json(_shown_payload(p.payload, p.row))}")
            if p.marker_payload:
                out.append(f"   marker:    {_json(_shown_payload(p.marker_payload, p.marker))}")
    if len(shown) < len(plan.planned):
        out.append(f"\n… {len(plan.planned) - len(shown)} more rows (--limit)")
    errors = plan.invalid + [f"{p.key}: {p.error}" for p in plan.planned if p.error]
    if errors:
        out.append("\nvalidation errors:")
        out.extend(f"  {e}" for e in errors)
    return "\n".join(out)


def plan_as_dict(plan: Plan, limit: int | None = None) -> dict:
    shown = plan.planned if limit is None else plan.planned[:limit]
    return {
        "feed": plan.feed.name, "kind": plan.feed.kind, "rows_read": plan.rows_read,
        "rows": len(plan.planned), "markers": plan.markers, "note": plan.note,
        "settled": plan.settled,
        "planned": [{"key": p.key, "row": _shown_row(p.row), "error": p.error,
                     "payload": _shown_payload(p.payload, p.row) if p.payload else None,
                     "marker": _shown_payload(p.marker_payload, p.marker)
                     if p.marker_payload else None,
                     "diff": {k: {"old": c.old, "new": c.new, "known": c.known}
                              for k, c in p.changes.items()}} for p in shown],
        "errors": plan.invalid + [f"{p.key}: {p.error}" for p in plan.planned if p.error],
    }  # fmt: skip


ASSIGNED_ON_ENQUEUE = "(assigned when enqueued)"


def _shown_payload(payload: dict | None, row: dict | None) -> dict | None:
    """Fields that derive from the queue row's id and created_at are unknown before insert."""
    if payload is None or row is None:
        return payload
    shown = dict(payload)
    if "insert_id" in shown and not row.get("insert_id"):
        shown["insert_id"] = ASSIGNED_ON_ENQUEUE
    if "time" in shown and not row.get("event_time"):
        shown["time"] = ASSIGNED_ON_ENQUEUE
    return shown


def _shown_row(row: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()
            if v is not None}  # fmt: skip


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _fmt(value: Any) -> str:
    return "(unset)" if value is None else _json(value)


def describe(feed: Feed) -> str:
    what = f"procedure {feed.procedure}" if feed.procedure else "query"
    every = f"every {feed.schedule:g} s" if feed.schedule else "manual (no schedule)"
    return f"{feed.name}: {feed.kind} from {what} on {mask_url(feed.source_url)}, {every}"


__all__ = [
    "Feed", "FeedsConfig", "FeedError", "FeedConfigError", "FeedConflict", "FeedRunner",
    "FeedTables", "Plan", "RunResult", "load_config", "parse_config", "define_feed_tables",
    "source_statement", "run_feed", "render_preview", "plan_as_dict", "config_for",
]  # fmt: skip
