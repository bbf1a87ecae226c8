"""What each answer of Amplitude means for the rows of the request: a pure reading, one
verdict per answer (docs/amplitude.md lists the answers and what the code does with each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .client import Answer
from .limits import FORM_ENDPOINTS
from .payloads import Prepared


class Verdict(Enum):
    SENT = "sent"  # Amplitude accepted the whole request
    REJECTED_ROWS = "rejected_rows"  # 400 naming event indexes: fail those, resend the rest
    SPLIT = "split"  # a 400 naming no row: halve the request to find the row
    TOO_LARGE = "too_large"  # 413: halve the request until it fits
    BLOCKED = "blocked"  # 403 from the firewall: halve to isolate the row whose content it blocks
    THROTTLED = "throttled"  # 429: the throttled rows wait, the rest go on
    # The endpoint itself is unusable: bad key, a 400 about the request rather than a row
    # (wrong path, no or non-JSON body, a gateway's page), unknown 4xx.
    PAUSE = "pause"
    TRANSIENT = "transient"  # timeout, connection error, 5xx, non-JSON gateway page


@dataclass
class Reading:
    verdict: Verdict
    reason: str
    rejected: dict[int, str] = field(default_factory=dict)  # index -> why
    throttled: set[int] = field(default_factory=set)  # indexes that wait
    daily_quota: set[int] = field(default_factory=set)  # indexes over the daily quota


# 400s about the request as a whole (docs/amplitude.md, "400"): halving cannot help.
REQUEST_ERRORS = ("invalid request path", "missing request body", "invalid json request body")

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
        if answer.body is None and (
            endpoint not in FORM_ENDPOINTS or answer.text.strip().lower() != "success"
        ):
            # Event APIs always answer JSON, the form APIs `success`; any other 2xx page is a
            # proxy's, and nothing says Amplitude got the rows.
            return Reading(Verdict.TRANSIENT, f"HTTP {status} with a non-JSON body: {answer.text}")
        if isinstance(code, int) and not 200 <= code < 300:
            status = code
        else:
            return Reading(Verdict.SENT, "")
    error = answer.text or f"HTTP {status}"
    if status == 400:
        lowered = error.lower()
        if _is_page(answer, endpoint):
            return Reading(
                Verdict.PAUSE,
                f"HTTP 400 with a page that is not Amplitude's answer (a proxy or gateway in the "
                f"way? check AMPLITUDE_SERVER_URL): {error}",
            )
        if lowered.startswith(REQUEST_ERRORS):
            return Reading(
                Verdict.PAUSE,
                f"HTTP 400 for the whole request, not a row: {error} (check AMPLITUDE_SERVER_URL "
                "and any proxy in the way)",
            )
        if body.get("missing_field") and not any(body.get(name) for name in _INDEX_MAPS):
            return Reading(
                Verdict.PAUSE,
                f"HTTP 400: the request lacks {body['missing_field']}: {error}",
            )
        if lowered.startswith("invalid api key") or "invalid_api_key" in lowered:
            return Reading(
                Verdict.PAUSE,
                "Amplitude rejected the API key: check AMPLITUDE_API_KEY and AMPLITUDE_REGION",
            )
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
        return Reading(Verdict.TOO_LARGE, f"HTTP 413: {error}")
    if status == 429:
        quota_ids = set(body.get("exceeded_daily_quota_users") or {}) | set(
            body.get("exceeded_daily_quota_devices") or {}
        )
        hot_ids = set(body.get("throttled_users") or {}) | set(body.get("throttled_devices") or {})
        listed = {i for i in _indexes(body.get("throttled_events") or []) if 0 <= i < len(items)}
        quota = {
            i for i, it in enumerate(items) if it.user_id in quota_ids or it.device_id in quota_ids
        }
        throttled = listed | {
            i for i, it in enumerate(items) if it.user_id in hot_ids or it.device_id in hot_ids
        }
        if not throttled and not quota:
            throttled = set(range(len(items)))  # the answer names nobody: everyone waits
        return Reading(
            Verdict.THROTTLED, f"HTTP 429: {error}", throttled=throttled - quota, daily_quota=quota
        )
    if status == 403:
        return Reading(Verdict.BLOCKED, f"HTTP 403 from Amplitude's firewall: {error}")
    if status >= 500 or status == 408:
        return Reading(Verdict.TRANSIENT, f"HTTP {status}: {error}")
    return Reading(
        Verdict.PAUSE, f"HTTP {status} from {endpoint}: {error} (check AMPLITUDE_SERVER_URL)"
    )


def _indexes(values: Any) -> list[int]:
    if isinstance(values, int):
        return [values]
    return [v for v in values if isinstance(v, int)] if isinstance(values, list) else []


def _is_page(answer: Answer, endpoint: str) -> bool:
    """A 400 that is not Amplitude's answer: the event APIs always answer JSON, the form APIs
    plain text; an HTML page comes from something in between."""
    if answer.body is not None:
        return False
    if endpoint not in FORM_ENDPOINTS:
        return True
    return answer.text.lstrip().lower().startswith(("<html", "<!doctype", "<head", "<body"))


def not_ingested(answer: Answer, items: Sequence[Prepared], endpoint: str) -> int:
    """How many events of an accepted request a 200 says were not ingested (it counts them in
    `events_ingested`; fewer than sent has been reported, docs/amplitude.md, "200")."""
    if endpoint in FORM_ENDPOINTS or answer.body is None:
        return 0
    ingested = answer.body.get("events_ingested")
    if not isinstance(ingested, int) or isinstance(ingested, bool):
        return 0
    return max(0, len(items) - ingested)
