"""Celery tasks: thin wiring around `delivery.pipeline.Pipeline`.

Arguments are primitive and JSON-safe: a send task's message carries the kind, a claim token
and the run id — never rows, never the API key. No task waits on another.
"""

from __future__ import annotations

import logging

from celery import Task

from .. import broker, feeds
from .. import settings as settings_module
from ..db import queue
from ..delivery.pipeline import Pipeline
from ..outcomes import KINDS
from . import presence
from .app import SEND_QUEUE, SYNC_QUEUE, app

log = logging.getLogger("ampsync.tasks")

# Workers keep a heartbeat key in Redis for `ampsync status` and `ampsync sync`.
presence.connect_signals()

# A sync that filled the broker's room comes back this soon, so throughput does not hang on
# AMPSYNC_SYNC_INTERVAL. Claims of one sync run one after another, so one chain of follow-ups
# feeds too few batches to keep the workers busy at high latency; two chains overlap their
# claims (bench/README.md, finding 12, "Sync chains"). A Redis key per chain keeps each to
# one scheduled follow-up.
FOLLOW_UP_SECONDS = 0.5
SYNC_CHAINS = 2
_FOLLOW_UP_KEY = "ampsync:sync:follow-up:{}"


class AmpsyncTask(Task):
    """Owns what every task needs: settings, the per-process pipeline, the broker check."""

    abstract = True
    _pipeline: Pipeline | None = None

    @property
    def pipeline(self) -> Pipeline:
        cls = AmpsyncTask
        if cls._pipeline is None:
            cls._pipeline = Pipeline(settings_module.get())
        return cls._pipeline

    def apply_async(self, *args, **kwargs):
        # A wrong setting left the app unconfigured on import: say which, not "no broker".
        settings_module.get()
        if not self.app.conf.broker_url:
            raise settings_module.SettingsError(broker.NO_BROKER)
        return super().apply_async(*args, **kwargs)


@app.task(name="ampsync.sync", base=AmpsyncTask, bind=True, ignore_result=False)
def sync(self: AmpsyncTask, kind: str | None = None, chain: int | None = None) -> dict:
    """Claim due rows and fan them out as send_batch tasks; return a summary."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    kinds = [kind] if kind else list(KINDS)
    pipeline = self.pipeline
    redis = pipeline.redis

    def enqueue(kind: str, token: str, run_id: str) -> None:
        send_batch.apply_async(args=(kind, token, run_id), queue=SEND_QUEUE)

    follow_up = chain is not None
    if follow_up and redis is not None:
        redis.delete(_FOLLOW_UP_KEY.format(chain))  # this is the chain's scheduled follow-up
    queued = redis.llen(SEND_QUEUE) if redis is not None else 0
    # Follow-ups come every FOLLOW_UP_SECONDS while a backlog drains: they skip the slow part
    # of the sweep, which beat's and manual syncs still run.
    result = pipeline.sync(kinds, enqueue, queued, thorough=not follow_up)
    if result.more_due and redis is not None:
        # A follow-up continues its own chain; any other sync starts the chains not running.
        for slot in [chain] if follow_up else range(SYNC_CHAINS):
            # The key expires on its own should the follow-up message be lost.
            if redis.set(
                _FOLLOW_UP_KEY.format(slot),
                result.run_id,
                nx=True,
                px=int(FOLLOW_UP_SECONDS * 1000) + 10_000,
            ):
                sync.apply_async(
                    kwargs={"kind": kind, "chain": slot},
                    countdown=FOLLOW_UP_SECONDS,
                    queue=SYNC_QUEUE,
                )
    if redis is not None:
        presence.record_sync(
            redis,
            {
                "run_id": result.run_id,
                "rows_claimed": result.rows_claimed,
                "batches_enqueued": result.batches_enqueued,
            },
        )
    log.info(
        "sync %s: %d rows claimed in %d batches%s",
        result.run_id,
        result.rows_claimed,
        result.batches_enqueued,
        f"; paused {result.paused}" if result.paused else "",
    )
    return result.as_dict()


@app.task(name="ampsync.send_batch", base=AmpsyncTask, bind=True, ignore_result=False)
def send_batch(self: AmpsyncTask, kind: str, token: str, run_id: str = "") -> dict:
    """Send one claimed batch and acknowledge every row of it."""
    # A message Celery hands back after the worker running it died comes marked redelivered.
    rerun = bool((self.request.delivery_info or {}).get("redelivered"))
    result = self.pipeline.send(kind, token, rerun=rerun, run_id=run_id)
    if result.stale:
        log.info("batch %s: claim no longer ours, nothing sent", token)
    else:
        log.info(
            "batch %s (%s, run %s): %d sent, %d failed, %d retried in %d requests",
            token,
            kind,
            run_id,
            result.sent,
            result.failed,
            result.retried,
            result.requests,
        )
    return result.as_dict()


@app.task(name="ampsync.prune", base=AmpsyncTask, bind=True, ignore_result=False)
def prune(self: AmpsyncTask) -> dict:
    """Delete old `sent` rows and run history (AMPSYNC_RETENTION_DAYS, AMPSYNC_HISTORY_DAYS)."""
    s = self.pipeline.settings
    with self.pipeline.engine.connect() as conn:
        rows, runs = queue.prune(
            conn, self.pipeline.tables, s.sent_retention_days, s.history_retention_days
        )
    return {"sent_rows_deleted": rows, "history_rows_deleted": runs}


@app.task(name="ampsync.feed_run", base=AmpsyncTask, bind=True, ignore_result=False)
def feed_run(self: AmpsyncTask, name: str) -> dict:
    """Run one feed of AMPSYNC_FEEDS_FILE: enqueue what changed; sending is sync's job."""
    pipeline = self.pipeline
    try:
        result = feeds.run_feed(pipeline.settings, name, engine=pipeline.engine)
    except feeds.FeedConflict as exc:
        log.info("%s", exc)  # the other run did this tick's work
        return {"feed": name, "skipped": str(exc)}
    except feeds.FeedError as exc:
        log.error("%s", exc)
        raise
    log.info("%s", result.summary())
    for error in result.errors:
        log.warning("feed %s: %s", name, error)
    if result.rows_enqueued:
        sync.delay()  # deliver now rather than at the next scheduled sync
    return result.as_dict()
