"""Queue rows → Amplitude payloads: validation, mapping and packing into requests.

A row Amplitude could never accept is refused here, with a reason that names the column and
what to change, so it fails alone instead of sinking its batch. Each row is serialized once
(orjson); requests are assembled from those bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import quote_plus

import orjson

from ..outcomes import INVALID
from .limits import (
    COLUMN_FIELDS,
    FORM_ENDPOINTS,
    GROUP_OPERATIONS,
    INVALID_IDS,
    MAX_BYTES,
    MAX_DEPTH,
    MAX_GROUP_PROPERTIES,
    MAX_ITEMS,
    MAX_KEYS,
    MAX_STRING,
    RESERVED_EVENT_TYPES,
    USER_OPERATIONS,
    Endpoint,
)


class RowError(ValueError):
    """A row Amplitude cannot accept; the message says which column and why."""


@dataclass
class Prepared:
    row_id: int
    blob: bytes  # the serialized event or identification
    user_id: str | None
    device_id: str | None
    # What the item adds to a request: bytes on the wire (after URL encoding on the form APIs)
    # and, on /groupidentify, its group properties (that API counts those, not rows).
    size: int = 0
    properties: int = 0
    # Rows merged into this item (several $set-only identify rows of one user): sent as one,
    # acknowledged each.
    also: tuple[int, ...] = ()

    def ids(self) -> tuple[int, ...]:
        return (self.row_id, *self.also) if self.also else (self.row_id,)

    @property
    def wire_size(self) -> int:
        return self.size or len(self.blob)


@dataclass
class Prepare:
    items: list[Prepared] = field(default_factory=list)
    invalid: dict[int, str] = field(default_factory=dict)
    truncated: int = 0


@dataclass
class Row:
    id: int
    kind: str
    user_id: str | None
    device_id: str | None
    event_type: str | None
    event_time: datetime | None
    insert_id: str | None
    group_type: str | None
    group_value: str | None
    properties: str | None
    extra: str | None
    attempts: int
    created_at: datetime
    # Not a column: the bytes of properties and extra as stored, when the load left them out
    # for being over the endpoint's request size (db/queue.py, `load_statement`); else None.
    oversized: int | None = None


# The queue columns a send loads, in Row's order (db/queue.py selects exactly these, then
# `oversized`).
ROW_COLUMNS = tuple(f.name for f in fields(Row))[:-1]
_ROW_FIELDS = len(fields(Row))
# What a request adds around its items (api_key, options): an item may use the rest.
ENVELOPE_BYTES = 200
try:
    _VERSION = version("ampsync")
except PackageNotFoundError:  # run from a checkout that was never installed
    _VERSION = "0"
# Every event says who sent it, as the official SDKs do (docs/amplitude.md, "Sender").
LIBRARY = f"ampsync/{_VERSION}"  # a loaded row may carry more columns after these
_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def row_limit(endpoint: str) -> int:
    """The most bytes one row may take as JSON: one request of the endpoint, less its
    envelope. The load leaves out properties and extra stored larger than this."""
    return MAX_BYTES[endpoint] - ENVELOPE_BYTES


def epoch_ms(value: datetime) -> int:
    """Milliseconds since 1970 of a naive UTC (the queue's columns) or aware datetime.
    Subtraction, not calendar.timegm(utctimetuple()): that was the largest single frame of the
    worker's Python time (bench/README.md, finding 6)."""
    return (value - (_EPOCH if value.tzinfo is None else _EPOCH_UTC)) // _MS


class Builder:
    """Turns rows of one endpoint into serialized items; one per send task."""

    def __init__(
        self, endpoint: str, min_id_length: int, max_future_seconds: int, now: datetime
    ) -> None:
        self.endpoint = endpoint
        self.row_limit = row_limit(endpoint)
        self.min_id_length = min_id_length
        self.max_future_ms = epoch_ms(now) + max_future_seconds * 1000
        self.cuts = 0

    def prepare(self, rows: Sequence[Any]) -> Prepare:
        result = Prepare()
        # Per user (device): the item a following $set-only identify row may merge into, with
        # its payload. Amplitude drops updates of a user updated over 1,800 times an hour
        # (docs/amplitude.md, "Property-update budget"): one update instead of several.
        merging: dict[str, tuple[int, dict[str, Any]]] = {}
        for raw in rows:
            row_id = raw.id if isinstance(raw, Row) else raw[0]
            # Whatever goes wrong with one row fails that row alone, with its reason: an
            # exception escaping here would leave the whole batch in flight, claimed again
            # every lease until each of its rows had spent its attempts.
            try:
                self._add(raw, result, merging)
            except RowError as exc:
                result.invalid[row_id] = f"{INVALID} {exc}"
            except Exception as exc:  # a row no rule foresaw: not a reason to sink the batch
                result.invalid[row_id] = f"{INVALID} it could not be built: {_one_line(exc)}"
        result.truncated = self.cuts
        return result

    def _add(
        self, raw: Any, result: Prepare, merging: dict[str, tuple[int, dict[str, Any]]]
    ) -> None:
        # A plain Row: payload() reading a loaded row's attributes directly made the send
        # slower than this copy does (bench/README.md, finding 6).
        row = raw if isinstance(raw, Row) else Row(*raw[:_ROW_FIELDS])
        if row.oversized is not None:
            raise RowError(self._too_large(f"properties and extra are {row.oversized:,} bytes"))
        payload = self.payload(row)
        blob = _dumps(payload, row)
        if len(blob) > self.row_limit:
            raise RowError(self._too_large(f"the row is {len(blob):,} bytes as JSON"))
        if row.kind == "identify":
            key = row.user_id or f"@device:{row.device_id}"
            into = merging.pop(key, None)
            if _set_only(payload, row):
                merged = self._merge(result.items, into, payload, row) if into else None
                if merged is not None:
                    merging[key] = merged
                    return
                merging[key] = (len(result.items), payload)
        result.items.append(self._prepared(row, payload, blob))

    def _merge(
        self,
        items: list[Prepared],
        into: tuple[int, dict[str, Any]],
        payload: dict[str, Any],
        row: Row,
    ) -> tuple[int, dict[str, Any]] | None:
        """A $set-only identify row merged into the earlier item of its user: later values win,
        the later row's time and insert_id go; None when the merged item would be too large."""
        index, earlier = into
        values = {**earlier["user_properties"]["$set"], **payload["user_properties"]["$set"]}
        merged = {**earlier, "user_properties": {"$set": values}}
        for name in ("time", "insert_id"):
            if name in payload:
                merged[name] = payload[name]
        blob = orjson.dumps(merged)
        if len(blob) > self.row_limit:
            return None
        item = items[index]
        fresh = self._prepared(row, merged, blob)
        items[index] = Prepared(
            item.row_id,
            blob,
            item.user_id,
            item.device_id,
            fresh.size,
            fresh.properties,
            (*item.also, row.id),
        )
        return index, merged

    def _prepared(self, row: Row, payload: dict[str, Any], blob: bytes) -> Prepared:
        if self.endpoint not in FORM_ENDPOINTS:
            return Prepared(row.id, blob, row.user_id, row.device_id)
        # Form bodies are URL-encoded: `{`, `"`, `:` and `,` take three bytes each.
        size = len(quote_plus(blob))
        properties = 0
        if self.endpoint == Endpoint.GROUP_IDENTIFY:
            properties = sum(
                len(v) if isinstance(v, dict) else 1 for v in payload["group_properties"].values()
            )
        return Prepared(row.id, blob, row.user_id, row.device_id, size, properties)

    # --- mapping -------------------------------------------------------------------------------

    def payload(self, row: Row) -> dict[str, Any]:
        if row.kind not in ("identify", "event", "group_identify"):
            raise RowError(f"kind {row.kind!r} is not one of identify, event, group_identify")
        # Any text fits a SQLite time column and MariaDB hands a zero date over as text; the
        # load passes on what it cannot parse as stored. Exact types, no loop: every driver
        # returns datetime itself, and this runs for every row.
        et, ca = row.event_time, row.created_at
        if (et is not None and type(et) is not datetime) or (
            ca is not None and type(ca) is not datetime
        ):
            column, value = (
                ("event_time", et) if type(et) not in (datetime, type(None)) else ("created_at", ca)
            )
            raise RowError(
                f"{column} {_shown(value)} is not a date and time: write a UTC time such as "
                "'2024-05-01 12:30:00' (SYSUTCDATETIME())"
            )
        props = _json_object(row.properties, "properties")
        extra = _json_object(row.extra, "extra")
        clash = sorted(COLUMN_FIELDS.intersection(extra))
        if row.kind == "identify" and "user_properties" in extra:
            clash.append("user_properties")
        if clash:
            raise RowError(
                f"extra sets {', '.join(clash)}, which the row's columns fill: move the value to "
                "its column (properties for property values)"
            )
        if extra and not _within_limits(row.extra):
            self._check_tree(extra, "extra", 1)
        check = not _within_limits(row.properties)
        if row.kind == "event":
            if check:
                self._check_tree(props, "properties", 1)
        elif check:
            # Identify and group rows are checked as Amplitude gets them, in `ops`: plain keys
            # move under $set, one level deeper. The key count is the row's own.
            _check_keys(props, "properties")
        if row.kind == "group_identify":
            return self._group(row, props, extra, check)
        self._check_ids(row)
        if row.kind == "identify":
            ops = _operations(props, USER_OPERATIONS, "identify")
            if check:
                self._check_tree(ops, "properties", 1)
            if not ops and not extra:
                raise RowError("properties is empty: an identify row needs properties to set")
            if self.endpoint in FORM_ENDPOINTS:
                return _compact(
                    {
                        "user_id": row.user_id,
                        "device_id": row.device_id,
                        "user_properties": ops,
                        **extra,
                    }
                )
            return _compact(
                {
                    "event_type": "$identify",
                    "user_id": row.user_id,
                    "device_id": row.device_id,
                    "time": self._time(row),
                    "insert_id": self._insert_id(row),
                    "user_properties": ops,
                    "library": LIBRARY,
                    **extra,
                }
            )
        if not row.event_type:
            raise RowError("event_type is empty: an event row needs an event_type")
        if row.event_type in RESERVED_EVENT_TYPES:
            raise RowError(f"event_type {row.event_type!r} is reserved by Amplitude")
        if "user_properties" in extra:
            if not isinstance(extra["user_properties"], dict):
                raise RowError("extra.user_properties must be a JSON object")
            extra["user_properties"] = _operations(
                extra["user_properties"], USER_OPERATIONS, "extra.user_properties"
            )
        return _compact(
            {
                "event_type": self._cut(row.event_type),
                "user_id": row.user_id,
                "device_id": row.device_id,
                "time": self._time(row),
                "insert_id": self._insert_id(row),
                "event_properties": props or None,
                "library": LIBRARY,
                **extra,
            }
        )

    def _group(
        self, row: Row, props: dict[str, Any], extra: dict[str, Any], check: bool
    ) -> dict[str, Any]:
        for column in ("group_type", "group_value"):
            if not getattr(row, column):
                raise RowError(f"{column} is empty: a group_identify row needs it")
        ops = _operations(props, GROUP_OPERATIONS, "group_identify")
        if check:
            self._check_tree(ops, "properties", 1)
        if not ops:
            raise RowError("properties is empty: a group_identify row needs properties to set")
        if self.endpoint in FORM_ENDPOINTS:
            return {
                "group_type": row.group_type,
                "group_value": row.group_value,
                "group_properties": ops,
                **extra,
            }
        # Through the event APIs a group row is a `$groupidentify` event, as the official SDKs
        # send it: its insert_id makes a re-send harmless (docs/amplitude.md, "Identify and
        # group identify"); the form API deduplicates nothing.
        return _compact(
            {
                "event_type": "$groupidentify",
                "user_id": row.user_id,
                "device_id": row.device_id,
                "groups": {row.group_type: row.group_value},
                "group_properties": ops,
                "time": self._time(row),
                "insert_id": self._insert_id(row),
                "library": LIBRARY,
                **extra,
            }
        )

    def _check_ids(self, row: Row) -> None:
        if not row.user_id and not row.device_id:
            raise RowError("user_id and device_id are both empty: set at least one")
        for column in ("user_id", "device_id"):
            value = getattr(row, column)
            if value is None:
                continue
            if value.strip().lower() in INVALID_IDS:
                raise RowError(f"{column} {value!r} is a placeholder Amplitude rejects")
            if len(value) < self.min_id_length:
                raise RowError(
                    f"{column} {value!r} is shorter than Amplitude's minimum of "
                    f"{self.min_id_length} characters (AMPSYNC_MIN_ID_LENGTH)"
                )

    def _too_large(self, what: str) -> str:
        return (
            f"{what}, over the {MAX_BYTES[self.endpoint]:,} bytes Amplitude accepts in one "
            f"request ({self.endpoint}): shrink properties/extra"
        )

    def _time(self, row: Row) -> int:
        if row.event_time is None:
            column, value = "created_at (event_time is NULL)", row.created_at
        else:
            column, value = "event_time", row.event_time
        ms = epoch_ms(value)
        if ms > self.max_future_ms:
            raise RowError(
                f"{column} {value:%Y-%m-%d %H:%M:%S} is in the future beyond "
                "AMPSYNC_MAX_FUTURE_SECONDS: write times in UTC (SYSUTCDATETIME())"
            )
        return ms

    def _insert_id(self, row: Row) -> str:
        # Stable across re-sends of the row; new after the identity is reseeded.
        return row.insert_id or f"ampsync-{row.id}-{epoch_ms(row.created_at)}"

    def _cut(self, value: str) -> str:
        if len(value) > MAX_STRING:
            self.cuts += 1
            return value[:MAX_STRING]
        return value

    def _check_tree(self, value: Any, where: str, depth: int) -> None:
        """Depth and key limits, and cut long strings in place (as Amplitude would).

        Exact type tests: orjson builds only dict, list, str, int, float, bool and None, and
        `type(x) is str` is cheaper than isinstance on the hot path (one call per property
        object; _check_tree was the largest frame building identify rows, cProfile)."""
        if depth > MAX_DEPTH:
            raise RowError(f"{where} nests deeper than Amplitude's {MAX_DEPTH} levels")
        entries: Iterable[tuple[Any, Any]]
        if type(value) is dict:
            _check_keys(value, where)
            entries = value.items()
        else:
            entries = enumerate(value)
        for key, item in entries:
            kind = type(item)
            if kind is str:
                if len(item) > MAX_STRING:
                    value[key] = self._cut(item)
            elif kind is dict or kind is list:
                inner = f"{where}.{key}" if type(value) is dict else f"{where}[{key}]"
                self._check_tree(item, inner, depth + 1)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _one_line(exc: BaseException) -> str:
    """An exception as one short line: its type, then the first line of its message."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 300 else f"{text[:297]}..."


def _within_limits(text: str | None) -> bool:
    """JSON text too short to break a limit: no string in it can exceed MAX_STRING (escapes
    only shorten), it cannot hold MAX_KEYS keys, and with fewer brackets than MAX_DEPTH - 1
    it cannot nest too deep even under an added $set. Most rows are such; walking their
    trees was the largest Python frame of a send (py-spy, identify)."""
    return text is None or (
        len(text) <= MAX_STRING and text.count("{") + text.count("[") < MAX_DEPTH - 1
    )


def _check_keys(value: dict[str, Any], where: str) -> None:
    if len(value) > MAX_KEYS:
        raise RowError(f"{where} has {len(value):,} keys; Amplitude accepts at most {MAX_KEYS:,}")


def _compact(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if v is not None}


def _json_object(text: str | None, column: str) -> dict[str, Any]:
    if not text or text.isspace():
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if _has_surrogates(text):
            raise RowError(f"{column} is not valid UTF-8 text") from None
        raise RowError(f"{column} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RowError(
            f'{column} must be a JSON object like {{"CRM_Segment": "gold"}}, '
            f"not a JSON {type(value).__name__}"
        )
    return value


def _operations(props: dict[str, Any], allowed: frozenset[str], what: str) -> dict[str, Any]:
    """Plain keys go under $set, beside any operations the row wrote itself."""
    ops: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for key, value in props.items():
        if key.startswith("$"):
            if key not in allowed:
                raise RowError(
                    f"properties uses {key}, which {what} does not support "
                    f"(allowed: {', '.join(sorted(allowed))})"
                )
            if key != "$clearAll" and not isinstance(value, dict):
                raise RowError(f"properties.{key} must be a JSON object of property names")
            ops[key] = value
        else:
            plain[key] = value
    if plain:
        ops["$set"] = {**ops.get("$set", {}), **plain}
    return ops


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _dumps(payload: dict[str, Any], row: Row) -> bytes:
    try:
        return orjson.dumps(payload)
    except TypeError:
        for column in (
            "user_id",
            "device_id",
            "event_type",
            "insert_id",
            "group_type",
            "group_value",
            "properties",
            "extra",
        ):
            value = getattr(row, column)
            if isinstance(value, str) and _has_surrogates(value):
                raise RowError(f"{column} is not valid UTF-8 text") from None
        raise


# --- packing -----------------------------------------------------------------------------------


def pack(
    items: Sequence[Prepared], endpoint: str, max_items: int, max_bytes: int | None = None
) -> Iterator[list[Prepared]]:
    """Consecutive runs of items that fit one request (count and bytes), order kept."""
    limit_bytes = (max_bytes or MAX_BYTES[endpoint]) - ENVELOPE_BYTES
    limit_items = min(max_items, MAX_ITEMS[endpoint])
    limit_properties = MAX_GROUP_PROPERTIES if endpoint == Endpoint.GROUP_IDENTIFY else 0
    run: list[Prepared] = []
    size = properties = 0
    for item in items:
        grow = item.wire_size + 1
        if run and (
            len(run) >= limit_items
            or size + grow > limit_bytes
            or (limit_properties and properties + item.properties > limit_properties)
        ):
            yield run
            run, size, properties = [], 0, 0
        run.append(item)
        size += grow
        properties += item.properties
    if run:
        yield run


def _set_only(payload: dict[str, Any], row: Row) -> bool:
    """An identify that only sets properties (no other operation, nothing from `extra`)."""
    ops = payload.get("user_properties")
    return not row.extra and isinstance(ops, dict) and ops.keys() == {"$set"}
