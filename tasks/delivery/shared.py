"""What workers share through Redis (the broker): where the next claim of a kind starts, the
events-per-second timeline and its adaptive cap, the users Amplitude throttled, and the outcomes
of each endpoint's last requests. All are hints: losing them costs speed, never a row."""

from __future__ import annotations

import time
from typing import Any

import redis

from . import policy


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
    """The events-per-second cap shared by every worker: AMPSYNC_EVENTS_PER_SECOND (0: none),
    cut when Amplitude throttles the project and grown back (`policy.allowed_rate`). Each
    request reserves its slot on one timeline in Redis (its clock, not a worker's) and sleeps
    until the slot starts; the events sent per second are counted, so that a cut with no cap in
    force starts from what the workers were really sending."""

    # The Redis clock, and the cut in force ("rate:since"), with this request counted.
    _LOOK = """
    local t = redis.call('TIME')
    local bucket = ARGV[1] .. t[1]
    redis.call('INCRBY', bucket, ARGV[2])
    redis.call('EXPIRE', bucket, 3)
    return {t[1] .. '.' .. string.format('%06d', tonumber(t[2])), redis.call('GET', KEYS[1])}
    """
    # The same, and the events counted in the last second and in this one so far.
    _OBSERVE = """
    local t = redis.call('TIME')
    local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
    local last = redis.call('GET', ARGV[1] .. (tonumber(t[1]) - 1)) or '0'
    local this = redis.call('GET', ARGV[1] .. t[1]) or '0'
    return {now, redis.call('GET', KEYS[1]), last, this}
    """
    _RESERVE = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
    local start = math.max(now, nxt)
    redis.call('SET', KEYS[1], tostring(start + tonumber(ARGV[1])), 'EX', 120)
    return tostring(start - now)
    """
    KEY = "ampsync:eps:next"
    CUT_KEY = "ampsync:eps:cut"
    COUNT_PREFIX = "ampsync:eps:count:"

    def __init__(self, client: redis.Redis | None, events_per_second: int) -> None:
        self.client = client
        self.events_per_second = events_per_second

    def wait_for(self, events: int) -> None:
        if self.client is None:
            return
        now, cut = self.client.eval(self._LOOK, 1, self.CUT_KEY, self.COUNT_PREFIX, events)
        rate = self._allowed(float(now), cut)
        if not rate:
            return
        reply: Any = self.client.eval(self._RESERVE, 1, self.KEY, events / rate)
        wait = float(reply)
        if wait > 0:
            time.sleep(wait)

    def allowed(self) -> float:
        """The cap in force now, events/s (0: none)."""
        if self.client is None:
            return float(self.events_per_second)
        now, cut, _last, _this = self.client.eval(self._OBSERVE, 1, self.CUT_KEY, self.COUNT_PREFIX)
        return self._allowed(float(now), cut)

    def throttled(self) -> float | None:
        """Amplitude throttled the project: cut the shared rate (`policy.cut_rate`) unless it
        was cut a moment ago; returns the new cap, None when not cut."""
        if self.client is None:
            return None
        now_text, cut, last, this = self.client.eval(
            self._OBSERVE, 1, self.CUT_KEY, self.COUNT_PREFIX
        )
        now = float(now_text)
        since = now - float(cut.split(b":")[1]) if cut else None
        if not policy.may_cut(since):
            return None
        allowed = self._allowed(now, cut)
        rate = policy.cut_rate(allowed, float(max(int(last), int(this))), self.events_per_second)
        lifetime = policy.cut_lifetime(rate, self.events_per_second)
        self.client.set(self.CUT_KEY, f"{rate}:{now}", px=int(lifetime * 1000))
        return rate

    def _allowed(self, now: float, cut: bytes | None) -> float:
        if not cut:
            return float(self.events_per_second)
        rate, since = (float(v) for v in cut.split(b":"))
        return policy.allowed_rate(rate, now - since, self.events_per_second)


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


class Outcomes:
    """The outcomes of an endpoint's last requests, from every worker (newest first, at most
    `policy.OUTCOME_WINDOW`), so that a pause follows failure that is consistent across
    requests and workers (`policy.sustained_failure`), not one worker's unlucky 5xx. One round
    trip per request. The window lapses after PATIENCE_SECONDS without a request."""

    PATIENCE_SECONDS = 300

    def __init__(self, client: redis.Redis | None, queue_table: str) -> None:
        self.client = client
        self.queue_table = queue_table

    def key(self, endpoint: str) -> str:
        return f"ampsync:outcomes:{self.queue_table}:{endpoint}"

    def add(self, endpoint: str, failed: bool) -> list[bool]:
        """Record one request's outcome; returns the window with it. Without Redis, only this
        outcome: then a single failure counts as the whole window."""
        if self.client is None:
            return [failed]
        key = self.key(endpoint)
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(key, int(failed))
        pipe.ltrim(key, 0, policy.OUTCOME_WINDOW - 1)
        pipe.expire(key, self.PATIENCE_SECONDS)
        pipe.lrange(key, 0, -1)
        window = pipe.execute()[-1]
        return [v == b"1" for v in window]

    def forget(self, endpoint: str) -> None:
        """A probe went through after a pause: the failures before it are history."""
        if self.client is not None:
            self.client.delete(self.key(endpoint))


class ProbeTurn:
    """After a pause one request goes first: the worker whose send takes this turn probes; the
    others give their rows back until the probe's answer clears or renews the pause. A lost
    turn (Redis restarted, the prober died) costs at most a second probe."""

    def __init__(self, client: redis.Redis | None, queue_table: str) -> None:
        self.client = client
        self.queue_table = queue_table

    def take(self, endpoint: str, seconds: float) -> bool:
        if self.client is None:
            return True
        key = f"ampsync:probe:{self.queue_table}:{endpoint}"
        return bool(self.client.set(key, 1, nx=True, px=max(1, int(seconds * 1000))))

    def release(self, endpoint: str) -> None:
        if self.client is not None:
            self.client.delete(f"ampsync:probe:{self.queue_table}:{endpoint}")
