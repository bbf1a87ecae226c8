"""The feeds file: `[feeds.NAME]` tables parsed into Feed, every problem reported at once with
the file, line and key it is about (tomllib keeps no positions, so `_key_lines` finds them)."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .. import redact
from ..amplitude.limits import COLUMN_FIELDS, RESERVED_EVENT_TYPES
from ..outcomes import KINDS
from .errors import FeedConfigError, FeedError

NULL_MODES = ("unset", "skip")
DELETED_MODES = ("keep", "unset")
CURSOR_MODES = ("rowversion", "xid", "overlap")
# The cursor mode a source gets unless the feed names one.
DEFAULT_CURSOR_MODE = {"mssql": "rowversion", "postgresql": "xid"}

_COMMON_KEYS = {"kind", "query", "procedure", "params", "source_url", "schedule", "properties"}
ALLOWED_KEYS = {
    "identify": _COMMON_KEYS | {"user_id", "device_id", "null", "deleted", "marker_event"},
    "group_identify": _COMMON_KEYS | {"group_type", "group_value", "null", "deleted"},
    "event": _COMMON_KEYS
    | {
        "user_id",
        "device_id",
        "event_type",
        "event_type_column",
        "time",
        "insert_id",
        "cursor",
        "cursor_mode",
        "overlap",
        "fields",
    },
}
_ALL_KEYS = set().union(*ALLOWED_KEYS.values())
# Event fields a column may fill through `[feeds.NAME.fields]` (docs/amplitude.md).
EVENT_FIELDS = frozenset(
    [
        "app_version",
        "platform",
        "os_name",
        "os_version",
        "device_brand",
        "device_manufacturer",
        "device_model",
        "carrier",
        "country",
        "region",
        "city",
        "dma",
        "language",
        "location_lat",
        "location_lng",
        "ip",
        "idfa",
        "idfv",
        "adid",
        "android_id",
        "android_app_set_id",
        "user_agent",
        "price",
        "quantity",
        "revenue",
        "productId",
        "revenueType",
        "currency",
        "session_id",
        "event_id",
    ]
)
_FEED_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_PROCEDURE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,2}$")
_PARAM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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

    def __repr__(self) -> str:
        # A feed ends up in tracebacks and debug logs: its source URL without the password.
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        values["source_url"] = redact.url(self.source_url)
        return f"Feed({', '.join(f'{name}={value!r}' for name, value in values.items())})"

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


def load_config(path: str | os.PathLike[str], default_source_url: str) -> FeedsConfig:
    """Read and validate the feeds file; a missing file means no feeds."""
    p = Path(path)
    if not p.exists():
        return FeedsConfig(str(path), {})
    try:
        source = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FeedConfigError([f"{path}: cannot read the feeds file: {exc}"]) from None
    return parse_config(source, default_source_url, str(path))


def parse_config(
    source: str,
    default_source_url: str,
    path: str = "ampsync-feeds.toml",
    environ: dict[str, str] | None = None,
) -> FeedsConfig:
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        located = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if located:
            message = message[: located.start()].strip()
            raise FeedConfigError(
                [f"{path}:{located.group(1)}: invalid TOML: {message} (column {located.group(2)})"]
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
            problems.append(
                f"{at((key,))}: unknown top-level key; feeds are declared as [feeds.NAME] tables"
            )
    feeds_table = data.get("feeds", {})
    if not isinstance(feeds_table, dict):
        problems.append(f"{at(('feeds',))}: must be a table of feeds ([feeds.NAME])")
        feeds_table = {}
    feeds: dict[str, Feed] = {}
    env = os.environ if environ is None else environ
    for name, table in feeds_table.items():
        errors: list[str] = []

        def bad(
            key: str | None, message: str, name: str = name, errors: list[str] = errors
        ) -> None:
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


def _replace(feed: Feed, **changes: Any) -> Feed:
    return Feed(**{**{k: getattr(feed, k) for k in Feed.__dataclass_fields__}, **changes})


def _validate_feed(
    name: str,
    t: dict[str, Any],
    bad: Callable[[str | None, str], None],
    default_source_url: str,
    env: Mapping[str, str],
) -> Feed | None:
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

    def mapping(key: str, check_value: Callable[[str], str | None]) -> dict[str, str]:
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
                bad(
                    "source_url",
                    f"refers to ${{{missing[0]}}}, which is not set in the environment",
                )
            else:
                expanded = _ENV_REF.sub(lambda m: env[m.group(1)], raw_url)
                try:
                    make_url(expanded)
                    source_url = expanded
                except ArgumentError:
                    bad(
                        "source_url",
                        "is not a SQLAlchemy URL, e.g. mssql+pymssql://user:pw@host:1433/crm",
                    )
    try:
        dialect = make_url(source_url).get_backend_name()
    except ArgumentError:
        dialect = ""
    query, procedure = string("query"), string("procedure")
    if "query" not in t and "procedure" not in t:
        bad(None, 'needs query = "SELECT …" or procedure = "dbo.name"')
    elif "query" in t and "procedure" in t:
        bad("procedure", "a feed has a query or a procedure, not both")
    if procedure is not None:
        if not _PROCEDURE.match(procedure):
            bad(
                "procedure",
                "must be a procedure name such as dbo.crm_segments (parameters go "
                "in [feeds.NAME.params])",
            )
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
            bad(
                f"params.{pname}",
                "must be a parameter name of letters, digits and _ (after "
                "and before are the cursor's)",
            )
        elif not isinstance(pvalue, str | int | float | bool):
            bad(f"params.{pname}", "must be a string, number or boolean")
    schedule = t.get("schedule")
    if schedule is not None and (
        isinstance(schedule, bool)
        or not isinstance(schedule, int | float)
        or not 0 < schedule <= 7 * 86400
    ):
        bad("schedule", "must be seconds between runs, above 0 and at most a week")
        schedule = None

    # Mapping
    def property_name(target: str) -> str | None:
        return "property names cannot start with $" if target.startswith("$") else None

    props = mapping("properties", property_name)
    if kind != "event" and "properties" not in t:
        bad(
            None,
            f"[feeds.{name}.properties] is missing: map columns to property names, "
            'e.g. SEGMENT = "CRM_Segment"',
        )
    elif kind != "event" and t["properties"] == {}:
        bad("properties", "is empty: map at least one column to a property name")
    seen_targets: dict[str, str] = {}
    for column, target in props.items():
        if target in seen_targets:
            bad(
                f"properties.{column}",
                f"property {target!r} is already filled by column {seen_targets[target]}",
            )
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
    if marker and marker in RESERVED_EVENT_TYPES:
        bad("marker_event", f"{marker!r} is reserved by Amplitude")

    event_type = string("event_type")
    event_type_column = string("event_type_column")
    insert_id: tuple[str, ...] = ()
    cursor_mode = t.get("cursor_mode")
    overlap = t.get("overlap")
    fields = {}
    if kind == "event":
        if (event_type is None) == (event_type_column is None):
            bad(None, 'needs event_type = "Order Picked Up" or event_type_column = "column"')
        elif event_type in RESERVED_EVENT_TYPES:
            bad("event_type", f"{event_type!r} is reserved by Amplitude")
        raw_ids = t.get("insert_id")
        if isinstance(raw_ids, str):
            raw_ids = [raw_ids]
        if raw_ids is None:
            bad(
                None,
                "insert_id is missing: the business-key columns that identify an event "
                '(e.g. insert_id = ["order_id"]), so a re-read never duplicates it',
            )
        elif (
            not isinstance(raw_ids, list)
            or not raw_ids
            or not all(isinstance(c, str) and c.strip() for c in raw_ids)
        ):
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
                bad(
                    None,
                    "overlap is missing: seconds (timestamp cursor) or ids (id cursor) "
                    "re-read each run, longer than your longest write transaction",
                )
            elif isinstance(overlap, bool) or not isinstance(overlap, int | float) or overlap < 0:
                bad("overlap", "must be a number of seconds or ids, 0 or more")
        elif overlap is not None:
            bad(
                "overlap",
                f'is only for cursor_mode = "overlap"; {cursor_mode} cursors never need one',
            )

        def event_field(target: str) -> str | None:
            if target in EVENT_FIELDS:
                return None
            if target in COLUMN_FIELDS or target in ("user_properties", "groups"):
                return f"{target} is filled by the feed itself, not by fields"
            hint = difflib.get_close_matches(target, sorted(EVENT_FIELDS), n=1)
            return f"{target!r} is not an Amplitude event field" + (
                f" (did you mean {hint[0]}?)" if hint else ""
            )

        fields = mapping("fields", event_field)
    return Feed(
        name=name,
        kind=kind,
        source_url=source_url,
        query=query,
        procedure=procedure,
        params=dict(params),
        schedule=float(schedule) if schedule else None,
        properties=props,
        user_id=user_id,
        device_id=device_id,
        group_type=group_type,
        group_value=group_value,
        null=null,
        deleted=deleted,
        marker_event=marker,
        event_type=event_type,
        event_type_column=event_type_column,
        time=string("time"),
        insert_id=insert_id,
        cursor=t.get("cursor") if isinstance(t.get("cursor"), str) else None,
        cursor_mode=cursor_mode if kind == "event" else None,
        overlap=float(overlap) if isinstance(overlap, int | float) and kind == "event" else None,
        fields=fields,
    )


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
