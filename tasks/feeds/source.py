"""Reading a feed's source: the rows its query or procedure returns, their values as the JSON
Amplitude receives, and where an event feed's cursor stands. The statements themselves are
built in tasks/db/feeds.py."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ..db import engine as db_engine
from ..db import feeds as db_feeds
from ..settings import mask_url
from .config import Feed
from .errors import FeedError

# --- reading the source ------------------------------------------------------------------------


@dataclass
class SourceRows:
    columns: list[str]
    rows: list[Sequence[Any]]
    bound: int | None = None  # rowversion / xid: everything below it has finished


_engines: dict[str, Engine] = {}


def source_engine(url: str) -> Engine:
    if url not in _engines:
        _engines[url] = db_engine.make_engine(url)
    return _engines[url]


def read_source(feed: Feed, engine: Engine, cursor: Cursor) -> SourceRows:
    what = "procedure" if feed.procedure else "query"
    if feed.kind == "event" and feed.query and not feed.procedure:
        problems = db_feeds.wrapper_problems(feed.query, engine.dialect.name)
        if problems:
            raise FeedError(
                f"{feed.where('query')}: the query runs wrapped as SELECT * FROM (query) AS "
                f"{db_feeds.SOURCE_ALIAS} WHERE <cursor bounds>, where SQL Server refuses it: "
                + "; ".join(problems)
            )
    try:
        with engine.connect() as conn, conn.begin():
            bound = None
            params: dict[str, Any] = dict(feed.params)
            if feed.kind == "event":
                bound = db_feeds.read_bound(conn, feed.cursor_mode)
                if bound is not None:
                    params.update(after=cursor.position or 0, before=bound)
                elif cursor.position is not None or feed.procedure:
                    params["after"] = cursor.lower_bound(feed.overlap or 0)
            statement = db_feeds.source_statement(
                feed, conn.dialect, first_run=cursor.position is None
            )
            result = conn.execute(statement, params)
            if not result.returns_rows:
                raise FeedError(
                    f"{feed.where(what)}: returned no result set (a procedure must "
                    "end with a SELECT; on SQL Server add SET NOCOUNT ON)"
                )
            return SourceRows(list(result.keys()), list(result.fetchall()), bound)
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0][:400]
        raise FeedError(
            f"{feed.where(what)}: the {what} failed on {mask_url(feed.source_url)}: {first}"
        ) from None


class Columns:
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


def id_text(value: Any) -> str | None:
    if value is None:
        return None
    text_value = plain(value)
    return text_value if isinstance(text_value, str) else orjson.dumps(text_value).decode()


def utc_naive(value: Any) -> datetime | None:
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

    position: int | datetime | None = None  # see cursor_value; a textual datetime is parsed
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

    def lower_bound(self, overlap: float) -> int | datetime | str | None:
        """The overlap window's start, in the type the source compares with."""
        value = self.position
        if value is None:
            return None
        if isinstance(value, datetime):
            start = value - timedelta(seconds=overlap)
            return start.isoformat(sep=self.text_sep) if self.text_sep else start
        return value - int(math.ceil(overlap))


def cursor_value(value: Any) -> tuple[int | datetime | None, str | None]:
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
            parsed = utc_naive(stripped)
        except ValueError:
            return None, None
        return parsed, ("T" if "T" in stripped else " ")
    return None, None
