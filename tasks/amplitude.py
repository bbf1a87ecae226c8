"""The Amplitude HTTP client: request bodies, one keep-alive session per process, and what
each answer means for the rows of the request (shared/reference/amplitude-api.md).

The API key goes into request bodies only; every text this module returns is redacted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urlencode

import orjson
import requests
from requests.adapters import HTTPAdapter

from .payloads import FORM_ENDPOINTS, PATHS, Prepared


@dataclass
class Answer:
    status: int  # HTTP status; 0 when no answer came (timeout, connection error)
    body: dict | None  # the JSON answer, when it was JSON
    text: str  # a short, redacted description for last_error and logs
    seconds: float = 0.0


class Verdict(Enum):
    SENT = "sent"  # Amplitude accepted the whole request
    REJECTED_ROWS = "rejected_rows"  # 400 naming event indexes: fail those, resend the rest
    SPLIT = "split"  # 413, or a 400 naming no row: halve the request
    THROTTLED = "throttled"  # 429: the throttled rows wait, the rest go on
    PAUSE = "pause"  # the endpoint itself is unusable (bad key, 403, unknown 4xx)
    TRANSIENT = "transient"  # timeout, connection error, 5xx, non-JSON gateway page


@dataclass
class Reading:
    verdict: Verdict
    reason: str
    rejected: dict[int, str] = field(default_factory=dict)  # index -> why
    throttled: set[int] = field(default_factory=set)  # indexes that wait
    daily_quota: set[int] = field(default_factory=set)  # indexes over the daily quota


class Client:
    """One per worker process: a pooled keep-alive session to the Amplitude host."""

    def __init__(self, server_url: str, api_key: str, timeout: float, min_id_length: int = 5):
        self.server_url = server_url.rstrip("/")
        self._key = api_key
        self._timeout = (min(10.0, timeout), timeout)
        self._options = b"" if min_id_length == 5 else (
            b',"options":{"min_id_length":' + str(min_id_length).encode() + b"}"
        )  # fmt: skip
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def body(self, endpoint: str, items: Sequence[Prepared]) -> tuple[bytes, str]:
        blobs = b",".join(item.blob for item in items)
        if endpoint in FORM_ENDPOINTS:
            form = urlencode({"api_key": self._key, "identification": b"[" + blobs + b"]"})
            return form.encode(), "application/x-www-form-urlencoded"
        envelope = b'{"api_key":' + orjson.dumps(self._key) + b',"events":['
        return envelope + blobs + b"]" + self._options + b"}", "application/json"

    def send(self, endpoint: str, items: Sequence[Prepared]) -> Answer:
        data, content_type = self.body(endpoint, items)
        url = self.server_url + PATHS[endpoint]
        started = time.perf_counter()
        try:
            response = self.session.post(
                url, data=data, headers={"Content-Type": content_type}, timeout=self._timeout
            )
        except requests.Timeout:
            return Answer(0, None, f"no answer from {url} within {self._timeout[1]:g} s",
                          time.perf_counter() - started)  # fmt: skip
        except requests.RequestException as exc:
            return Answer(0, None, self.redact(f"cannot reach {url}: {_root_cause(exc)}"),
                          time.perf_counter() - started)  # fmt: skip
        seconds = time.perf_counter() - started
        try:
            body = orjson.loads(response.content) if response.content else None
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            body = None
        text = response.text.strip()
        if body is None:
            snippet = " ".join(text.split())[:200]
            return Answer(response.status_code, None, self.redact(snippet), seconds)
        return Answer(response.status_code, body, self.redact(str(body.get("error", ""))), seconds)

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def close(self) -> None:
        self.session.close()


def _root_cause(exc: BaseException) -> str:
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    return f"{type(exc).__name__}: {exc}"[:300]


_INDEX_MAPS = (
    "events_with_missing_fields",
    "events_with_invalid_fields",
    "events_with_invalid_id_lengths",
)


def read(answer: Answer, items: Sequence[Prepared], endpoint: str) -> Reading:
    """What Amplitude's answer means for each item of the request."""
    status, body = answer.status, answer.body or {}
    if status == 0:
        return Reading(Verdict.TRANSIENT, answer.text)
    if 200 <= status < 300:
        code = body.get("code", status) if answer.body is not None else status
        if endpoint not in FORM_ENDPOINTS and answer.body is None:
            # Event APIs always answer JSON; a 2xx page from elsewhere is a proxy's.
            return Reading(Verdict.TRANSIENT, f"HTTP {status} with a non-JSON body: {answer.text}")
        if isinstance(code, int) and not 200 <= code < 300:
            status = code
        else:
            return Reading(Verdict.SENT, "")
    error = answer.text or f"HTTP {status}"
    if status == 400:
        lowered = error.lower()
        if lowered.startswith("invalid api key") or "invalid_api_key" in lowered:
            return Reading(Verdict.PAUSE, "Amplitude rejected the API key: check AMPLITUDE_API_KEY "
                           "and AMPLITUDE_REGION")  # fmt: skip
        rejected: dict[int, str] = {}
        for name in _INDEX_MAPS:
            for fieldname, indexes in (body.get(name) or {}).items():
                for index in _indexes(indexes):
                    if 0 <= index < len(items):
                        detail = name.removeprefix("events_with_").replace("_", " ")
                        rejected.setdefault(index, f"{fieldname}: {detail} ({error})")
        for index in _indexes(body.get("silenced_events") or []):
            if 0 <= index < len(items):
                rejected.setdefault(index, f"device silenced by Amplitude ({error})")
        if rejected:
            return Reading(Verdict.REJECTED_ROWS, error, rejected=rejected)
        return Reading(Verdict.SPLIT, f"HTTP 400: {error}")
    if status == 413:
        return Reading(Verdict.SPLIT, f"HTTP 413: {error}")
    if status == 429:
        quota_ids = set(body.get("exceeded_daily_quota_users") or {}) | set(
            body.get("exceeded_daily_quota_devices") or {}
        )
        hot_ids = set(body.get("throttled_users") or {}) | set(body.get("throttled_devices") or {})
        listed = {i for i in _indexes(body.get("throttled_events") or []) if 0 <= i < len(items)}
        quota = {i for i, it in enumerate(items) if it.user_id in quota_ids or it.device_id in quota_ids}
        throttled = listed | {
            i for i, it in enumerate(items) if it.user_id in hot_ids or it.device_id in hot_ids
        }
        if not throttled and not quota:
            throttled = set(range(len(items)))  # the answer names nobody: everyone waits
        return Reading(Verdict.THROTTLED, f"HTTP 429: {error}", throttled=throttled - quota,
                       daily_quota=quota)  # fmt: skip
    if status == 403:
        return Reading(Verdict.PAUSE, f"HTTP 403 from Amplitude's firewall: {error}")
    if status >= 500 or status == 408:
        return Reading(Verdict.TRANSIENT, f"HTTP {status}: {error}")
    return Reading(Verdict.PAUSE, f"HTTP {status} from {endpoint}: {error} (check "
                   "AMPLITUDE_SERVER_URL)")  # fmt: skip


def _indexes(values) -> list[int]:
    if isinstance(values, int):
        return [values]
    return [v for v in values if isinstance(v, int)] if isinstance(values, list) else []
