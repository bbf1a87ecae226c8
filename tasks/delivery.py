"""The delivery path: claim → build payloads → send → read the answer → acknowledge.

Celery tasks call `Pipeline.sync` and `Pipeline.send`; nothing here knows about Celery except
the `enqueue` callback a sync is given. One `Pipeline` per process holds the engine, the queue
tables, the HTTP client and the shared rate limiter.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import cached_property

import orjson
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from . import amplitude, payloads, queue
from .amplitude import Verdict
from .broker import redis_client
from .settings import Settings

log = logging.getLogger("ampsync.delivery")


@dataclass
class SendResult:
    """What one send task did; also its Celery result (shown in Flower)."""

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
    answers: dict[str, int] = field(default_factory=dict)
    stale: bool = False
    paused: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
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

    def as_dict(self) -> dict:
        return asdict(self)


class Pipeline:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tables = queue.define_tables(settings.queue_table)
        self._failing: dict[str, bool] = {}

    @cached_property
    def engine(self):
        return queue.make_engine(self.settings.database_url)

    @cached_property
    def client(self) -> amplitude.Client:
        s = self.settings
        return amplitude.Client(s.server_url, s.require_api_key(), s.http_timeout_seconds,
                                s.min_id_length)  # fmt: skip

    @cached_property
    def redis(self):
        return redis_client(self.settings.celery_broker_url)

    def endpoint(self, kind: str) -> str:
        return payloads.endpoint_for(kind, self.settings.event_api, self.settings.identify_api)

    def batch_rows(self, kind: str) -> int:
        """Rows per claim: the configured batch size within the endpoint's count limit, and no
        more than one second of the events-per-second cap."""
        rows = min(self.settings.rows_per_batch, payloads.MAX_ITEMS[self.endpoint(kind)])
        if self.settings.events_per_second:
            rows = min(rows, self.settings.events_per_second)
        return rows

    # --- sync ----------------------------------------------------------------------------------

    def sync(self, kinds: list[str], enqueue: Callable[[str, str, str], None],
             queued_batches: int, thorough: bool = True) -> SyncResult:  # fmt: skip
        """Sweep expired leases, then claim as many batches as workers can start within a lease
        and hand each to `enqueue(kind, token, run_id)`. Never waits on the send tasks."""
        s = self.settings
        result = SyncResult(run_id=uuid.uuid4().hex[:12])
        with self.engine.connect() as conn:
            started = self._db_now(conn)
            result.expired_leases_failed, result.expired_leases_released = queue.sweep(
                conn, self.tables, s.max_attempts, s.max_age_seconds, thorough
            )
            room = max(0, s.max_queued_batches - queued_batches)
            paused = {k: p for k in kinds if (p := self.pause_reason(conn, self.endpoint(k)))}
            result.paused = {self.endpoint(k): reason for k, reason in paused.items()}
            active = [k for k in kinds if k not in paused]
            floors = self._claim_floors(active)
            # Round-robin over kinds so a backlog of one kind does not starve the others.
            while room > 0 and active:
                for kind in list(active):
                    if room == 0:
                        break
                    limit, floor = self.batch_rows(kind), floors[kind]
                    claim = queue.claim(conn, self.tables, kind, limit, s.lease_seconds,
                                        after_id=floor)  # fmt: skip
                    floors[kind] = claim.next_floor(limit)
                    if claim.rows == 0:
                        if not floor:
                            active.remove(kind)
                        continue
                    enqueue(kind, claim.token, result.run_id)
                    room -= 1
                    result.rows_claimed += claim.rows
                    result.batches_enqueued += 1
                    result.by_kind[kind] = result.by_kind.get(kind, 0) + claim.rows
            for kind, floor in floors.items():
                self._keep_claim_floor(kind, floor)
            result.more_due = bool(active) or any(
                queue.has_due_rows(conn, self.tables, k) for k in kinds if k not in paused
            ) if room == 0 else False  # fmt: skip
            if not (result.rows_claimed or result.paused or result.expired_leases_released
                    or result.expired_leases_failed):  # fmt: skip
                return result  # an idle sync leaves no history
            queue.record_run(conn, self.tables, {
                "run_id": result.run_id, "task": "sync", "kind": ",".join(kinds),
                "started_at": started, "finished_at": queue.utcnow(),
                "rows_claimed": result.rows_claimed, "requests": 0,
                "error": "; ".join(f"{e} paused: {r}" for e, r in result.paused.items())[:2000] or None,
            })  # fmt: skip
        return result

    # --- send ----------------------------------------------------------------------------------

    def send(self, kind: str, token: str, rerun: bool = False, run_id: str = "") -> SendResult:
        """Send a claimed batch; `rerun` when the task runs again after its worker died."""
        s = self.settings
        endpoint = self.endpoint(kind)
        result = SendResult(kind=kind, token=token, endpoint=endpoint)
        clock = time.perf_counter
        t0 = clock()
        with self.engine.connect() as conn:
            given_up = queue.count_rerun(conn, self.tables, token, s.max_attempts) if rerun else 0
            rows = queue.renew_and_load(conn, self.tables, token, s.lease_seconds)
            if not rows:
                result.stale = not given_up  # another sync reclaimed these rows: send nothing
                result.failed = given_up
                return result
            deferred = queue.defer_out_of_order(conn, self.tables, kind, token)
            if deferred:
                rows = [r for r in rows if r.id not in deferred]
            result.deferred = len(deferred)
            result.claimed = len(rows)
            t1 = clock()
            started = self._db_now(conn)
            builder = payloads.Builder(endpoint, s.min_id_length, s.max_future_seconds, started)
            prepared = builder.prepare(rows)
            result.truncated = prepared.truncated
            t2 = clock()
            ack = queue.Acknowledgement(sent=[], failed=dict(prepared.invalid), retry={})
            reason = self.pause_reason(conn, endpoint)
            if reason:
                result.paused = reason
                self._retry(ack, [i.row_id for i in prepared.items], self._pause_left(conn, endpoint),
                            refund=True, reason=f"{queue.RETRYING} {endpoint} paused: {reason}")  # fmt: skip
            else:
                self._deliver(conn, endpoint, prepared.items, ack, rows, result)
            t3 = clock()
            ack.all_sent = len(ack.sent) == len(rows)
            result.sent = len(ack.sent)
            result.failed = len(ack.failed) + given_up
            result.retried = sum(len(ids) for ids in ack.retry.values())
            self._acknowledge(conn, token, ack, history={
                "run_id": run_id or "manual", "task": "batch", "kind": kind, "claim_token": token,
                "started_at": started, "finished_at": queue.utcnow(),
                "rows_claimed": result.claimed, "rows_sent": result.sent,
                "rows_failed": result.failed, "rows_retried": result.retried,
                "requests": result.requests, "values_truncated": result.truncated,
                "answers": orjson.dumps(result.answers).decode(),
                "error": result.paused,
            })  # fmt: skip
            t4 = clock()
        result.seconds = {"load": t1 - t0, "build": t2 - t1, "http": t3 - t2, "ack": t4 - t3}
        return result

    def _acknowledge(self, conn, token: str, ack: queue.Acknowledgement, history: dict) -> None:
        """Write the outcome; if the database dropped the connection while Amplitude answered,
        once more on a new connection — else the rows would wait out their lease and go again
        (applied twice through the form APIs, which deduplicate nothing)."""
        try:
            queue.acknowledge(conn, self.tables, token, ack, history=history)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            log.warning("acknowledging batch %s again on a new connection: %s", token,
                        str(exc.orig).strip().splitlines()[0][:200])  # fmt: skip
            with self.engine.connect() as fresh:
                queue.acknowledge(fresh, self.tables, token, ack, history=history)

    def _deliver(self, conn, endpoint: str, items: list[payloads.Prepared],
                 ack: queue.Acknowledgement, rows: list,
                 result: SendResult) -> None:  # fmt: skip
        """Send the items in order; split, drop or hold back rows as the answers say."""
        s = self.settings
        max_items = min(s.rows_per_batch, payloads.MAX_ITEMS[endpoint])
        if s.events_per_second:
            max_items = min(max_items, s.events_per_second)
        work = list(reversed(list(payloads.pack(items, endpoint, max_items))))
        waiting_keys: set[str] = set()  # users held back by a 429: their later rows wait too
        answers: Counter[str] = Counter()
        while work:
            request = work.pop()
            held = [i for i in request if _keys(i) & waiting_keys] if waiting_keys else None
            if held:
                self._retry(ack, [i.row_id for i in held], self._throttle_wait(endpoint),
                            refund=True, reason=f"{queue.RETRYING} an earlier row of this user "
                            "was throttled (429)")  # fmt: skip
                request = [i for i in request if not (_keys(i) & waiting_keys)]
                if not request:
                    continue
            self._rate_limit(len(request))
            answer = self.client.send(endpoint, request)
            result.requests += 1
            answers[str(answer.status or "no answer")] += 1
            reading = amplitude.read(answer, request, endpoint)
            if reading.verdict is Verdict.SENT:
                ack.sent.extend(i.row_id for i in request)
                self._record_success(conn, endpoint)
            elif reading.verdict is Verdict.REJECTED_ROWS:
                for index, why in reading.rejected.items():
                    ack.failed[request[index].row_id] = f"{queue.REJECTED} {why}"
                rest = [i for n, i in enumerate(request) if n not in reading.rejected]
                if rest:
                    work.append(rest)
            elif reading.verdict is Verdict.SPLIT:
                if len(request) == 1:
                    ack.failed[request[0].row_id] = f"{queue.REJECTED} {reading.reason}"
                else:
                    half = len(request) // 2
                    work.extend([request[half:], request[:half]])
            elif reading.verdict is Verdict.THROTTLED:
                for index in sorted(reading.daily_quota):
                    waiting_keys |= _keys(request[index])
                    self._retry(ack, [request[index].row_id], s.daily_quota_wait_seconds, refund=True,
                                reason=f"{queue.RETRYING} user over Amplitude's daily quota; "
                                "retrying hourly")  # fmt: skip
                for index in sorted(reading.throttled):
                    waiting_keys |= _keys(request[index])
                    self._retry(ack, [request[index].row_id], self._throttle_wait(endpoint),
                                refund=True, reason=f"{queue.RETRYING} {reading.reason}")  # fmt: skip
                rest = [i for n, i in enumerate(request)
                        if n not in reading.throttled and n not in reading.daily_quota]  # fmt: skip
                if rest:
                    work.append(rest)
            else:
                # TRANSIENT or PAUSE: this request and everything after it waits.
                never_sent = [i.row_id for chunk in work for i in chunk]
                work.clear()
                if reading.verdict is Verdict.PAUSE:
                    delay = self._pause(conn, endpoint, reading.reason, immediate=True)
                    self._retry(ack, [i.row_id for i in request] + never_sent, delay, refund=True,
                                reason=f"{queue.RETRYING} {endpoint} paused: {reading.reason}")  # fmt: skip
                    result.paused = reading.reason
                    break
                delay = self._pause(conn, endpoint, reading.reason, immediate=False)
                if delay:  # the endpoint is failing for everyone: do not spend attempts
                    self._retry(ack, [i.row_id for i in request] + never_sent, delay, refund=True,
                                reason=f"{queue.RETRYING} {endpoint} paused: {reading.reason}")  # fmt: skip
                    result.paused = reading.reason
                    break
                attempts = {r.id: r.attempts for r in rows}  # not per batch: 4 % of its Python time
                for item in request:
                    n = attempts[item.row_id]
                    if n >= s.max_attempts:
                        ack.failed[item.row_id] = (
                            f"{queue.GAVE_UP} {n} attempts: {reading.reason}"
                        )
                    else:
                        self._retry(ack, [item.row_id], self.backoff(n), refund=False,
                                    reason=f"{queue.RETRYING} attempt {n}: {reading.reason}")  # fmt: skip
                self._retry(ack, never_sent, self.backoff(1), refund=True,
                            reason=f"{queue.RETRYING} an earlier request of the batch failed: "
                            f"{reading.reason}")  # fmt: skip
        result.answers = dict(answers)

    @staticmethod
    def _retry(ack: queue.Acknowledgement, ids: list[int], delay: float, refund: bool,
               reason: str) -> None:  # fmt: skip
        if ids:
            ack.retry.setdefault((round(delay, 3), refund, reason), []).extend(ids)

    def backoff(self, attempts: int) -> float:
        """Exponential with full jitter around the midpoint, capped."""
        s = self.settings
        ceiling = min(s.backoff_max_seconds, s.backoff_base_seconds * 2 ** max(0, attempts - 1))
        return ceiling * random.uniform(0.5, 1.0)

    def _throttle_wait(self, endpoint: str) -> float:
        s = self.settings
        return s.throttle_wait_v2_seconds if endpoint == "http_v2" else s.throttle_wait_batch_seconds

    # --- keyset floor of the claim (one Redis key per queue table and kind) -------------------

    # A sync claims past the highest id the last full claim of the kind took (queue.
    # claim_statement says why). A row that becomes due below the floor (a retry, a released
    # lease, a row that waited for an earlier one of its user) is reached when a claim comes
    # back short, and at the latest when the floor expires: it is set with this lifetime and
    # raised without renewing it, so a drain that never runs short goes back to the oldest due
    # row once a minute (as often as beat's sync by default). Beat's syncs keep the floor too:
    # starting them at the oldest row, every second in the benchmark, made 1M events' claims
    # 274 / 1,488 ms (p50 / p95) against 201 / 296 ms (bench --analyze, bench/README.md).
    CLAIM_FLOOR_SECONDS = 60

    def _claim_floor_key(self, kind: str) -> str:
        return f"ampsync:claim-floor:{self.settings.queue_table}:{kind}"

    def _claim_floors(self, kinds: list[str]) -> dict[str, int]:
        if self.redis is None or not kinds:
            return dict.fromkeys(kinds, 0)
        values = self.redis.mget([self._claim_floor_key(k) for k in kinds])
        return {k: int(v or 0) for k, v in zip(kinds, values, strict=True)}

    def _keep_claim_floor(self, kind: str, floor: int) -> None:
        if self.redis is None:
            return
        key = self._claim_floor_key(kind)
        if not floor:
            self.redis.delete(key)
        # Two chains may write in turn and lower the floor: that costs one longer seek, no row.
        elif not self.redis.set(key, floor, xx=True, keepttl=True):
            self.redis.set(key, floor, px=self.CLAIM_FLOOR_SECONDS * 1000)

    # --- shared rate limit ---------------------------------------------------------------------

    _RESERVE = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
    local start = math.max(now, nxt)
    redis.call('SET', KEYS[1], tostring(start + tonumber(ARGV[1])), 'EX', 120)
    return tostring(start - now)
    """

    def _rate_limit(self, events: int) -> None:
        """Reserve a slot on a timeline shared by every worker (events_per_second)."""
        eps = self.settings.events_per_second
        if not eps or self.redis is None:
            return
        wait = float(self.redis.eval(self._RESERVE, 1, "ampsync:eps:next", events / eps))
        if wait > 0:
            time.sleep(wait)

    # --- endpoint pause (a table beside the queue, read by every worker and `status`) ----------

    def pause_reason(self, conn, endpoint: str) -> str | None:
        """Why the endpoint is paused, or None; remembers whether it has recent failures."""
        t = self.tables.endpoints
        with conn.begin():
            row = conn.execute(
                select(t.c.reason, t.c.failures, t.c.paused_until > queue.utcnow())
                .where(t.c.endpoint == endpoint)
            ).first()
        self._failing[endpoint] = bool(row and row[1])
        return row[0] if row and row[2] else None

    def _pause_left(self, conn, endpoint: str) -> float:
        t = self.tables.endpoints
        with conn.begin():
            row = conn.execute(select(t.c.paused_until, queue.utcnow()).where(t.c.endpoint == endpoint)).first()
        if not row or row[0] is None:
            return 1.0
        return max(1.0, (row[0] - row[1]).total_seconds())

    def _pause(self, conn, endpoint: str, reason: str, immediate: bool) -> float:
        """Count a failure of the endpoint; past the threshold (or at once for a bad key or a
        403) pause it for all workers. Returns the pause in seconds, 0 when not paused."""
        s = self.settings
        t = self.tables.endpoints
        with conn.begin():
            row = conn.execute(select(t.c.failures).where(t.c.endpoint == endpoint)).first()
            failures = (row[0] if row else 0) + (s.pause_after_failures if immediate else 1)
            over = failures - s.pause_after_failures
            pause = min(s.pause_max_seconds, s.pause_base_seconds * 2 ** over) if over >= 0 else 0.0
            values = dict(failures=failures, reason=reason[:2000], updated_at=queue.utcnow(),
                          paused_until=queue.utcnow_plus(pause) if pause else None)  # fmt: skip
            if row:
                conn.execute(update(t).where(t.c.endpoint == endpoint).values(**values))
            else:
                conn.execute(t.insert().values(endpoint=endpoint, **values))
        self._failing[endpoint] = True
        if pause:
            log.warning("endpoint %s paused for %.0f s: %s", endpoint, pause, reason)
        return pause

    def _record_success(self, conn, endpoint: str) -> None:
        if not self._failing.get(endpoint):
            return  # nothing to reset: no write on the hot path
        self._failing[endpoint] = False
        t = self.tables.endpoints
        with conn.begin():
            conn.execute(
                update(t)
                .where(t.c.endpoint == endpoint, t.c.failures > 0)
                .values(failures=0, paused_until=None, reason=None, updated_at=queue.utcnow())
            )

    @staticmethod
    def _db_now(conn) -> datetime:
        with conn.begin():
            return conn.execute(select(queue.utcnow())).scalar_one()

    def paused_endpoints(self) -> list[dict]:
        t = self.tables.endpoints
        with self.engine.connect() as conn, conn.begin():
            rows = conn.execute(
                select(t.c.endpoint, t.c.paused_until, t.c.failures, t.c.reason, queue.utcnow())
            ).all()
        return [
            {"endpoint": e, "paused_until": p, "failures": f, "reason": r,
             "paused": p is not None and p > now}
            for e, p, f, r, now in rows
        ]  # fmt: skip


def _keys(item: payloads.Prepared) -> set[str]:
    return {k for k in (item.user_id, item.device_id) if k}


__all__ = ["Pipeline", "SendResult", "SyncResult"]
