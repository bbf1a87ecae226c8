"""The Celery app and every Celery setting, in one commented place.

The queue table, not the broker, is the record of what was sent (docs/architecture.md,
"Messages"): a lost or duplicated message must be harmless, and is — leases expire and
rows are claimed again, acknowledgements only touch rows of the current claim, and every
event carries an insert_id.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable

from celery import Celery, signals
from kombu import Queue
from sqlalchemy.exc import SQLAlchemyError

from .. import broker, logs, redact
from .. import settings as settings_module
from ..db import engine as db_engine
from ..db import schema, setup
from ..delivery.policy import send_time_limit

SYNC_QUEUE = "ampsync.sync"
SEND_QUEUE = "ampsync.send"

app = Celery("ampsync")


def _configure(s: settings_module.Settings) -> None:
    # The longest a message may legitimately stay unacknowledged: a send task runs at most
    # task_time_limit; retries are durable in the table (next_attempt_at), never a countdown.
    task_time_limit = s.lease_seconds  # past the lease the rows may be reclaimed anyway
    app.conf.update(
        broker_url=s.celery_broker_url,  # None → tasks refuse to publish (see _require_broker)
        result_backend=s.celery_broker_url,  # `sync.delay().get()` returns the run summary
        broker_connection_retry_on_startup=True,  # stated: Celery 6 stops inferring it
        broker_transport_options={
            # Redis redelivers an unacked message after this; it must exceed any task's run.
            "visibility_timeout": max(3600, 4 * task_time_limit),
        },
        result_expires=24 * 3600,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Ack after the task returns, and re-deliver when a pool process is killed: a send task
        # lost with its worker is run again, and its stale claim makes the rerun send nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one unacked message per process
        worker_cancel_long_running_tasks_on_connection_loss=True,  # no task twice at once
        task_time_limit=task_time_limit,
        # Inside the lease with a margin (5 s → 4 s, not 1 s, which stopped every send slower
        # than a second); a send renews its lease when less than this is left.
        task_soft_time_limit=send_time_limit(s.lease_seconds),
        # Flower: task events from workers, and "sent" events for queued tasks.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        # Sync has its own queue so it starts within seconds behind any backlog of sends.
        task_queues=[Queue(SYNC_QUEUE), Queue(SEND_QUEUE)],
        task_default_queue=SEND_QUEUE,
        task_routes={
            "ampsync.sync": {"queue": SYNC_QUEUE},
            "ampsync.prune": {"queue": SYNC_QUEUE},
            "ampsync.feed_run": {"queue": SYNC_QUEUE},
            "ampsync.send_batch": {"queue": SEND_QUEUE},
        },
        worker_concurrency=s.worker_concurrency,
        # Memory a send of big rows leaves behind (the allocator keeps it) is given back by
        # replacing the process after its task; a claim's bytes bound the peak itself.
        worker_max_memory_per_child=s.worker_max_memory_mb * 1024 or None,  # KiB; 0 → never
        worker_hijack_root_logger=True,
        beat_schedule=_beat_schedule(),
        # Celery's scheduler plus beat's last tick in Redis and a feeds file followed live.
        beat_scheduler="tasks.worker.beat:Scheduler",
        timezone="UTC",
        enable_utc=True,
    )


def _beat_schedule() -> dict:
    import beat_schedule

    return beat_schedule.schedule()


# Importing `tasks` must not fail on a bad setting: the CLI, the worker's start-up check and
# the first publish read the settings again and stop with the same one line.
with contextlib.suppress(settings_module.SettingsError):
    _configure(settings_module.get())


def _refuse_to_start(check: Callable[..., None]) -> Callable[..., None]:
    """A start-up check whose failure stops the process with one line.

    Celery catches every Exception a signal handler raises, logs it and goes on to say
    `ready.`: a worker that cannot work would then fail every task. SystemExit is not an
    Exception, so it gets through and the process exits 1 with the line on stderr.
    """

    @functools.wraps(check)
    def guarded(**kwargs: object) -> None:
        try:
            check(**kwargs)
        except settings_module.SettingsError as exc:
            raise SystemExit(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - anything unforeseen must stop it too
            first = redact.cut((str(exc).strip().splitlines() or [""])[0], 300)
            raise SystemExit(
                f"ampsync: the start-up check failed: {type(exc).__name__}: {first}"
            ) from None

    return guarded


@signals.celeryd_init.connect
@_refuse_to_start
def _check_worker_start(**_kwargs: object) -> None:
    """Workers check settings, the broker and the queue table before taking work."""
    os.umask(settings_module.PRIVATE_UMASK)
    s = settings_module.get()
    s.require_api_key()
    broker.check(s.celery_broker_url)
    tables = schema.define_tables(s.queue_table)
    try:
        engine = db_engine.make_engine(s.database_url)
        try:
            with engine.connect() as conn:
                problem = setup.check_table(conn, tables)
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        raise settings_module.SettingsError(
            "AMPSYNC_DATABASE_URL: " + db_engine.describe_db_error(exc, s.database_url)
        ) from None
    if problem:
        raise settings_module.SettingsError(problem)


@signals.beat_init.connect
@_refuse_to_start
def _check_beat_start(**_kwargs: object) -> None:
    import beat_schedule

    os.umask(settings_module.PRIVATE_UMASK)  # its schedule file
    logs.note_dotenv()
    broker.check(settings_module.get().celery_broker_url)
    beat_schedule.check_feeds()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_kwargs) -> None:
    """AMPSYNC_LOG_FORMAT=json: Celery's handlers write one JSON object per line."""
    if logs.resolve() == "json":
        logs.use_json(logger)


@signals.celeryd_init.connect
def _json_warnings(**_kwargs) -> None:
    if logs.resolve() == "json":
        logs.json_warnings()


@signals.celeryd_after_setup.connect
def _name_the_dotenv(**_kwargs) -> None:
    logs.note_dotenv()  # after logging is set up, so the line reaches the worker's log


@signals.celeryd_after_setup.connect
def _no_banner_in_json(instance, **_kwargs) -> None:
    # The start-up banner is printed, not logged; in JSON mode it would break the stream.
    if logs.resolve() == "json":
        instance.quiet = True


logging.getLogger("ampsync").setLevel(logging.INFO)
