"""What workers share through Redis (the broker): where the next claim of a kind starts, and
the events-per-second timeline. Both are hints: losing them costs speed, never a row."""

from __future__ import annotations

import time
from typing import Any

import redis


class ClaimFloors:
    """The keyset floor of the claim, one key per queue table and kind.

    A sync claims past the highest id the last full claim of the kind took (`db/queue.py`,
    `claim_statement`, says why). A row that becomes due below the floor (a retry, a released
    lease, a row that waited for an earlier one of its user) is reached when a claim comes back
    short, and at the latest when the floor expires: it is set with this lifetime and raised
    without renewing it, so a drain that never runs short goes back to the oldest due row once
    a minute (as often as beat's sync by default). Beat's syncs keep the floor too
    (bench/README.md, finding 3, "The fix, a keyset floor").
    """

    LIFETIME_SECONDS = 60

    def __init__(self, client: redis.Redis | None, queue_table: str) -> None:
        self.client = client
        self.queue_table = queue_table

    def key(self, kind: str) -> str:
        return f"ampsync:claim-floor:{self.queue_table}:{kind}"

    def read(self, kinds: list[str]) -> dict[str, int]:
        if self.client is None or not kinds:
            return dict.fromkeys(kinds, 0)
        values = self.client.mget([self.key(k) for k in kinds])
        return {k: int(v or 0) for k, v in zip(kinds, values, strict=True)}

    def keep(self, kind: str, floor: int) -> None:
        if self.client is None:
            return
        key = self.key(kind)
        if not floor:
            self.client.delete(key)
        # Two chains may write in turn and lower the floor: that costs one longer seek, no row.
        elif not self.client.set(key, floor, xx=True, keepttl=True):
            self.client.set(key, floor, px=self.LIFETIME_SECONDS * 1000)


class RateLimiter:
    """AMPSYNC_EVENTS_PER_SECOND shared by every worker: each request reserves its slot on one
    timeline in Redis (its clock, not a worker's) and sleeps until the slot starts."""

    _RESERVE = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
    local start = math.max(now, nxt)
    redis.call('SET', KEYS[1], tostring(start + tonumber(ARGV[1])), 'EX', 120)
    return tostring(start - now)
    """
    KEY = "ampsync:eps:next"

    def __init__(self, client: redis.Redis | None, events_per_second: int) -> None:
        self.client = client
        self.events_per_second = events_per_second

    def wait_for(self, events: int) -> None:
        if not self.events_per_second or self.client is None:
            return
        reply: Any = self.client.eval(self._RESERVE, 1, self.KEY, events / self.events_per_second)
        wait = float(reply)
        if wait > 0:
            time.sleep(wait)


class ThrottledIds:
    """Users and devices Amplitude throttled (429), remembered for its window across batches and
    workers, so other batches hold those users' rows instead of collecting more 429s
    (docs/amplitude.md, "Throttling"). A marker key per endpoint keeps the common case, nobody
    throttled, at one GET per batch."""

    _EXTEND = """
    if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
        redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
    end
    """

    def __init__(self, client: redis.Redis | None) -> None:
        self.client = client

    @staticmethod
    def _marker(endpoint: str) -> str:
        return f"ampsync:throttled:{endpoint}"

    def active(self, endpoint: str) -> bool:
        """Whether anyone of the endpoint is inside a throttle window."""
        return self.client is not None and bool(self.client.get(self._marker(endpoint)))

    def which(self, endpoint: str, ids: set[str]) -> set[str]:
        """Those of `ids` still inside a throttle window."""
        if self.client is None or not ids:
            return set()
        ordered = sorted(ids)
        marker = self._marker(endpoint)
        found = self.client.mget([f"{marker}:{i}" for i in ordered])
        return {i for i, hit in zip(ordered, found, strict=True) if hit}

    def remember(self, endpoint: str, ids: set[str], seconds: float) -> None:
        if self.client is None or not ids or seconds <= 0:
            return
        marker, ttl = self._marker(endpoint), max(1, int(seconds * 1000))
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.set(f"{marker}:{i}", 1, px=ttl)
        # The marker lives as long as the longest window of any id behind it.
        pipe.eval(self._EXTEND, 1, marker, ttl)
        pipe.execute()
