"""A sync: release expired leases, then claim as many batches as workers can start within a
lease and hand each to `enqueue`. It never waits on the send tasks."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..db import endpoints, history, queue, reports
from ..db.sql import utcnow
from .results import SyncResult

if TYPE_CHECKING:
    from .pipeline import Pipeline


def run_sync(
    p: Pipeline,
    kinds: list[str],
    enqueue: Callable[[str, str, str], None],
    queued_batches: int,
    thorough: bool = True,
) -> SyncResult:
    """`thorough` runs the sweep's statements that fail unsendable rows too (beat's and manual
    syncs); follow-up syncs during a drain skip them."""
    s = p.settings
    result = SyncResult(run_id=uuid.uuid4().hex[:12])
    with p.engine.connect() as conn:
        started = reports.db_now(conn)
        result.expired_leases_failed, result.expired_leases_released = queue.sweep(
            conn, p.tables, s.max_attempts, s.max_age_seconds, thorough
        )
        room = max(0, s.max_queued_batches - queued_batches)
        paused: dict[str, str] = {}
        probing: set[str] = set()  # endpoints whose pause ended: one batch probes first
        for kind in kinds:
            state = endpoints.read(conn, p.tables, p.endpoint(kind))
            p.failing[state.endpoint] = state.failures > 0
            if state.paused:
                paused[kind] = state.reason or ""
            elif state.probe_due:
                probing.add(state.endpoint)
        result.paused = {p.endpoint(k): reason for k, reason in paused.items()}
        active = [k for k in kinds if k not in paused]
        floors = p.floors.read(active)
        # Round-robin over kinds so a backlog of one kind does not starve the others.
        while room > 0 and active:
            for kind in list(active):
                if room == 0:
                    break
                if kind not in active:  # its endpoint's probe batch was just claimed
                    continue
                limit, floor = p.rows_per_request(p.endpoint(kind)), floors[kind]
                claim = queue.claim(
                    conn,
                    p.tables,
                    kind,
                    limit,
                    s.lease_seconds,
                    after_id=floor,
                    after_identify=s.events_after_identify,
                )
                floors[kind] = claim.next_floor(limit)
                if claim.rows == 0:
                    if not floor:
                        active.remove(kind)
                    continue
                enqueue(kind, claim.token, result.run_id)
                room -= 1
                if p.endpoint(kind) in probing:  # the probe's batch; the rest after its answer
                    active = [k for k in active if p.endpoint(k) != p.endpoint(kind)]
                result.rows_claimed += claim.rows
                result.batches_enqueued += 1
                result.by_kind[kind] = result.by_kind.get(kind, 0) + claim.rows
        for kind, floor in floors.items():
            p.floors.keep(kind, floor)
        if room == 0:
            result.more_due = bool(active) or any(
                queue.has_due_rows(conn, p.tables, k) for k in kinds if k not in paused
            )
        if not (
            result.rows_claimed
            or result.paused
            or result.expired_leases_released
            or result.expired_leases_failed
        ):
            return result  # an idle sync leaves no history
        error = "; ".join(f"{e} paused: {r}" for e, r in result.paused.items())
        history.record_run(
            conn,
            p.tables,
            {
                "run_id": result.run_id,
                "task": history.SYNC,
                "kind": ",".join(kinds),
                "started_at": started,
                "finished_at": utcnow(),
                "rows_claimed": result.rows_claimed,
                "requests": 0,
                "error": error[:2000] or None,
            },
        )
    return result
