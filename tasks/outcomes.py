"""The vocabulary every layer shares: row kinds, row statuses and the failure classes that
open every `last_error`. The one place these literals are written (docs/architecture.md)."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    IDENTIFY = "identify"
    EVENT = "event"
    GROUP_IDENTIFY = "group_identify"


class Status(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    SENT = "sent"
    FAILED = "failed"


KINDS: tuple[str, ...] = tuple(k.value for k in Kind)
# Kinds whose rows of one key reach Amplitude in id order (docs/architecture.md, "Order").
ORDERED_KINDS: tuple[str, ...] = (Kind.IDENTIFY.value, Kind.GROUP_IDENTIFY.value)

# Failure classes: every last_error opens with one, so operators filter and retry by class
# (`ampsync retry-failed --class`), and the SQL that selects a class matches its prefix.
INVALID = "invalid row:"
REJECTED = "rejected by Amplitude:"
GAVE_UP = "gave up after"
RETRYING = "will retry:"
FAILURE_CLASSES = {"gave-up": GAVE_UP, "rejected": REJECTED, "invalid": INVALID}
