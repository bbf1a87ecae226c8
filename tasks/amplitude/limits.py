"""Amplitude's documented limits and names, as the code relies on them (docs/amplitude.md has
each with its public source). The one place these numbers are written."""

from __future__ import annotations

from enum import StrEnum


class Endpoint(StrEnum):
    HTTP_V2 = "http_v2"
    BATCH = "batch"
    IDENTIFY = "identify"
    GROUP_IDENTIFY = "groupidentify"


REGION_URLS = {"us": "https://api2.amplitude.com", "eu": "https://api.eu.amplitude.com"}
MAX_EVENTS_PER_REQUEST = 2000  # HTTP V2 and Batch
# Amplitude drops a re-sent insert_id for 7 days only; after that a re-send may count twice.
DEDUP_WINDOW_SECONDS = 7 * 24 * 3600

MAX_STRING = 1024  # longer string values are cut, as the official SDK does
MAX_KEYS = 1024  # property keys per object
MAX_DEPTH = 40  # nesting of property objects
# Body ceilings per endpoint. V2: "< 1 MB"; Batch: 20 MB; Group Identify: 1 MB and 1024
# identifications; Identify documents none, so it gets Group Identify's.
MAX_BYTES = {
    "http_v2": 1_000_000,
    "batch": 20_000_000,
    "identify": 1_000_000,
    "groupidentify": 1_000_000,
}
MAX_ITEMS = {"http_v2": 2000, "batch": 2000, "identify": 1024, "groupidentify": 1024}
# /groupidentify also counts group properties: at most 1024 per request, whatever the rows.
MAX_GROUP_PROPERTIES = 1024
PATHS = {
    "http_v2": "/2/httpapi",
    "batch": "/batch",
    "identify": "/identify",
    "groupidentify": "/groupidentify",
}
FORM_ENDPOINTS = ("identify", "groupidentify")

INVALID_IDS = frozenset(
    [
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
    ]
)
RESERVED_EVENT_TYPES = frozenset(
    [
        "[Amplitude] Start Session",
        "[Amplitude] End Session",
        "[Amplitude] Revenue",
        "[Amplitude] Revenue (Verified)",
        "[Amplitude] Revenue (Unverified)",
        "[Amplitude] Merged User",
        "$identify",
        "$groupidentify",
    ]
)
USER_OPERATIONS = frozenset(
    [
        "$set",
        "$setOnce",
        "$add",
        "$append",
        "$prepend",
        "$unset",
        "$preInsert",
        "$postInsert",
        "$remove",
        "$clearAll",
    ]
)
GROUP_OPERATIONS = frozenset(["$set", "$setOnce", "$add", "$append", "$prepend", "$unset"])
# Fields the row's columns fill; `extra` may not set them a second time.
COLUMN_FIELDS = frozenset(
    [
        "user_id",
        "device_id",
        "event_type",
        "time",
        "event_time",
        "insert_id",
        "group_type",
        "group_value",
        "event_properties",
        "group_properties",
        "properties",
        "extra",
        "api_key",
    ]
)
