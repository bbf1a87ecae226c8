"""What a sync and a send did: their Celery results (shown in Flower and by `sync --wait`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SendResult:
    kind: str
    token: str
    endpoint: str = ""
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    truncated: int = 0
    requests: int = 0
    # Events Amplitude accepted but did not count in `events_ingested` (logged: docs/amplitude.md).
    not_ingested: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    stale: bool = False
    paused: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SyncResult:
    run_id: str
    rows_claimed: int = 0
    batches_enqueued: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    expired_leases_released: int = 0
    expired_leases_failed: int = 0
    paused: dict[str, str] = field(default_factory=dict)
    more_due: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
