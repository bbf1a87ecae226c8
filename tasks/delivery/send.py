"""A send: load the claim's rows → build payloads → deliver → acknowledge every row.

`Delivery` walks the requests of one batch and applies what each answer means (a verdict of
amplitude/answers.py) to the batch's acknowledgement: sent, failed with a reason, or retried
after a wait. docs/architecture.md has the table of answers and outcomes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from ..amplitude import payloads
from ..amplitude.answers import Reading, Verdict, not_ingested, read
from ..amplitude.payloads import Prepared
from ..db import endpoints, history, queue, reports
from ..db.queue import Acknowledgement
from ..db.sql import utcnow
from ..outcomes import GAVE_UP, REJECTED, RETRYING
from ..settings import Settings
from . import policy
from .results import SendResult

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger("ampsync.delivery")


def run_send(
    p: Pipeline, kind: str, token: str, rerun: bool = False, run_id: str = ""
) -> SendResult:
    """Send a claimed batch; `rerun` when the task runs again after its worker died."""
    s = p.settings
    endpoint = p.endpoint(kind)
    result = SendResult(kind=kind, token=token, endpoint=endpoint)
    clock = time.perf_counter
    t0 = clock()
    with p.engine.connect() as conn:
        given_up = queue.count_rerun(conn, p.tables, token, s.max_attempts) if rerun else 0
        rows = queue.renew_and_load(
            conn,
            p.tables,
            token,
            s.lease_seconds,
            policy.send_time_limit(s.lease_seconds),
            payloads.row_limit(endpoint),  # larger JSON stays in the database, the row fails
        )
        if not rows:
            result.stale = not given_up  # another sync reclaimed these rows: send nothing
            result.failed = given_up
            return result
        deferred = queue.defer_out_of_order(conn, p.tables, kind, token)
        if deferred:
            rows = [r for r in rows if r.id not in deferred]
        result.deferred = len(deferred)
        result.claimed = len(rows)
        t1 = clock()
        started = reports.db_now(conn)
        builder = payloads.Builder(endpoint, s.min_id_length, s.max_future_seconds, started)
        prepared = builder.prepare(rows)
        result.truncated = prepared.truncated
        t2 = clock()
        ack = Acknowledgement(sent=[], failed=dict(prepared.invalid), retry={})
        state = endpoints.read(conn, p.tables, endpoint)
        p.failing[endpoint] = state.failures > 0
        probing = state.probe_due
        if state.paused or (
            probing and not p.probe.take(endpoint, policy.probe_seconds(s.http_timeout_seconds))
        ):
            # Paused: the rows wait it out, attempts refunded. Another send is probing after
            # the pause: they wait a second (syncs claim one batch of a probing endpoint).
            result.paused = state.reason
            retry(
                ack,
                _ids(prepared.items),
                max(1.0, state.pause_left_seconds),
                refund=True,
                reason=f"{RETRYING} {endpoint} paused: {state.reason}",
            )
        else:
            deliver(p, conn, endpoint, prepared.items, ack, rows, result, probing)
        t3 = clock()
        ack.all_sent = len(ack.sent) == len(rows)
        result.sent = len(ack.sent)
        result.failed = len(ack.failed) + given_up
        result.retried = sum(len(ids) for ids in ack.retry.values())
        _acknowledge(
            p,
            conn,
            token,
            ack,
            {
                "run_id": run_id or "manual",
                "task": history.BATCH,
                "kind": kind,
                "claim_token": token,
                "started_at": started,
                "finished_at": utcnow(),
                "rows_claimed": result.claimed,
                "rows_sent": result.sent,
                "rows_failed": result.failed,
                "rows_retried": result.retried,
                "requests": result.requests,
                "values_truncated": result.truncated,
                "answers": orjson.dumps(result.answers).decode(),
                "error": result.paused,
            },
        )
        t4 = clock()
    result.seconds = {"load": t1 - t0, "build": t2 - t1, "http": t3 - t2, "ack": t4 - t3}
    return result


def _acknowledge(
    p: Pipeline, conn: Connection, token: str, ack: Acknowledgement, run: dict[str, Any]
) -> None:
    """Write the outcome; if the database dropped the connection while Amplitude answered,
    once more on a new connection — else the rows would wait out their lease and go again
    (applied twice through the form APIs, which deduplicate nothing)."""
    try:
        queue.acknowledge(conn, p.tables, token, ack, history=run)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        log.warning(
            "acknowledging batch %s again on a new connection: %s",
            token,
            str(exc.orig).strip().splitlines()[0][:200],
        )
        with p.engine.connect() as fresh:
            queue.acknowledge(fresh, p.tables, token, ack, history=run)


def retry(ack: Acknowledgement, ids: list[int], delay: float, refund: bool, reason: str) -> None:
    """Rows go back to pending after `delay` s; `refund` gives back the attempt their claim
    counted (the wait was not their fault: a 429, a pause, an earlier request's failure)."""
    if ids:
        ack.retry.setdefault((round(delay, 3), refund, reason), []).extend(ids)


def _ids(items: list[Prepared]) -> list[int]:
    """The row ids of items: an item may carry several merged rows."""
    return [row_id for item in items for row_id in item.ids()]


def keys(item: Prepared) -> set[str]:
    """The user and device a row speaks for: a 429 for one holds back its later rows."""
    return {k for k in (item.user_id, item.device_id) if k}


def deliver(
    p: Pipeline,
    conn: Connection,
    endpoint: str,
    items: list[Prepared],
    ack: Acknowledgement,
    rows: Sequence[Any],
    result: SendResult,
    probing: bool = False,
) -> None:
    """Send the items in requests, in order; the endpoint's shared state (failures, pauses,
    the probe after a pause, the adaptive rate) is kept here, what each answer means for the
    rows is `Delivery.apply`'s. `probing`: this send's first request is the one that goes
    after a pause, before every worker resumes."""
    s = p.settings
    delivery = Delivery(s, endpoint, ack, rows, result)
    delivery.plan(items)
    if p.throttled.active(endpoint):  # other batches' 429s: hold those users' rows too
        delivery.waiting_keys = p.throttled.which(endpoint, {k for i in items for k in keys(i)})
    while (request := delivery.next_request()) is not None:
        p.rate.wait_for(len(request))
        answer = p.client.send(endpoint, request)
        reading = delivery.judge(read(answer, request, endpoint))
        pause = 0.0
        failed = reading.verdict in (Verdict.TRANSIENT, Verdict.PAUSE) or (
            reading.verdict is Verdict.BLOCKED and len(request) == 1 and delivery.current is None
        )
        window = p.outcomes.add(endpoint, failed)
        if failed:
            pause = _record_failure(p, conn, endpoint, reading, window, probing)
        elif probing or reading.verdict is Verdict.SENT:
            _record_success(p, conn, endpoint, probing)
        if probing:
            p.probe.release(endpoint)
            probing = False
        if reading.verdict is Verdict.THROTTLED and policy.project_throttled(
            len(reading.throttled), len(request)
        ):
            cut = p.rate.throttled()
            if cut:
                log.warning(
                    "%s throttled the project: shared rate cut to %.0f events/s", endpoint, cut
                )
        if reading.verdict is Verdict.SENT:
            short = not_ingested(answer, request, endpoint)
            if short:
                result.not_ingested += short
                log.warning(
                    "%s accepted %d events but reports %d fewer ingested (batch %s)",
                    endpoint,
                    len(request),
                    short,
                    result.token,
                )
        delivery.apply(answer.status, reading, request, pause)
    if probing:  # nothing was sent (every row invalid or held back): let another send probe
        p.probe.release(endpoint)
    delivery.finish()
    p.throttled.remember(endpoint, delivery.throttled_keys, policy.throttle_wait(endpoint, s))
    p.throttled.remember(endpoint, delivery.quota_keys, s.daily_quota_wait_seconds)


def _record_failure(
    p: Pipeline,
    conn: Connection,
    endpoint: str,
    reading: Reading,
    window: list[bool],
    probing: bool,
) -> float:
    """Count a failure of the endpoint. It pauses for all workers when failure is sustained
    across requests and workers (`policy.sustained_failure` over `window`), when the probe
    after a pause fails, or at once for a bad key or a request Amplitude refuses as such.
    Returns the pause in seconds, 0 when not paused."""
    s = p.settings
    pausing = (
        probing
        or reading.verdict is Verdict.PAUSE
        or policy.sustained_failure(window, s.pause_after_failures, s.pause_failure_ratio)
    )
    pause = endpoints.record_failure(
        conn,
        p.tables,
        endpoint,
        s.pause_after_failures if reading.verdict is Verdict.PAUSE else 1,
        reading.reason,
        lambda failures: (
            policy.pause_seconds(
                failures, s.pause_after_failures, s.pause_base_seconds, s.pause_max_seconds
            )
            if pausing
            else 0.0
        ),
    )
    p.failing[endpoint] = True
    if pause:
        log.warning("endpoint %s paused for %.0f s: %s", endpoint, pause, reading.reason)
    return pause


def _record_success(p: Pipeline, conn: Connection, endpoint: str, probing: bool) -> None:
    if probing:  # Amplitude answers again after a pause: its failures are history
        p.outcomes.forget(endpoint)
    if not p.failing.get(endpoint):
        return  # nothing to reset: no write on the hot path
    p.failing[endpoint] = False
    endpoints.clear_failures(conn, p.tables, endpoint)


class Delivery:
    """The requests of one batch and what their answers mean for its rows, with no I/O: each
    answer is applied to the batch's acknowledgement and decides what is sent next (halves,
    the rest, or nothing). tests/unit/test_delivery.py drives it answer by answer."""

    def __init__(
        self,
        settings: Settings,
        endpoint: str,
        ack: Acknowledgement,
        rows: Sequence[Any],
        result: SendResult,
    ) -> None:
        self.settings, self.endpoint = settings, endpoint
        self.ack, self.rows, self.result = ack, rows, result
        self.work: list[list[Prepared]] = []  # a stack: the next request is last
        self.waiting_keys: set[str] = set()  # users held back by a 429: their later rows wait
        # The halves of a split request share a `Split`; `current` is the one of the request
        # being answered (None for a request that is not a half).
        self.splits: dict[int, Split] = {}
        self.current: Split | None = None
        # Single items refused while the twin of their half was unanswered: (split, ids, why).
        self.held: list[tuple[Split, tuple[int, ...], str]] = []
        # Ids Amplitude throttled in this batch, and those over their daily quota.
        self.throttled_keys: set[str] = set()
        self.quota_keys: set[str] = set()
        self.status = 0  # the HTTP status of the answer being applied (0: none)

    def plan(self, items: list[Prepared]) -> None:
        s = self.settings
        limit = policy.rows_per_request(self.endpoint, s.batch_size, s.events_per_second)
        self.work = list(reversed(list(payloads.pack(items, self.endpoint, limit))))

    def next_request(self) -> list[Prepared] | None:
        """The next request to send, without rows held back by a 429; None when done."""
        while self.work:
            popped = self.work.pop()
            self.current = self.splits.pop(id(popped), None)
            request = self.hold_back_throttled(popped)
            if request:
                return request
        self.current = None
        return None

    def judge(self, reading: Reading) -> Reading:
        """The halves of a request both refused the same way: the request, not a row, is
        refused (a 400 about the request, a firewall blocking everything): pause, fail none."""
        split = self.current
        if (
            split is not None
            and reading.verdict in (Verdict.SPLIT, Verdict.BLOCKED)
            and reading.reason == split.reason
            and split.failed  # the first half was refused so, and is answered: this is its twin
            and not split.accepted  # nothing under the first half was taken either
        ):
            return Reading(
                Verdict.PAUSE,
                f"{reading.reason} (both halves of the request were refused the same way: "
                "the request is refused, not a row)",
            )
        return reading

    def finish(self) -> None:
        """Rows held while the twin of their half was unanswered (it was held back by a 429):
        they retry, their attempt counted, and are isolated again next time."""
        s = self.settings
        for _split, ids, reason in self.held:
            retry(
                self.ack,
                list(ids),
                policy.backoff(1, s.backoff_base_seconds, s.backoff_max_seconds),
                refund=False,
                reason=f"{RETRYING} {reason}",
            )
        self.held.clear()

    def hold_back_throttled(self, request: list[Prepared]) -> list[Prepared]:
        if not self.waiting_keys:
            return request
        held = [i for i in request if keys(i) & self.waiting_keys]
        if held:
            retry(
                self.ack,
                _ids(held),
                policy.throttle_wait(self.endpoint, self.settings),
                refund=True,
                reason=f"{RETRYING} an earlier row of this user was throttled (429)",
            )
        return [i for i in request if not (keys(i) & self.waiting_keys)]

    def apply(self, status: int, reading: Reading, request: list[Prepared], pause: float) -> None:
        """Apply one answer (`status` its HTTP status, 0 for none); `pause` is how long the
        endpoint now pauses for every worker (0: not paused)."""
        self.result.requests += 1
        self.status = status
        answer = str(status or "no answer")
        self.result.answers[answer] = self.result.answers.get(answer, 0) + 1
        ack, verdict = self.ack, reading.verdict
        split = self.current
        if split is not None:
            split.answered += 1
            if verdict in (Verdict.SPLIT, Verdict.BLOCKED) and reading.reason == split.reason:
                split.failed += 1  # refused as its parent was: the twin's answer decides
            elif verdict not in (Verdict.PAUSE, Verdict.TRANSIENT):
                self.decide(split)  # the twin went through: the held row is the refused one
        if verdict in (Verdict.SENT, Verdict.REJECTED_ROWS) and split is not None:
            split.mark_accepted()  # Amplitude took this request: refusals above were rows'
        if verdict is Verdict.SENT:
            ack.sent.extend(_ids(request))
        elif verdict is Verdict.REJECTED_ROWS:
            for index, why in reading.rejected.items():
                for row_id in request[index].ids():
                    ack.failed[row_id] = f"{REJECTED} {why}"
            rest = [i for n, i in enumerate(request) if n not in reading.rejected]
            if rest:
                self.work.append(rest)
        elif verdict in (Verdict.SPLIT, Verdict.BLOCKED):
            self.split(reading, request, pause)
        elif verdict is Verdict.TOO_LARGE:
            if len(request) == 1:
                for row_id in request[0].ids():
                    ack.failed[row_id] = f"{REJECTED} {reading.reason}"
            else:
                half = len(request) // 2
                self.work.extend([request[half:], request[:half]])
        elif verdict is Verdict.THROTTLED:
            self.throttled(reading, request)
        else:
            self.failed(reading, request, pause)

    def split(self, reading: Reading, request: list[Prepared], pause: float) -> None:
        """Halve a refused request to find the row it is about; a single refused row fails,
        once the twin of its half shows the refusal is not the whole request's."""
        if len(request) > 1:
            half = len(request) // 2
            first, second = request[:half], request[half:]
            self.splits[id(first)] = self.splits[id(second)] = Split(reading.reason, self.current)
            self.work.extend([second, first])
            return
        ids, why = request[0].ids(), f"{REJECTED} {reading.reason}"
        if self.current is not None and self.current.answered < 2:
            self.held.append((self.current, ids, why))  # the twin has not answered yet
        elif self.current is None and reading.verdict is Verdict.BLOCKED:
            # A batch of one row: no twin can tell the firewall's row from a region block.
            self.failed(reading, request, pause)
        else:
            for row_id in ids:
                self.ack.failed[row_id] = why

    def decide(self, split: Split) -> None:
        for held in [h for h in self.held if h[0] is split]:
            self.held.remove(held)
            for row_id in held[1]:
                self.ack.failed[row_id] = held[2]

    def throttled(self, reading: Reading, request: list[Prepared]) -> None:
        s = self.settings
        for index in sorted(reading.daily_quota):
            self.waiting_keys |= keys(request[index])
            self.quota_keys |= keys(request[index])
            retry(
                self.ack,
                list(request[index].ids()),
                s.daily_quota_wait_seconds,
                refund=True,
                reason=f"{RETRYING} user over Amplitude's daily quota; retrying hourly",
            )
        # The project's limit, not these users': the shared rate is cut instead
        # (`deliver`), and other batches need not hold these users' rows.
        project = policy.project_throttled(len(reading.throttled), len(request))
        for index in sorted(reading.throttled):
            self.waiting_keys |= keys(request[index])
            if not project:
                self.throttled_keys |= keys(request[index])
            retry(
                self.ack,
                list(request[index].ids()),
                policy.throttle_wait(self.endpoint, s),
                refund=True,
                reason=f"{RETRYING} {reading.reason}",
            )
        rest = [
            i
            for n, i in enumerate(request)
            if n not in reading.throttled and n not in reading.daily_quota
        ]
        if rest:
            self.work.append(rest)

    def failed(self, reading: Reading, request: list[Prepared], pause: float) -> None:
        """TRANSIENT or PAUSE: this request and everything after it waits; nothing more of the
        batch is sent now."""
        never_sent = [row_id for chunk in self.work for row_id in _ids(chunk)]
        never_sent += [row_id for _split, ids, _why in self.held for row_id in ids]  # undecided
        self.work.clear()
        self.held.clear()
        # The endpoint is unusable (PAUSE) or failing for everyone: do not spend attempts.
        if pause or reading.verdict is Verdict.PAUSE:
            retry(
                self.ack,
                _ids(request) + never_sent,
                pause,
                refund=True,
                reason=f"{RETRYING} {self.endpoint} paused: {reading.reason}",
            )
            self.result.paused = reading.reason
            return
        self.transient(reading, request)
        retry(
            self.ack,
            never_sent,
            policy.backoff(
                1, self.settings.backoff_base_seconds, self.settings.backoff_max_seconds
            ),
            refund=True,
            reason=f"{RETRYING} an earlier request of the batch failed: {reading.reason}",
        )

    def transient(self, reading: Reading, request: list[Prepared]) -> None:
        """The request's rows retry after a backoff, their attempt counted; those out of
        attempts fail."""
        s = self.settings
        attempts = {r.id: r.attempts for r in self.rows}  # only here: not on every batch's hot path
        base, ceiling = policy.retry_steps(
            self.status,
            s.backoff_base_seconds,
            s.backoff_base_5xx_seconds,
            s.backoff_max_seconds,
            s.backoff_max_5xx_seconds,
        )
        # One jittered delay per attempt count, not per row: rows of a request come due together
        # and rejoin a full batch instead of going out one or two per request.
        delays: dict[int, float] = {}
        for row_id in _ids(request):
            n = attempts[row_id]
            if n >= s.max_attempts:
                self.ack.failed[row_id] = f"{GAVE_UP} {n} attempts: {reading.reason}"
            else:
                if n not in delays:
                    delays[n] = policy.backoff(n, base, ceiling)
                retry(
                    self.ack,
                    [row_id],
                    delays[n],
                    refund=False,
                    reason=f"{RETRYING} attempt {n}: {reading.reason}",
                )


@dataclass
class Split:
    """The two halves of a refused request: how many answered, how many were refused the same
    way, and whether Amplitude took any request carved from them (then the refusal was about
    rows, not the request)."""

    reason: str
    parent: Split | None = None
    answered: int = 0
    failed: int = 0
    accepted: bool = False

    def mark_accepted(self) -> None:
        split: Split | None = self
        while split is not None and not split.accepted:
            split.accepted = True
            split = split.parent
