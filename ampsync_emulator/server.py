"""A local, Amplitude-compatible ingestion server (HTTP V2, Batch, Identify, Group Identify).

It stands apart from the rest of ampsync: it imports nothing from the ``tasks`` package and shares
no code with the client. It is written from Amplitude's public API documentation alone (the facts
and their sources are in docs/amplitude.md), so that a test of the client against it means
something.

Decisions where the documentation leaves room (all documented here, once):

* Byte limits are decimal megabytes: a request body above 1,000,000 bytes gets 413 on
  ``/2/httpapi``, ``/identify`` and ``/groupidentify``; above 20,000,000 bytes on ``/batch``.
  The docs say "keep each request < 1 MB" and "413: request > 1 MB"; 1,000,000 is the strictest
  reading, so a client that passes here also passes against the real server.
* Count limits: more than 2000 events (V2, Batch) or identifications (Identify, which "has the
  same limits as the HTTP API") -> 413; more than 1024 group identifications or 1024 group
  properties (summed over the request) on ``/groupidentify`` -> 413.
* Events missing both ids are listed under ``user_id`` *and* ``device_id`` in
  ``events_with_missing_fields``. ``$groupidentify`` events need no user/device id (the official
  SDK skips that check for them) but need ``groups`` and ``group_properties``.
* JSON ``null`` means "absent" for every event field. A wrongly typed id is an invalid field.
  An id that is invalid by value (``"null"``, ``"0"`` ...) is reported only as an invalid field,
  never also as an invalid id length.
* Property dicts: only plain keys (= ``$set``) or only operations; a mix, an operation outside
  the allowed list, an operation whose argument is not an object, or a non-numeric ``$add`` is
  an invalid field (events) or a 400 (form APIs).
* Operations are applied in this order: ``$clearAll, $unset, $setOnce, $set, $add, $append,
  $prepend, $preInsert, $postInsert, $remove``.
* ``events_ingested`` counts every event of an accepted request, duplicates included.
* Request-wide 400s come first, in this order: a path that is none of the four APIs (nor the
  emulator's own ``/``, ``/_emulator/...``; ``/favicon.ico`` is a plain 404) answers JSON
  ``{"code": 400, "error": "Invalid request path"}`` for any method; a POST with an empty body
  answers ``Missing request body`` (JSON, on the form APIs too); on the event APIs a body that
  is not a JSON object answers ``Invalid JSON request body`` whatever its Content-Type, and
  only a JSON body sent with another Content-Type gets the Content-Type 400.
* Per-user throttling (``Faults.per_user_eps_limit``), threshold x window = V2 and Identify
  30 ev/s x 10 s = 300, Batch 1000 ev/s x 30 s = 30,000: an id is throttled when the request's
  own events for it exceed threshold x window (whatever the window holds), or when it already
  had events in the window and those plus the request's exceed it. A request with at most
  threshold x window events for an id is never throttled by itself, so once the window has
  emptied the same request goes through (no livelock); a request with more is throttled for
  that id every time and must be split. A burst right after an accepted request is throttled.
* Property-update budget (``Faults.user_updates_per_hour``, 1800 by default, ``null`` = none):
  per user (the user store's key: ``user_id``, else ``device_id``), each identification of
  ``/identify``, each ``$identify`` event and each other event carrying non-empty
  ``user_properties`` (without ``$skip_user_properties_sync``) is one update. An update is
  applied when fewer than the limit were applied in the last hour (a rolling 3,600 s), else
  dropped: the API still answers 200, the event itself is still ingested and counted, and the
  drop is counted (``counts.user_updates_dropped``, per user in
  ``counts.user_updates_dropped_by_user``, and on the page). Dropped updates do not count
  toward the hour. Duplicates (same ``insert_id``) are not updates.
* Gateway and firewall faults (``gateway_html_400_rate``, ``firewall_block``,
  ``firewall_block_all``, and ``fail_next`` entries with ``html`` or ``firewall``) answer
  before the request is read as an API call, so nothing is ingested. ``firewall_block`` matches
  each substring (case-sensitive) against the raw body, the query string, and for a form body
  also its URL-decoded text (a WAF decodes before matching); the answer is an HTML 403 page, not
  Amplitude's JSON ``{"code": 403, "error": "Forbidden"}`` (``fail_next`` ``{"code": 403}``
  gives that one).
* Form APIs (``/identify``, ``/groupidentify``) answer ``success`` / 400 reasons as plain text;
  their 413, 429 and injected 5xx answers are JSON with ``code`` like the event APIs.
* Dedup: ``/batch`` drops an event whose ``insert_id`` was seen in the project (API key) in the
  last 7 days, whatever its device; ``/2/httpapi`` only when it was seen on the same device
  (``device_id``, else ``"u:"+user_id``; no id, as on ``$groupidentify``: one shared owner).
  Every accepted event records both keys, so a Batch re-send of an event first sent through
  HTTP V2 is a duplicate, and an HTTP V2 re-send of a Batch event is one on the same device.
  Keys are kept as 64-bit hashes for 7 days, so no API key is held in the dedup table and
  memory stays small in long runs. The form APIs deduplicate nothing.
* The user/group store is one namespace for all API keys (dedup and throttling are per key).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import email.parser
import email.policy
import html
import ipaddress
import math
import random
import socket
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

__all__ = ["Emulator", "Faults", "main"]

V2_PATH = "/2/httpapi"
BATCH_PATH = "/batch"
IDENTIFY_PATH = "/identify"
GROUPIDENTIFY_PATH = "/groupidentify"
EVENT_PATHS = frozenset({V2_PATH, BATCH_PATH})
FORM_PATHS = frozenset({IDENTIFY_PATH, GROUPIDENTIFY_PATH})
API_PATHS = EVENT_PATHS | FORM_PATHS

MAX_EVENTS = 2000
MAX_GROUP_IDENTIFICATIONS = 1024
MAX_GROUP_PROPERTIES = 1024
V2_MAX_BYTES = 1_000_000
BATCH_MAX_BYTES = 20_000_000
FORM_MAX_BYTES = 1_000_000
HARD_MAX_BYTES = 64_000_000  # bodies above this are not even read; the connection is closed
DEFAULT_COUNT_LIMITS = {
    V2_PATH: MAX_EVENTS,
    BATCH_PATH: MAX_EVENTS,
    IDENTIFY_PATH: MAX_EVENTS,
    GROUPIDENTIFY_PATH: MAX_GROUP_IDENTIFICATIONS,
}
DEFAULT_BYTE_LIMITS = {
    V2_PATH: V2_MAX_BYTES,
    BATCH_PATH: BATCH_MAX_BYTES,
    IDENTIFY_PATH: FORM_MAX_BYTES,
    GROUPIDENTIFY_PATH: FORM_MAX_BYTES,
}
# (events/s threshold, window seconds) of the rate-based per-user/per-device throttle
EPS_RULES = {V2_PATH: (30, 10.0), BATCH_PATH: (1000, 30.0), IDENTIFY_PATH: (30, 10.0)}
DAILY_QUOTA = 500_000
DEDUP_SECONDS = 7 * 24 * 3600
MAX_STRING = 1024
MAX_DEPTH = 40
DEFAULT_MIN_ID_LENGTH = 5
REJECTED_KEEP = 200
LAST_EVENTS_PER_TYPE = 5
HTML_MAX_USERS = 1000
# The page reloads itself this often, so it follows a running sync; `/?refresh=0` stops it.
PAGE_REFRESH_SECONDS = 5


def _refresh_seconds(text: str) -> int:
    """The page's `?refresh=N` (seconds, 0 = never); the default when absent or not a number."""
    try:
        return max(0, int(text))
    except ValueError:
        return PAGE_REFRESH_SECONDS


HTML_MAX_DROPPED = 100

REJECTED_IDS = frozenset(
    {
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "",
        "00000000-0000-0000-0000-000000000000",
        "{}",
        "lmy47d",
        "0",
        "-1",
    }
)
RESERVED_EVENT_TYPES = frozenset(
    {
        "[Amplitude] Start Session",
        "[Amplitude] End Session",
        "[Amplitude] Revenue",
        "[Amplitude] Revenue (Verified)",
        "[Amplitude] Revenue (Unverified)",
        "[Amplitude] Merged User",
    }
)
IDENTIFY_EVENT = "$identify"
GROUPIDENTIFY_EVENT = "$groupidentify"
# application order of operations on a property dict
OP_ORDER = (
    "$clearAll",
    "$unset",
    "$setOnce",
    "$set",
    "$add",
    "$append",
    "$prepend",
    "$preInsert",
    "$postInsert",
    "$remove",
)
USER_OPS = frozenset(OP_ORDER)
GROUP_OPS = frozenset({"$set", "$setOnce", "$add", "$append", "$prepend", "$unset"})

ERR_MISSING = "Request missing required field"
ERR_INVALID = "Invalid field values on some events"
ERR_ID_LENGTH = "Invalid id length for user_id or device_id"
ERR_TOO_LARGE = "Payload too large"
ERR_THROTTLED = "Too many requests for some devices and users"
ERR_PATH = "Invalid request path"
ERR_NO_BODY = "Missing request body"
ERR_BAD_JSON = "Invalid JSON request body"
INVALID_PATH_KEY = "(invalid path)"  # counts.requests key for every path that is not an API
USER_UPDATES_PER_HOUR = 1800
UPDATE_WINDOW = 3600.0

# Event field kinds for the generic type pass
_INT, _NUM, _OBJ, _STR, _BOOL = range(5)
_FIELD_KINDS = {
    "time": _INT,
    "session_id": _INT,
    "event_id": _INT,
    "quantity": _INT,
    "price": _NUM,
    "revenue": _NUM,
    "location_lat": _NUM,
    "location_lng": _NUM,
    "event_properties": _OBJ,
    "user_properties": _OBJ,
    "group_properties": _OBJ,
    "groups": _OBJ,
    "plan": _OBJ,
    "ingestion_metadata": _OBJ,
    "insert_id": _STR,
    "$skip_user_properties_sync": _BOOL,
}
_HANDLED = frozenset({"event_type", "user_id", "device_id"})

NGINX_PAGE = (
    "<html>\r\n<head><title>{code} {phrase}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
FIREWALL_PAGE = (
    "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n"
    "<center><h1>403 Forbidden</h1></center>\r\n"
    "<p>The request was blocked by the web application firewall.</p>\r\n"
    "</body>\r\n</html>\r\n"
)


# ----------------------------------------------------------------------------------------------
# Faults
# ----------------------------------------------------------------------------------------------


@dataclass
class Faults:
    """Runtime-changeable misbehaviour. Rates are fractions in [0, 1] of API requests.

    Besides Amplitude's own failures: ``gateway_html_400_rate`` (a proxy's HTML 400 page),
    ``firewall_block`` (substrings: a request carrying one gets a WAF's HTML 403),
    ``firewall_block_all`` (every request 403, a region block), and the limits
    ``user_updates_per_hour`` and ``per_user_eps_limit``; see the module docstring."""

    latency_ms: float = 0
    fail_before_rate: float = 0.0
    fail_codes: list[int] = field(default_factory=lambda: [500, 502, 503, 504])
    fail_after_rate: float = 0.0
    html_error_rate: float = 0.0
    reset_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 0.0
    throttled_users: dict[str, float] = field(default_factory=dict)
    daily_quota_users: list[str] = field(default_factory=list)
    max_events_per_request: int | None = None
    max_bytes_per_request: int | None = None
    fail_next: list[dict] = field(default_factory=list)
    down: bool = False
    seed: int | None = None
    per_user_eps_limit: bool = True
    gateway_html_400_rate: float = 0.0
    firewall_block: list[str] = field(default_factory=list)
    firewall_block_all: bool = False
    user_updates_per_hour: int | None = USER_UPDATES_PER_HOUR


_FAULT_NAMES = tuple(f.name for f in fields(Faults))
_FAIL_NEXT_KEYS = frozenset({"code", "after_ingest", "path", "html", "reset", "slow", "firewall"})


def _coerce_fault(name: str, value: Any) -> Any:
    """Validate and normalise one Faults field value (raises ValueError/TypeError)."""
    if name in ("latency_ms", "slow_seconds"):
        v = float(value)
        if v < 0 or math.isnan(v):
            raise ValueError(f"{name} must be >= 0")
        return v
    if name.endswith("_rate"):
        v = float(value)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1")
        return v
    if name == "fail_codes":
        codes = [int(c) for c in value]
        if not codes:
            raise ValueError("fail_codes must not be empty")
        return codes
    if name == "throttled_users":
        return {str(k): float(v) for k, v in dict(value).items()}
    if name == "daily_quota_users":
        if isinstance(value, str):
            raise TypeError("daily_quota_users must be a list of ids")
        return [str(v) for v in value]
    if name == "firewall_block":
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise TypeError("firewall_block must be a list of strings")
        if any(v == "" for v in value):
            raise ValueError("firewall_block strings must not be empty")
        return list(value)
    if name == "user_updates_per_hour":
        if value is None:
            return None
        if isinstance(value, bool) or int(value) < 0:
            raise ValueError("user_updates_per_hour must be an integer >= 0 or null")
        return int(value)
    if name in ("max_events_per_request", "max_bytes_per_request", "seed"):
        if value is None:
            return None
        if isinstance(value, bool):
            raise TypeError(f"{name} must be an integer or null")
        return int(value)
    if name in ("down", "per_user_eps_limit", "firewall_block_all"):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be true or false")
        return value
    if name == "fail_next":
        out = []
        for entry in value:
            if not isinstance(entry, dict):
                raise TypeError("fail_next entries must be objects")
            unknown = set(entry) - _FAIL_NEXT_KEYS
            if unknown:
                raise ValueError(f"unknown fail_next keys: {sorted(unknown)}")
            e = dict(entry)
            if "code" in e:
                e["code"] = int(e["code"])
            if "path" in e and e["path"] is not None:
                e["path"] = _norm_path(str(e["path"]))
            if "slow" in e:
                e["slow"] = float(e["slow"])
            out.append(e)
        return out
    raise ValueError(f"unknown fault: {name}")


# ----------------------------------------------------------------------------------------------
# Validation helpers (pure functions, run outside the lock)
# ----------------------------------------------------------------------------------------------


def _norm_path(path: str) -> str:
    return path.rstrip("/") or "/"


def _container_ok(obj: Any, depth: int) -> bool:
    """Depth <= MAX_DEPTH and every string value <= MAX_STRING chars."""
    if depth > MAX_DEPTH:
        return False
    for v in obj.values() if type(obj) is dict else obj:
        t = type(v)
        if t is str:
            if len(v) > MAX_STRING:
                return False
        elif (t is dict or t is list) and not _container_ok(v, depth + 1):
            return False
    return True


def _is_number(v: Any) -> bool:
    t = type(v)
    return t is int or t is float


def _ops_problem(props: dict, allowed: frozenset) -> str | None:
    """None if `props` is a valid plain dict or a valid operations dict, else the reason."""
    n_ops = 0
    for k, v in props.items():
        if k in USER_OPS:
            if k not in allowed:
                return f"operation {k} is not allowed here"
            n_ops += 1
            if k == "$clearAll":
                continue
            if type(v) is not dict:
                return f"{k} needs an object of properties"
            if k == "$add":
                for x in v.values():
                    if not _is_number(x):
                        return "$add needs numeric values"
    if n_ops and n_ops != len(props):
        return "operations cannot be mixed with plain properties (put plain values under $set)"
    return None


def _id_problem(v: Any, min_len: int) -> str | None:
    """'invalid', 'length' or None for a user_id/device_id value that is not None."""
    if type(v) is not str or len(v) > MAX_STRING or v.lower() in REJECTED_IDS:
        return "invalid"
    if len(v) < min_len:
        return "length"
    return None


def _groups_ok(groups: dict) -> bool:
    for v in groups.values():
        if type(v) is str:
            if len(v) > MAX_STRING:
                return False
        elif type(v) is list:
            for x in v:
                if type(x) is not str or len(x) > MAX_STRING:
                    return False
        else:
            return False
    return True


def _event_problems(ev: Any, min_len: int) -> list[tuple[str, str]] | None:
    """Problems of one event as (category, field) with category missing/invalid/length."""
    if type(ev) is not dict:
        return [("invalid", "event")]
    probs: list[tuple[str, str]] = []
    et = ev.get("event_type")
    if et is None or et == "":
        probs.append(("missing", "event_type"))
    elif type(et) is not str or len(et) > MAX_STRING or et in RESERVED_EVENT_TYPES:
        probs.append(("invalid", "event_type"))
    uid = ev.get("user_id")
    did = ev.get("device_id")
    if uid is None and did is None:
        if et != GROUPIDENTIFY_EVENT:
            probs.append(("missing", "user_id"))
            probs.append(("missing", "device_id"))
    else:
        if uid is not None:
            p = _id_problem(uid, min_len)
            if p:
                probs.append((p, "user_id"))
        if did is not None:
            p = _id_problem(did, min_len)
            if p:
                probs.append((p, "device_id"))
    kinds = _FIELD_KINDS
    for name, v in ev.items():
        if v is None or name in _HANDLED:
            continue
        kind = kinds.get(name)
        t = type(v)
        if kind is None:
            if t is str:
                ok = len(v) <= MAX_STRING
            elif t is dict or t is list:
                ok = _container_ok(v, 1)
            else:
                ok = True
        elif kind == _INT:
            ok = t is int
        elif kind == _NUM:
            ok = t is int or t is float
        elif kind == _OBJ:
            ok = t is dict and _container_ok(v, 1)
        elif kind == _STR:
            ok = t is str and len(v) <= MAX_STRING
        else:
            ok = t is bool
        if not ok:
            probs.append(("invalid", name))
    up = ev.get("user_properties")
    if type(up) is dict and up and _ops_problem(up, USER_OPS):
        probs.append(("invalid", "user_properties"))
    groups = ev.get("groups")
    if type(groups) is dict and not _groups_ok(groups):
        probs.append(("invalid", "groups"))
    if et == GROUPIDENTIFY_EVENT:
        if groups is None or groups == {}:
            probs.append(("missing", "groups"))
        gp = ev.get("group_properties")
        if gp is None:
            probs.append(("missing", "group_properties"))
        elif type(gp) is dict and _ops_problem(gp, GROUP_OPS):
            probs.append(("invalid", "group_properties"))
    return probs or None


def _validate_events(events: list, min_len: int) -> dict | None:
    """None when every event is valid, else the 400 body."""
    maps: dict[str, dict[str, list[int]]] = {}
    for i, ev in enumerate(events):
        probs = _event_problems(ev, min_len)
        if probs:
            for cat, name in probs:
                bucket = maps.setdefault(cat, {}).setdefault(name, [])
                if not bucket or bucket[-1] != i:
                    bucket.append(i)
    if not maps:
        return None
    body: dict[str, Any] = {"code": 400}
    if "missing" in maps:
        body["error"] = ERR_MISSING
    elif "invalid" in maps:
        body["error"] = ERR_INVALID
    else:
        body["error"] = ERR_ID_LENGTH
    if "missing" in maps:
        body["events_with_missing_fields"] = maps["missing"]
    if "invalid" in maps:
        body["events_with_invalid_fields"] = maps["invalid"]
    if "length" in maps:
        body["events_with_invalid_id_lengths"] = maps["length"]
    return body


def _identification_problem(ident: Any, group: bool) -> str | None:
    """Reason an /identify or /groupidentify identification is invalid, or None."""
    if type(ident) is not dict:
        return "identification must be an object"
    if group:
        for name in ("group_type", "group_value"):
            v = ident.get(name)
            if v is None or v == "":
                return f"missing {name}"
            if type(v) is not str or len(v) > MAX_STRING:
                return f"invalid {name}"
        gp = ident.get("group_properties")
        if gp is None:
            return "missing group_properties"
        if type(gp) is not dict or not _container_ok(gp, 1):
            return "invalid group_properties"
        p = _ops_problem(gp, GROUP_OPS)
        return f"invalid group_properties: {p}" if p else None
    uid = ident.get("user_id")
    did = ident.get("device_id")
    if uid is None and did is None:
        return "missing user_id or device_id"
    for name, v in (("user_id", uid), ("device_id", did)):
        if v is not None:
            p = _id_problem(v, DEFAULT_MIN_ID_LENGTH)
            if p == "invalid":
                return f"invalid {name}"
            if p == "length":
                return f"{name} shorter than {DEFAULT_MIN_ID_LENGTH} characters"
    up = ident.get("user_properties")
    if up is not None:
        if type(up) is not dict or not _container_ok(up, 1):
            return "invalid user_properties"
        p = _ops_problem(up, USER_OPS)
        if p:
            return f"invalid user_properties: {p}"
    groups = ident.get("groups")
    if groups is not None and (type(groups) is not dict or not _groups_ok(groups)):
        return "invalid groups"
    for name, v in ident.items():
        if type(v) is str and len(v) > MAX_STRING:
            return f"invalid {name}: longer than {MAX_STRING} characters"
    return None


def _count_properties(props: dict) -> int:
    if props.keys() & USER_OPS:
        return sum(len(v) if type(v) is dict else 1 for v in props.values())
    return len(props)


# ----------------------------------------------------------------------------------------------
# Property operations
# ----------------------------------------------------------------------------------------------


def _as_list(v: Any) -> list:
    return list(v) if type(v) is list else [v]


def _to_number(v: Any) -> float | int | None:
    if _is_number(v):
        return v
    if type(v) is str:
        try:
            f = float(v)
        except ValueError:
            return None
        return int(f) if f.is_integer() and "." not in v else f
    return None


def _apply_props(target: dict, props: dict) -> None:
    """Apply a validated plain ($set) or operations dict to `target` without mutating inputs."""
    if not (props.keys() & USER_OPS):
        target.update(props)
        return
    for op in OP_ORDER:
        arg = props.get(op)
        if arg is None:
            continue
        if op == "$clearAll":
            target.clear()
        elif op == "$unset":
            for k in arg:
                target.pop(k, None)
        elif op == "$setOnce":
            for k, v in arg.items():
                target.setdefault(k, v)
        elif op == "$set":
            target.update(arg)
        elif op == "$add":
            for k, v in arg.items():
                cur = _to_number(target.get(k, 0))
                target[k] = v if cur is None else cur + v
        elif op in ("$append", "$prepend"):
            for k, v in arg.items():
                cur = target.get(k)
                old = [] if cur is None else _as_list(cur)
                new = _as_list(v)
                target[k] = old + new if op == "$append" else new + old
        elif op in ("$preInsert", "$postInsert"):
            for k, v in arg.items():
                cur = target.get(k)
                old = [] if cur is None else _as_list(cur)
                add: list = []
                for x in _as_list(v):
                    if x not in old and x not in add:
                        add.append(x)
                target[k] = add + old if op == "$preInsert" else old + add
        elif op == "$remove":
            for k, v in arg.items():
                if k not in target:
                    continue
                gone = _as_list(v)
                cur = target[k]
                if type(cur) is list:
                    target[k] = [x for x in cur if x not in gone]
                elif cur in gone:
                    del target[k]


def _firewall_match(patterns: list[str], query: str, ctype: str, body: bytes) -> str | None:
    """The first of `patterns` found in the raw body, the query string, or (form bodies and
    queries) their URL-decoded text; None when none is."""
    texts: list[bytes] = [body]
    if query:
        texts.append(query.encode("latin-1", "replace"))
        texts.append(urllib.parse.unquote_plus(query).encode("utf-8", "replace"))
    if body and ctype.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded":
        texts.append(urllib.parse.unquote_plus(body.decode("utf-8", "replace")).encode())
    for pattern in patterns:
        needle = pattern.encode()
        if any(needle in t for t in texts):
            return pattern
    return None


# ----------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------


class _Answer:
    __slots__ = ("status", "body", "ctype", "reset", "error", "detail")

    def __init__(
        self, status, body=b"", ctype="application/json", reset=False, error="", detail=None
    ):
        self.status = status
        self.body = body
        self.ctype = ctype
        self.reset = reset
        self.error = error  # for the rejected log: never contains an API key
        self.detail = detail


def _json_answer(status: int, body: dict, error: str | None = None) -> _Answer:
    detail = {k: v for k, v in body.items() if k not in ("code", "error")} or None
    return _Answer(
        status,
        orjson.dumps(body),
        "application/json",
        error=error if error is not None else str(body.get("error", "")),
        detail=detail,
    )


def _text_answer(status: int, text: str) -> _Answer:
    return _Answer(status, text.encode(), "text/plain; charset=utf-8", error=text)


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def _fault_body(code: int) -> dict:
    if code == 429:
        return {
            "code": 429,
            "error": ERR_THROTTLED,
            "eps_threshold": 30,
            "throttled_devices": {},
            "throttled_users": {},
            "throttled_events": [],
        }
    if code == 413:
        return {"code": 413, "error": ERR_TOO_LARGE}
    return {"code": code, "error": _phrase(code)}


def _mask(key: Any) -> str:
    s = str(key)
    return s[:4] + "…" if s else ""


def _is_loopback(host: str | None) -> bool:
    """Whether a host name or address is this machine (127.0.0.0/8, ::1, localhost)."""
    if not host:
        return False
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(authority: str) -> str | None:
    """The host of a Host header or an Origin (`localhost:8087`, `http://[::1]:8087`)."""
    try:
        return urllib.parse.urlsplit(authority if "//" in authority else "//" + authority).hostname
    except ValueError:
        return None


def _control_refusal(method: str, headers: Any) -> _Answer | None:
    """Why a request for the page or a control endpoint is refused, or None.

    A web page the user has open could otherwise change the faults or read what the emulator
    holds: through DNS rebinding (its own host name resolving to 127.0.0.1, so the browser
    sends that name as Host) or by posting a simple cross-site form. So the Host header must
    name this machine, an Origin (browsers send one with every cross-site POST) must be this
    machine's too, and a change must be a JSON body, which a cross-site page can only send
    after a CORS preflight the emulator never grants.
    """
    if not _is_loopback(_host_of(headers.get("Host", ""))):
        return _json_answer(
            403,
            {
                "error": "the emulator's page and control endpoints answer requests addressed "
                "to this machine only (Host 127.0.0.1, localhost or [::1])"
            },
        )
    origin = headers.get("Origin")
    if origin is not None and not _is_loopback(_host_of(origin)):
        return _json_answer(403, {"error": f"cross-site request from {origin[:100]} refused"})
    ctype = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if method not in ("GET", "HEAD") and ctype != "application/json":
        return _json_answer(415, {"error": "send a JSON body with Content-Type: application/json"})
    return None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _readable_time(iso: str) -> str:
    """`2026-11-28T09:00:01.234+00:00` → `2026-11-28 09:00:01 UTC` for the page."""
    try:
        return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


# ----------------------------------------------------------------------------------------------
# The emulator
# ----------------------------------------------------------------------------------------------


class Emulator:
    """A faithful local Amplitude. Thread-safe; one lock guards all received state."""

    def __init__(
        self,
        faults: Faults | None = None,
        api_keys: set[str] | None = None,
        keep_events: int | None = None,
    ):
        self._faults = faults if faults is not None else Faults()
        for f in fields(Faults):  # normalise in place: the caller's object stays live
            setattr(self._faults, f.name, _coerce_fault(f.name, getattr(self._faults, f.name)))
        self._api_keys = set(api_keys) if api_keys is not None else None
        self._keep_events = keep_events
        self._lock = threading.Lock()
        self._rng = random.Random(self._faults.seed)
        self._clock: Callable[[], float] = time.monotonic  # the property-update hour
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._clear()

    # -- lifecycle -----------------------------------------------------------------------------

    def _make_server(self, host: str, port: int) -> ThreadingHTTPServer:
        server = _Server((host, port), _Handler)
        server.emulator = self
        return server

    @staticmethod
    def _url(server: ThreadingHTTPServer) -> str:
        host, port = server.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in a background thread; returns the base URL."""
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._server = self._make_server(host, port)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="amplitude-emulator",
            daemon=True,
        )
        self._thread.start()
        return self._url(self._server)

    @property
    def url(self) -> str | None:
        return self._url(self._server) if self._server is not None else None

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def serve_forever(
        self,
        host: str = "127.0.0.1",
        port: int = 8087,
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        """Serve in the foreground until interrupted (KeyboardInterrupt propagates)."""
        server = self._make_server(host, port)
        self._server = server
        try:
            if on_ready is not None:
                on_ready(self._url(server))
            server.serve_forever(poll_interval=0.25)
        finally:
            self._server = None
            server.server_close()

    # -- state ---------------------------------------------------------------------------------

    def _clear(self) -> None:
        self._users: dict[str, dict] = {}
        self._groups: dict[str, dict[str, dict]] = {}
        self._events: deque = deque(maxlen=self._keep_events)
        self._event_types: dict[str, list] = {}
        self._requests: dict[str, dict[str, int]] = {}
        self._events_received = 0
        self._events_unique = 0
        self._duplicates = 0
        self._identifications = 0
        self._rejected: deque = deque(maxlen=REJECTED_KEEP)
        self._dedup: dict[int, float] = {}
        self._rates: dict[tuple, list] = {}
        self._last_sweep = time.time()
        self._updates: dict[str, list[float]] = {}  # user -> clock times of applied updates
        self._updates_dropped = 0
        self._updates_dropped_by_user: dict[str, int] = {}

    def reset(self) -> None:
        """Forget everything received (not the faults)."""
        with self._lock:
            self._clear()

    @property
    def faults(self) -> Faults:
        """A copy of the current faults."""
        with self._lock:
            return Faults(**asdict(self._faults))

    def set_faults(self, **changes: Any) -> None:
        """Merge changes into the current faults (ValueError/TypeError on bad input)."""
        coerced = {name: _coerce_fault(name, value) for name, value in changes.items()}
        with self._lock:
            for name, value in coerced.items():
                setattr(self._faults, name, value)
            if "seed" in coerced:
                self._rng = random.Random(coerced["seed"])

    def _user(self, uid: str) -> dict:
        u = self._users.get(uid)
        if u is None:
            u = self._users[uid] = {"user_properties": {}, "active": False, "events": 0}
        return u

    def _may_update(self, who: str) -> bool:
        """Under the lock: one user-property update of `who`; False when it is dropped because
        `who` had `user_updates_per_hour` updates applied in the last hour."""
        limit = self._faults.user_updates_per_hour
        if limit is None:
            return True
        now = self._clock()
        log = self._updates.get(who)
        if log is None:
            log = self._updates[who] = []
        elif len(log) >= limit:  # only then look for expired entries: the list stays <= limit
            del log[: bisect.bisect_right(log, now - UPDATE_WINDOW)]
        if len(log) >= limit:
            self._updates_dropped += 1
            d = self._updates_dropped_by_user
            d[who] = d.get(who, 0) + 1
            return False
        log.append(now)
        return True

    def _state(self, events: bool | int = True) -> dict:
        state: dict[str, Any] = {
            "users": self._users,
            "groups": self._groups,
        }
        if events is True:
            state["events"] = list(self._events)
        elif events:
            state["events"] = list(self._events)[-int(events) :]
        state["counts"] = {
            "requests": self._requests,
            "events_received": self._events_received,
            "events_unique": self._events_unique,
            "duplicates": self._duplicates,
            "identifications": self._identifications,
            "user_updates_dropped": self._updates_dropped,
            "user_updates_dropped_by_user": self._updates_dropped_by_user,
        }
        state["rejected"] = list(self._rejected)
        state["faults"] = asdict(self._faults)
        return state

    def _snapshot_bytes(self, events: bool | int = True) -> bytes:
        with self._lock:
            return orjson.dumps(self._state(events))

    def snapshot(self, events: bool | int = True) -> dict:
        """JSON view of everything received (a deep copy). events=False omits the event list,
        an int keeps only the last N events."""
        return orjson.loads(self._snapshot_bytes(events))

    # -- recording -----------------------------------------------------------------------------

    def _record(self, path: str, ans: _Answer, status_key: str | None = None) -> None:
        key = status_key or str(ans.status)
        with self._lock:
            per = self._requests.setdefault(path, {})
            per[key] = per.get(key, 0) + 1
            if not 200 <= ans.status < 300:
                entry = {
                    "path": path,
                    "status": status_key or ans.status,
                    "error": ans.error,
                    "at": _now_iso(),
                }
                if ans.detail:
                    entry["detail"] = ans.detail
                self._rejected.append(entry)

    # -- faults --------------------------------------------------------------------------------

    def _pick_fault(self, path: str, query: str, ctype: str, body: bytes) -> dict | None:
        with self._lock:
            f = self._faults
            if f.down:
                return {"kind": "before", "code": 503, "reason": "down"}
            if f.firewall_block_all:
                return {"kind": "firewall", "code": 403, "reason": "firewall_block_all"}
            if f.firewall_block:
                hit = _firewall_match(f.firewall_block, query, ctype, body)
                if hit is not None:
                    return {"kind": "firewall", "code": 403, "reason": "firewall_block", "hit": hit}
            for i, entry in enumerate(f.fail_next):
                p = entry.get("path")
                if p is None or _norm_path(p) == path:
                    del f.fail_next[i]
                    return self._fail_next_action(entry)
            rng = self._rng
            if f.fail_before_rate and rng.random() < f.fail_before_rate:
                return {"kind": "before", "code": rng.choice(f.fail_codes), "reason": "fail_before"}
            if f.html_error_rate and rng.random() < f.html_error_rate:
                return {"kind": "html", "code": 502, "reason": "html_error"}
            if f.gateway_html_400_rate and rng.random() < f.gateway_html_400_rate:
                return {"kind": "html", "code": 400, "reason": "gateway_html_400"}
            if f.reset_rate and rng.random() < f.reset_rate:
                return {"kind": "reset", "reason": "reset"}
            if f.slow_rate and rng.random() < f.slow_rate:
                return {"kind": "slow", "code": 504, "seconds": f.slow_seconds, "reason": "slow"}
            if f.fail_after_rate and rng.random() < f.fail_after_rate:
                return {"kind": "after", "code": 500, "reason": "fail_after"}
            return None

    def _fail_next_action(self, e: dict) -> dict:
        if e.get("reset"):
            return {"kind": "reset", "reason": "fail_next reset"}
        if e.get("firewall"):
            return {"kind": "firewall", "code": e.get("code", 403), "reason": "fail_next firewall"}
        if e.get("html"):
            return {"kind": "html", "code": e.get("code", 502), "reason": "fail_next html"}
        if e.get("slow") is not None:
            return {
                "kind": "slow",
                "code": e.get("code", 504),
                "seconds": e["slow"],
                "reason": "fail_next slow",
            }
        if e.get("after_ingest"):
            return {"kind": "after", "code": e.get("code", 500), "reason": "fail_next after_ingest"}
        return {"kind": "before", "code": e.get("code", 500), "reason": "fail_next"}

    def _fault_answer(self, path: str, fault: dict) -> _Answer:
        kind = fault["kind"]
        if kind == "reset":
            ans = _Answer(0, reset=True, error="injected fault: connection reset, not ingested")
            self._record(path, ans, status_key="reset")
            return ans
        if kind == "slow":
            time.sleep(fault["seconds"])
        code = fault["code"]
        if kind == "html":
            page = NGINX_PAGE.format(code=code, phrase=_phrase(code))
            ans = _Answer(
                code,
                page.encode(),
                "text/html",
                error=f"injected fault: {fault['reason']} (HTML {code}), not ingested",
            )
        elif kind == "firewall":
            ans = _Answer(
                code,
                FIREWALL_PAGE.encode(),
                "text/html",
                error=f"injected fault: {fault['reason']} (HTML {code}), not ingested",
                detail={"matched": fault["hit"]} if "hit" in fault else None,
            )
        else:
            ans = _json_answer(
                code,
                _fault_body(code),
                error=f"injected fault: {fault['reason']} ({code}), not ingested",
            )
        self._record(path, ans)
        return ans

    # -- API entry -----------------------------------------------------------------------------

    def _handle_api(self, method: str, path: str, query: str, ctype: str, body: bytes) -> _Answer:
        fault = self._pick_fault(path, query, ctype, body)
        latency = self._faults.latency_ms
        if latency:
            time.sleep(latency / 1000.0)
        if fault is not None and fault["kind"] != "after":
            return self._fault_answer(path, fault)
        if path in EVENT_PATHS:
            if method != "POST":
                ans = _json_answer(405, {"code": 405, "error": "Method not allowed"})
            else:
                ans = self._events_api(path, ctype, body)
        else:
            ans = self._form_api(path, method, query, ctype, body)
        if fault is not None and 200 <= ans.status < 300:
            code = fault["code"]
            ans = _json_answer(
                code,
                _fault_body(code),
                error=f"injected fault: {fault['reason']} ({code}) after ingesting",
            )
        self._record(path, ans)
        return ans

    def _limits(self, path: str) -> tuple[int, int]:
        f = self._faults
        count = f.max_events_per_request
        size = f.max_bytes_per_request
        return (
            DEFAULT_COUNT_LIMITS[path] if count is None else count,
            DEFAULT_BYTE_LIMITS[path] if size is None else size,
        )

    def _key_ok(self, key: Any) -> bool:
        if type(key) is not str or not key:
            return False
        if self._api_keys is None:
            return key != "invalid"
        return key in self._api_keys

    # -- /2/httpapi and /batch -----------------------------------------------------------------

    def _events_api(self, path: str, ctype: str, body: bytes) -> _Answer:
        if not body:
            return _json_answer(400, {"code": 400, "error": ERR_NO_BODY})
        max_count, max_bytes = self._limits(path)
        if len(body) > max_bytes:
            return _json_answer(
                413,
                {"code": 413, "error": ERR_TOO_LARGE},
                error=f"{ERR_TOO_LARGE}: {len(body)} bytes > {max_bytes}",
            )
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if type(data) is not dict:
            return _json_answer(400, {"code": 400, "error": ERR_BAD_JSON})
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            return _json_answer(
                400,
                {"code": 400, "error": "Invalid request: Content-Type must be application/json"},
            )
        api_key = data.get("api_key")
        events = data.get("events")
        min_len = DEFAULT_MIN_ID_LENGTH
        options = data.get("options")
        if options is not None:
            ml = options.get("min_id_length") if type(options) is dict else "bad"
            if ml is not None:
                if type(ml) is not int or ml < 0:
                    return _json_answer(
                        400,
                        {
                            "code": 400,
                            "error": "Invalid options: "
                            "min_id_length must be a non-negative integer",
                        },
                    )
                min_len = ml
        if api_key is None:
            out: dict[str, Any] = {"code": 400, "error": ERR_MISSING, "missing_field": "api_key"}
            if type(events) is list:
                problems = _validate_events(events, min_len)
                if problems:
                    out.update({k: v for k, v in problems.items() if k.startswith("events_")})
            return _json_answer(400, out)
        if events is None or events == []:
            return _json_answer(400, {"code": 400, "error": ERR_MISSING, "missing_field": "events"})
        if not self._key_ok(api_key):
            ans = _json_answer(400, {"code": 400, "error": f"Invalid API key: {api_key}"})
            ans.error = f"Invalid API key: {_mask(api_key)}"
            return ans
        if type(events) is not list:
            return _json_answer(400, {"code": 400, "error": "Invalid event JSON"})
        if len(events) > max_count:
            return _json_answer(
                413,
                {"code": 413, "error": ERR_TOO_LARGE},
                error=f"{ERR_TOO_LARGE}: {len(events)} events > {max_count}",
            )
        problems = _validate_events(events, min_len)
        if problems:
            return _json_answer(400, problems)
        with self._lock:
            throttled = self._throttle(path, api_key, events)
            if throttled is not None:
                return _json_answer(429, throttled)
            self._ingest_events(path, api_key, events)
        return _json_answer(
            200,
            {
                "code": 200,
                "events_ingested": len(events),
                "payload_size_bytes": len(body),
                "server_upload_time": int(time.time() * 1000),
            },
        )

    def _throttle(self, path: str, api_key: str, items: list) -> dict | None:
        """Under the lock: the 429 body if any id of `items` is throttled, else None.

        Records the items in the rate windows when nothing is throttled."""
        f = self._faults
        now = time.time()
        rule = EPS_RULES.get(path)
        threshold = rule[0] if rule else 30
        per_user: dict[str, int] = {}
        per_device: dict[str, int] = {}
        for ev in items:
            uid = ev.get("user_id")
            did = ev.get("device_id")
            if uid is not None:
                per_user[uid] = per_user.get(uid, 0) + 1
            if did is not None:
                per_device[did] = per_device.get(did, 0) + 1
        t_users: dict[str, int] = {}
        t_devices: dict[str, int] = {}
        q_users: dict[str, int] = {}
        q_devices: dict[str, int] = {}
        forced = f.throttled_users
        quota = f.daily_quota_users
        if forced or quota:
            quota_set = set(quota)
            for ids, t_map, q_map in (
                (per_user, t_users, q_users),
                (per_device, t_devices, q_devices),
            ):
                for i, n in ids.items():
                    until = forced.get(i)
                    if until is not None and until > now:
                        t_map[i] = threshold + 1
                    if i in quota_set:
                        q_map[i] = DAILY_QUOTA + n
        use_rate = f.per_user_eps_limit and rule is not None
        if use_rate:
            window = rule[1]
            cutoff = now - window
            cap = threshold * window
            for who, ids, t_map in (("u", per_user, t_users), ("d", per_device, t_devices)):
                for i, n in ids.items():
                    slot = self._rates.get((path, api_key, who, i))
                    prior = 0
                    if slot is not None:
                        q = slot[1]
                        while q and q[0][0] < cutoff:
                            slot[0] -= q.popleft()[1]
                        prior = slot[0]
                    # the request's own events count: alone they may exceed the window's cap
                    if n > cap or (prior > 0 and prior + n > cap):
                        t_map[i] = max(t_map.get(i, 0), math.ceil((prior + n) / window))
        if t_users or t_devices or q_users or q_devices:
            bad_u = t_users.keys() | q_users.keys()
            bad_d = t_devices.keys() | q_devices.keys()
            idx = [
                i
                for i, ev in enumerate(items)
                if ev.get("user_id") in bad_u or ev.get("device_id") in bad_d
            ]
            body: dict[str, Any] = {
                "code": 429,
                "error": ERR_THROTTLED,
                "eps_threshold": threshold,
                "throttled_devices": t_devices,
                "throttled_users": t_users,
            }
            if path == BATCH_PATH or q_users or q_devices:
                body["exceeded_daily_quota_users"] = q_users
                body["exceeded_daily_quota_devices"] = q_devices
            body["throttled_events"] = idx
            return body
        if use_rate:
            rates = self._rates
            for who, ids in (("u", per_user), ("d", per_device)):
                for i, n in ids.items():
                    k = (path, api_key, who, i)
                    slot = rates.get(k)
                    if slot is None:
                        slot = rates[k] = [0, deque()]
                    slot[0] += n
                    slot[1].append((now, n))
        self._sweep(now)
        return None

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        stale = [k for k, slot in self._rates.items() if not slot[1] or slot[1][-1][0] < now - 60]
        for k in stale:
            del self._rates[k]
        cutoff = now - DEDUP_SECONDS
        expired = []
        for k, t in self._dedup.items():
            if t > cutoff:
                break
            expired.append(k)
        for k in expired:
            del self._dedup[k]

    def _ingest_events(self, path: str, api_key: str, events: list) -> None:
        """Under the lock: dedup and apply accepted events."""
        now = time.time()
        dedup = self._dedup
        keep = self._events
        keep_any = keep.maxlen != 0
        types = self._event_types
        per_project = path == BATCH_PATH
        unique = 0
        for ev in events:
            uid = ev.get("user_id")
            did = ev.get("device_id")
            iid = ev.get("insert_id")
            if iid is not None:
                owner = did if did is not None else ("u:" + uid if uid is not None else "")
                h_device = hash((api_key, owner, iid))
                h_project = hash((api_key, iid))
                seen = dedup.get(h_project if per_project else h_device)
                if seen is not None and now - seen < DEDUP_SECONDS:
                    continue
                for h in (h_device, h_project):
                    if h in dedup:  # re-insert at the end (keeps time order for the sweep)
                        del dedup[h]
                    dedup[h] = now
            unique += 1
            et = ev["event_type"]
            who = uid if uid is not None else did
            if et == IDENTIFY_EVENT:
                self._identifications += 1
                up = ev.get("user_properties")
                if who is not None:
                    user = self._user(who)
                    if self._may_update(who) and up:
                        _apply_props(user["user_properties"], up)
            elif et == GROUPIDENTIFY_EVENT:
                self._identifications += 1
                gp = ev["group_properties"]
                for gtype, gval in ev["groups"].items():
                    for v in _as_list(gval):
                        _apply_props(self._groups.setdefault(gtype, {}).setdefault(v, {}), gp)
            else:
                user = self._user(who)
                user["active"] = True
                user["events"] += 1
                up = ev.get("user_properties")
                if up and not ev.get("$skip_user_properties_sync") and self._may_update(who):
                    _apply_props(user["user_properties"], up)
            slot = types.get(et)
            if slot is None:
                slot = types[et] = [0, deque(maxlen=LAST_EVENTS_PER_TYPE)]
            slot[0] += 1
            if "api_key" in ev:  # never keep a key someone put inside an event
                ev = {k: v for k, v in ev.items() if k != "api_key"}
            slot[1].append(ev)
            if keep_any:
                keep.append(ev)
        self._events_received += len(events)
        self._events_unique += unique
        self._duplicates += len(events) - unique

    # -- /identify and /groupidentify ----------------------------------------------------------

    def _form_params(
        self, method: str, query: str, ctype: str, body: bytes
    ) -> dict[str, str] | None:
        params: dict[str, str] = {}
        if query:
            params.update(
                {k: v[0] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
            )
        if method != "POST" or not body:
            return params
        mime = ctype.split(";", 1)[0].strip().lower()
        try:
            if mime == "application/x-www-form-urlencoded":
                parsed = urllib.parse.parse_qs(
                    body.decode("utf-8"), keep_blank_values=True, strict_parsing=False
                )
                params.update({k: v[0] for k, v in parsed.items()})
            elif mime == "multipart/form-data":
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body
                )
                if not msg.is_multipart():
                    return None
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    if name:
                        payload = part.get_payload(decode=True) or b""
                        params[name] = payload.decode("utf-8")
            else:
                return None
        except (UnicodeDecodeError, ValueError):
            return None
        return params

    def _form_api(self, path: str, method: str, query: str, ctype: str, body: bytes) -> _Answer:
        if method not in ("POST", "GET"):
            return _text_answer(405, "method not allowed")
        if method == "POST" and not body:
            return _json_answer(400, {"code": 400, "error": ERR_NO_BODY})
        group = path == GROUPIDENTIFY_PATH
        max_count, max_bytes = self._limits(path)
        if len(body) > max_bytes or (method == "GET" and len(query) > 8192):
            return _json_answer(
                413,
                {"code": 413, "error": ERR_TOO_LARGE},
                error=f"{ERR_TOO_LARGE}: {len(body)} bytes > {max_bytes}",
            )
        params = self._form_params(method, query, ctype, body)
        if params is None:
            return _text_answer(
                400,
                "missing_event: send a form (application/x-www-form-urlencoded"
                " or multipart/form-data) with api_key and identification",
            )
        if not self._key_ok(params.get("api_key")):
            return _text_answer(400, "invalid_api_key")
        raw = params.get("identification")
        if not raw:
            return _text_answer(400, "missing_event: no identification")
        try:
            ident = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _text_answer(400, "missing_event: identification is not valid JSON")
        items = [ident] if type(ident) is dict else ident
        if type(items) is not list or not items or any(type(x) is not dict for x in items):
            return _text_answer(
                400, "missing_event: identification must be a JSON object or an array of objects"
            )
        if len(items) > max_count:
            return _json_answer(
                413,
                {"code": 413, "error": ERR_TOO_LARGE},
                error=f"{ERR_TOO_LARGE}: {len(items)} identifications > {max_count}",
            )
        if group:
            n_props = sum(
                _count_properties(x["group_properties"])
                for x in items
                if type(x.get("group_properties")) is dict
            )
            if n_props > MAX_GROUP_PROPERTIES:
                return _json_answer(
                    413,
                    {"code": 413, "error": ERR_TOO_LARGE},
                    error=f"{ERR_TOO_LARGE}: {n_props} group properties > {MAX_GROUP_PROPERTIES}",
                )
        for i, x in enumerate(items):
            problem = _identification_problem(x, group)
            if problem:
                return _text_answer(400, f"invalid_identification: identification {i}: {problem}")
        api_key = params["api_key"]
        with self._lock:
            if not group:
                throttled = self._throttle(path, api_key, items)
                if throttled is not None:
                    return _json_answer(429, throttled)
            for x in items:
                self._identifications += 1
                if group:
                    groups = self._groups.setdefault(x["group_type"], {})
                    _apply_props(groups.setdefault(x["group_value"], {}), x["group_properties"])
                else:
                    uid = x.get("user_id")
                    who = uid if uid is not None else x["device_id"]
                    user = self._user(who)
                    up = x.get("user_properties")
                    if self._may_update(who) and up:
                        _apply_props(user["user_properties"], up)
        return _Answer(200, b"success", "text/plain; charset=utf-8")

    # -- control endpoints ---------------------------------------------------------------------

    def _handle_control(self, method: str, path: str, query: str, body: bytes) -> _Answer:
        qs = urllib.parse.parse_qs(query)
        if path == "/_emulator/state" and method == "GET":
            ev = qs.get("events", ["1"])[-1].strip().lower()
            events: bool | int
            if ev in ("0", "false", "no", "off"):
                events = False
            elif ev in ("1", "true", "yes", "on", "all", ""):
                events = True
            else:
                try:
                    events = max(0, int(ev)) or False
                except ValueError:
                    events = True
            return _Answer(200, self._snapshot_bytes(events))
        if path == "/_emulator/reset" and method == "POST":
            try:
                if type(orjson.loads(body or b"{}")) is not dict:
                    raise TypeError
            except (orjson.JSONDecodeError, TypeError):
                return _Answer(400, orjson.dumps({"error": "body must be a JSON object ({})"}))
            self.reset()
            return _Answer(200, orjson.dumps({"ok": True}))
        if path == "/_emulator/faults":
            if method == "POST":
                try:
                    changes = orjson.loads(body or b"{}")
                    if type(changes) is not dict:
                        raise TypeError("body must be a JSON object of Faults fields")
                    self.set_faults(**changes)
                except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                    return _Answer(400, orjson.dumps({"error": str(exc)}))
            elif method != "GET":
                return _Answer(405, orjson.dumps({"error": "method not allowed"}))
            with self._lock:
                return _Answer(200, orjson.dumps(asdict(self._faults)))
        if path == "/" and method == "GET":
            page = self.render_html(_refresh_seconds(qs.get("refresh", [""])[-1]))
            return _Answer(200, page.encode(), "text/html; charset=utf-8")
        if path == "/favicon.ico":
            return _Answer(404, b"", "text/plain")
        ans = _json_answer(400, {"code": 400, "error": ERR_PATH})
        ans.error = f"{ERR_PATH}: {method} {path[:200]}"
        self._record(INVALID_PATH_KEY, ans)
        return ans

    # -- HTML page -----------------------------------------------------------------------------

    def render_html(self, refresh: int = PAGE_REFRESH_SECONDS) -> str:
        """A small self-contained page of what was received (every value HTML-escaped); it
        reloads itself every `refresh` seconds (0: never)."""
        with self._lock:
            state = orjson.loads(orjson.dumps(self._state(events=False)))
            types = [
                (t, slot[0], orjson.dumps(list(slot[1])[-3:]).decode())
                for t, slot in self._event_types.items()
            ]
        e = html.escape

        def js(obj: Any) -> str:
            return e(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode())

        users = state["users"]
        out = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<meta http-equiv='refresh' content='{refresh}'>" if refresh else "",
            "<title>ampsync Amplitude emulator</title><style>",
            "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}",
            "table{border-collapse:collapse;margin-bottom:1.5em}",
            "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}",
            "td.props,td.last{font-family:monospace;font-size:.85em;max-width:60em;",
            "word-break:break-all}th{background:#f3f3f3}",
            "table#faults td.value{font-family:monospace;font-size:.85em;max-width:60em;",
            "word-break:break-all}table#faults tr.changed td{background:#fff3cd}",
            "</style></head><body>",
            "<h1>ampsync Amplitude emulator</h1>",
            f"<p>as of {e(_readable_time(_now_iso()))} · "
            + (
                f"reloads every {refresh} s (<a href='/?refresh=0'>stop</a>)"
                if refresh
                else f"<a href='/'>reload every {PAGE_REFRESH_SECONDS} s</a>"
            )
            + " · <a href='/_emulator/state?events=0'>state JSON</a></p>",
        ]
        c = state["counts"]
        out.append(
            "<table id='counts'><tr><th>events received</th><th>unique</th>"
            "<th>duplicates</th><th>identifications</th><th>users</th>"
            "<th>property updates dropped (over the hourly limit)</th></tr>"
        )
        out.append(
            f"<tr><td class='events-received'>{c['events_received']}</td>"
            f"<td class='events-unique'>{c['events_unique']}</td>"
            f"<td class='duplicates'>{c['duplicates']}</td>"
            f"<td class='identifications'>{c['identifications']}</td>"
            f"<td class='user-count'>{len(users)}</td>"
            f"<td class='user-updates-dropped'>{c['user_updates_dropped']}</td></tr></table>"
        )
        out.append(
            "<h2>Requests</h2><table id='requests'><tr><th>path</th><th>status</th>"
            "<th>count</th></tr>"
        )
        for p, per in c["requests"].items():
            for st, n in per.items():
                out.append(
                    f"<tr data-path='{e(p)}' data-status='{e(st)}'><td class='path'>"
                    f"{e(p)}</td><td class='status'>{e(st)}</td>"
                    f"<td class='count'>{n}</td></tr>"
                )
        out.append("</table>")
        dropped = c["user_updates_dropped_by_user"]
        out.append(
            f"<h2>Users ({len(users)})</h2><table id='users'><tr><th>id</th>"
            "<th>active</th><th>events</th><th>property updates dropped</th>"
            "<th>user properties</th></tr>"
        )
        for n, (uid, u) in enumerate(users.items()):
            if n >= HTML_MAX_USERS:
                out.append(
                    f"<tr class='more'><td colspan='5'>{len(users) - n} more users "
                    "(see the state JSON)</td></tr>"
                )
                break
            out.append(
                f"<tr data-user-id='{e(uid)}'><td class='id'>{e(uid)}</td>"
                f"<td class='active'>{'yes' if u['active'] else 'no'}</td>"
                f"<td class='events'>{u['events']}</td>"
                f"<td class='updates-dropped'>{dropped.get(uid, 0)}</td>"
                f"<td class='props'>{js(u['user_properties'])}</td></tr>"
            )
        out.append("</table>")
        if dropped:
            out.append(
                "<h2>Users over the property-update limit</h2><table id='updates-dropped'>"
                "<tr><th>id</th><th>updates dropped</th></tr>"
            )
            top = sorted(dropped.items(), key=lambda kv: -kv[1])[:HTML_MAX_DROPPED]
            for uid, n in top:
                out.append(
                    f"<tr data-user-id='{e(uid)}'><td class='id'>{e(uid)}</td>"
                    f"<td class='updates-dropped'>{n}</td></tr>"
                )
            out.append("</table>")
        out.append(
            "<h2>Events by type</h2><table id='event-types'><tr><th>event type</th>"
            "<th>count</th><th>last events</th></tr>"
        )
        for t, n, last in types:
            out.append(
                f"<tr data-event-type='{e(t)}'><td class='type'>{e(t)}</td>"
                f"<td class='count'>{n}</td><td class='last'>{e(last)}</td></tr>"
            )
        out.append("</table>")
        out.append(
            "<h2>Groups</h2><table id='groups'><tr><th>group type</th><th>group value</th>"
            "<th>group properties</th></tr>"
        )
        for gt, values in state["groups"].items():
            for gv, props in values.items():
                out.append(
                    f"<tr data-group-type='{e(gt)}' data-group-value='{e(gv)}'>"
                    f"<td class='group-type'>{e(gt)}</td><td class='group-value'>{e(gv)}"
                    f"</td><td class='props'>{js(props)}</td></tr>"
                )
        out.append("</table>")
        out.append(
            "<h2>Rejected requests (latest first)</h2><table id='rejected'><tr><th>at</th>"
            "<th>path</th><th>status</th><th>reason</th><th>detail</th></tr>"
        )
        for r in reversed(state["rejected"]):
            detail = js(r["detail"]) if r.get("detail") else ""
            out.append(
                f"<tr class='rejected'><td class='at' title='{e(r['at'])}'>"
                f"{e(_readable_time(r['at']))}</td>"
                f"<td class='path'>{e(r['path'])}</td>"
                f"<td class='status'>{e(str(r['status']))}</td>"
                f"<td class='error'>{e(r['error'])}</td>"
                f"<td class='detail'>{detail}</td></tr>"
            )
        out.append("</table>")
        defaults = asdict(Faults())
        out.append(
            "<h2>Faults</h2><p>highlighted: changed from the default</p><table id='faults'>"
            "<tr><th>fault</th><th>value</th></tr>"
        )
        for name, value in state["faults"].items():
            changed = " class='changed'" if value != defaults.get(name) else ""
            out.append(
                f"<tr data-fault='{e(name)}'{changed}><td class='name'>{e(name)}</td>"
                f"<td class='value'>{js(value)}</td></tr>"
            )
        out.append("</table>")
        out.append("</body></html>")
        return "".join(out)


# ----------------------------------------------------------------------------------------------
# HTTP plumbing
# ----------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    emulator: Emulator

    def handle_error(self, request, client_address):  # noqa: D401 - quiet on client hang-ups
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ampsync-amplitude-emulator"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def _read_body(self) -> bytes | None:
        """The request body; None when it is too large to read (the connection is closed)."""
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > HARD_MAX_BYTES:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        n = int(length)
        if n > HARD_MAX_BYTES:
            return None
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, ans: _Answer) -> None:
        self.send_response(ans.status)
        self.send_header("Content-Type", ans.ctype)
        self.send_header("Content-Length", str(len(ans.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and ans.body:
            self.wfile.write(ans.body)

    def _abort(self) -> None:
        """Close the connection with a TCP reset and no answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _dispatch(self) -> None:
        try:
            self._dispatch_inner()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # an emulator bug must not look like a network fault
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(_json_answer(500, {"code": 500, "error": "Internal emulator error"}))

    def _dispatch_inner(self) -> None:
        emu = self.server.emulator
        method = self.command
        raw_path, _, query = self.path.partition("?")
        if raw_path.startswith(("http://", "https://")):  # absolute-form request target
            raw_path = "/" + raw_path.split("/", 3)[-1] if raw_path.count("/") >= 3 else "/"
        path = _norm_path(raw_path)
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(_json_answer(400, {"code": 400, "error": "Bad request framing"}))
            return
        if body is None:
            self.close_connection = True
            ans = _json_answer(413, {"code": 413, "error": ERR_TOO_LARGE})
            if path in API_PATHS:
                emu._record(path, ans)
            self._send(ans)
            return
        if path in API_PATHS:
            ctype = self.headers.get("Content-Type", "")
            ans = emu._handle_api(method, path, query, ctype, body)
            if ans.reset:
                self._abort()
                return
        else:
            control = path == "/" or path.startswith("/_emulator/")
            refusal = _control_refusal(method, self.headers) if control else None
            ans = refusal or emu._handle_control(method, path, query, body)
        self._send(ans)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ampsync-emulator",
        description="Local Amplitude-compatible server (/2/httpapi, /batch, /identify, "
        "/groupidentify) that keeps and shows what it received at / and /_emulator/state.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8087)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--fail-before-rate", type=float, default=0.0)
    p.add_argument("--fail-after-rate", type=float, default=0.0)
    p.add_argument(
        "--fail-codes",
        default="500,502,503,504",
        help="comma-separated status codes for --fail-before-rate",
    )
    p.add_argument("--html-error-rate", type=float, default=0.0)
    p.add_argument(
        "--gateway-html-400-rate",
        type=float,
        default=0.0,
        help="share of API requests answered with a gateway's HTML 400 page, not ingested",
    )
    p.add_argument(
        "--firewall-block",
        action="append",
        default=[],
        help="HTML 403 for a request whose body contains this text (repeatable)",
    )
    p.add_argument(
        "--firewall-block-all", action="store_true", help="HTML 403 for every API request"
    )
    p.add_argument(
        "--user-updates-per-hour",
        type=int,
        default=USER_UPDATES_PER_HOUR,
        help="user-property updates applied per user per hour; later ones are dropped (-1: none)",
    )
    p.add_argument("--reset-rate", type=float, default=0.0)
    p.add_argument("--slow-rate", type=float, default=0.0)
    p.add_argument("--slow-seconds", type=float, default=0.0)
    p.add_argument("--max-events", type=int, default=None, help="events per request (413 above)")
    p.add_argument("--max-bytes", type=int, default=None, help="bytes per request (413 above)")
    p.add_argument(
        "--no-eps-limit",
        action="store_true",
        help="disable the per-user/device events-per-second throttle (429)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accepted API key (repeatable); default: any key except 'invalid'",
    )
    p.add_argument(
        "--keep-events",
        type=int,
        default=None,
        help="keep at most this many events in memory (counts stay complete)",
    )
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    try:
        faults = Faults(
            latency_ms=_coerce_fault("latency_ms", args.latency_ms),
            fail_before_rate=_coerce_fault("fail_before_rate", args.fail_before_rate),
            fail_after_rate=_coerce_fault("fail_after_rate", args.fail_after_rate),
            fail_codes=_coerce_fault("fail_codes", [c for c in args.fail_codes.split(",") if c]),
            html_error_rate=_coerce_fault("html_error_rate", args.html_error_rate),
            reset_rate=_coerce_fault("reset_rate", args.reset_rate),
            slow_rate=_coerce_fault("slow_rate", args.slow_rate),
            slow_seconds=_coerce_fault("slow_seconds", args.slow_seconds),
            max_events_per_request=args.max_events,
            max_bytes_per_request=args.max_bytes,
            per_user_eps_limit=not args.no_eps_limit,
            seed=args.seed,
            gateway_html_400_rate=_coerce_fault(
                "gateway_html_400_rate", args.gateway_html_400_rate
            ),
            firewall_block=_coerce_fault("firewall_block", args.firewall_block),
            firewall_block_all=args.firewall_block_all,
            user_updates_per_hour=_coerce_fault(
                "user_updates_per_hour",
                None if args.user_updates_per_hour == -1 else args.user_updates_per_hour,
            ),
        )
    except (TypeError, ValueError) as exc:
        p.error(str(exc))
    emu = Emulator(
        faults, api_keys=set(args.api_key) if args.api_key else None, keep_events=args.keep_events
    )

    def ready(url: str) -> None:
        print(f"ampsync emulator listening on {url}", flush=True)

    try:
        emu.serve_forever(args.host, args.port, on_ready=ready)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"ampsync emulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
