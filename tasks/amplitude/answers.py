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
        return Reading(Verdict.SPLIT, f"HTTP 413: {error}")
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
        return Reading(Verdict.PAUSE, f"HTTP 403 from Amplitude's firewall: {error}")
    if status >= 500 or status == 408:
        return Reading(Verdict.TRANSIENT, f"HTTP {status}: {error}")
    return Reading(
        Verdict.PAUSE, f"HTTP {status} from {endpoint}: {error} (check AMPLITUDE_SERVER_URL)"
    )


def _indexes(values: Any) -> list[int]:
    if isinstance(values, int):
        return [values]
    return [v for v in values if isinstance(v, int)] if isinstance(values, list) else []
