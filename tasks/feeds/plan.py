"""Planning a run: from the rows read and what was sent before, the queue rows to enqueue and
what Amplitude would receive for each. Pure: the runner reads the inputs and writes the
result; preview shows the same plan without writing it.

- identify / group_identify: one row per id whose mapped properties differ from what
  Amplitude holds once the rows on their way are delivered, carrying only those properties.
- event: every row past the cursor once, with a stable insert_id from the business-key
  columns, so a re-read of the overlap window never duplicates an event.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import orjson

from ..amplitude import payloads
from ..db.feeds import QUEUE_COLUMNS
from ..delivery.policy import endpoint_for
from ..settings import Settings
from .config import Feed
from .errors import FeedError
from .source import Columns, Cursor, SourceRows, cursor_value, id_text, plain, utc_naive

UNSET = "-"  # the value Amplitude's `$unset` takes


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


def _queue_row(**values: Any) -> dict[str, Any]:
    return {c: values.get(c) for c in QUEUE_COLUMNS}


class Payloads:
    """payloads.Builder, fed the same rows the queue will hold."""

    def __init__(self, s: Settings, now: datetime) -> None:
        self.s, self.now = s, now
        self.builders: dict[str, payloads.Builder] = {}

    def build(self, row: dict[str, Any]) -> tuple[dict | None, str | None]:
        endpoint = endpoint_for(row["kind"], self.s)
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


def _same(a: Any, b: Any) -> bool:
    return orjson.dumps(a) == orjson.dumps(b)


def plan_entities(
    feed: Feed, source: SourceRows, state: dict[str, EntityState], build: Payloads
) -> Plan:
    """identify / group_identify: one row per id whose mapped properties changed."""
    plan = Plan(feed, rows_read=len(source.rows), state=state)
    cols = Columns(feed, source.columns)
    prop_index = {
        prop: cols.find(column, f"properties.{column}") for column, prop in feed.properties.items()
    }
    if feed.kind == "group_identify":
        assert feed.group_value is not None  # parse_config requires it of group_identify feeds
        id_index = {"group_value": cols.find(feed.group_value, "group_value")}
    else:
        id_index = {
            c: cols.find(getattr(feed, c), c) for c in ("user_id", "device_id") if getattr(feed, c)
        }
    current: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    duplicates: dict[str, int] = {}
    for number, record in enumerate(source.rows, 1):
        ids = {c: id_text(record[i]) for c, i in id_index.items()}
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
        plan.invalid.append(
            f"{shown_key(key)}: appears in {count} rows of the result; each id must "
            "appear once, so none of them is sent"
        )

    def add(key: str, ids: dict[str, Any], changes: dict[str, Any], baseline: dict) -> None:
        if feed.kind == "group_identify":
            row = _queue_row(
                kind="group_identify",
                group_type=feed.group_type,
                group_value=ids["group_value"],
                properties=orjson.dumps(_ops(changes)).decode(),
            )
        else:
            row = _queue_row(
                kind="identify",
                user_id=ids.get("user_id"),
                device_id=ids.get("device_id"),
                properties=orjson.dumps(_ops(changes)).decode(),
            )
        payload, error = build.build(row)
        if error:
            plan.invalid.append(f"{shown_key(key)}: {error}")
            return
        planned = Planned(
            key,
            row,
            payload,
            changes={p: Change(baseline.get(p), v, p in baseline) for p, v in changes.items()},
        )
        if feed.marker_event:
            planned.marker = _queue_row(
                kind="event",
                user_id=row["user_id"],
                device_id=row["device_id"],
                event_type=feed.marker_event,
                properties=orjson.dumps({"feed": feed.name}).decode(),
                # The event carries the new values itself, so charts show them at once.
                extra=orjson.dumps({"user_properties": _ops(changes)}).decode(),
            )
            planned.marker_payload, _ = build.build(planned.marker)
        plan.planned.append(planned)

    for key, (ids, values) in current.items():
        baseline = state[key].baseline() if key in state else {}
        changes = {
            p: v for p, v in values.items() if p not in baseline or not _same(baseline[p], v)
        }
        if changes:
            add(key, ids, changes, baseline)
    if feed.deleted == "unset":
        gone = [k for k in state if k not in current and k not in duplicates]
        if gone and not source.rows:
            plan.note = (
                f"the result is empty: not unsetting the properties of {len(gone)} ids "
                "(an empty result is more likely a broken source than every id gone)"
            )
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


def shown_key(key: str) -> str:
    return repr(key.removeprefix("@device:"))


def plan_events(feed: Feed, source: SourceRows, cursor: Cursor, build: Payloads) -> Plan:
    """event: every row past the cursor once; insert_id from the business-key columns."""
    plan = Plan(feed, rows_read=len(source.rows))
    cols = Columns(feed, source.columns)
    assert feed.cursor is not None  # parse_config requires it of event feeds
    cursor_i = cols.find(feed.cursor, "cursor")
    key_i = [cols.find(c, "insert_id") for c in feed.insert_id]
    id_i = {c: cols.find(getattr(feed, c), c) for c in ("user_id", "device_id") if getattr(feed, c)}
    type_i = (
        cols.find(feed.event_type_column, "event_type_column") if feed.event_type_column else None
    )
    time_i = cols.find(feed.time, "time") if feed.time else None
    prop_i = {p: cols.find(c, f"properties.{c}") for c, p in feed.properties.items()}
    field_i = {f: cols.find(c, f"fields.{c}") for c, f in feed.fields.items()}

    overlap = feed.cursor_mode == "overlap"
    lower = None
    if overlap and cursor.position is not None:
        lower, _ = cursor_value(cursor.lower_bound(feed.overlap or 0))
    top = cursor.position if overlap else None
    text_sep = cursor.text_sep
    window: list[tuple[Any, str]] = []  # (cursor value, insert_id) read this run
    taken: set[str] = set()
    # int or datetime, as the source column holds it: compared below with the cursor, and two of
    # different types (the column changed type) raise the TypeError reported there.
    position: Any
    for number, record in enumerate(source.rows, 1):
        position, sep = cursor_value(record[cursor_i])
        if position is None:
            plan.invalid.append(
                f"result row {number}: cursor column {feed.cursor} is NULL or "
                "not a number or date/time"
            )
            continue
        # Bounds again in Python: a procedure may ignore its `after`/`before` parameters.
        try:
            if overlap:
                if lower is not None and position < lower:
                    continue
            elif position <= (cursor.position or 0) or position >= source.bound:
                continue
        except TypeError:
            raise FeedError(
                f"{feed.where('cursor')}: column {feed.cursor} changed type "
                f"(stored cursor {cursor.position!r}, now {position!r})"
            ) from None
        key_values = [record[i] for i in key_i]
        if any(v is None for v in key_values):
            plan.invalid.append(
                f"result row {number}: insert_id column "
                f"{feed.insert_id[key_values.index(None)]} is NULL"
            )
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
        ids = {c: id_text(record[i]) for c, i in id_i.items()}
        error = None
        try:
            event_time = utc_naive(record[time_i]) if time_i is not None else None
        except ValueError as exc:
            event_time, error = None, f"time column {feed.time} {exc}"
        props = {p: plain(record[i]) for p, i in prop_i.items()}
        extra = {f: plain(record[i]) for f, i in field_i.items()}
        props = {p: v for p, v in props.items() if v is not None}
        extra = {f: v for f, v in extra.items() if v is not None}
        event_type = feed.event_type if type_i is None else id_text(record[type_i])
        row = _queue_row(
            kind="event",
            user_id=ids.get("user_id"),
            device_id=ids.get("device_id"),
            event_type=event_type,
            event_time=event_time,
            insert_id=insert_id,
            properties=orjson.dumps(props).decode() if props else None,
            extra=orjson.dumps(extra).decode() if extra else None,
        )
        payload, build_error = build.build(row)
        plan.planned.append(Planned(insert_id, row, payload, error=error or build_error))
    if overlap:
        if top is None:
            plan.cursor = Cursor(cursor.position, set(cursor.seen), cursor.text_sep)
        else:
            start, _ = cursor_value(Cursor(top, text_sep=text_sep).lower_bound(feed.overlap or 0))
            plan.cursor = Cursor(top, {i for p, i in window if p >= start}, text_sep)
    else:
        # Everything below the bound has finished and was read: the next run starts there.
        # rowversion / xid: read_source read the bound, and the stored cursor is an earlier one
        # (a datetime only if the feed ran with an overlap cursor before; max raises TypeError).
        assert source.bound is not None
        plan.cursor = Cursor(max(source.bound - 1, cast(int, cursor.position or 0)))
    return plan


def _insert_id(feed: Feed, values: list[Any]) -> str:
    """Stable across runs: the feed name and the business key; hashed if it would not fit."""
    joined = ":".join(id_text(v) or "" for v in values)
    candidate = f"{feed.name}:{joined}"
    if len(candidate) <= 255:
        return candidate
    return f"{feed.name}:sha1:{hashlib.sha1(joined.encode()).hexdigest()}"
