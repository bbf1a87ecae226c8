"""The command line that starts a worker (with beat for `ampsync run` and the demo): the one
place that says which queues a worker consumes; and `ampsync run` itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

from .. import broker, broker_address
from ..settings import Settings
from .app import SEND_QUEUE, SYNC_QUEUE


def worker_command(
    beat: bool = False,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    beat_schedule_file: str | None = None,
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks",
        "worker",
        "-E",
        "-Q",
        f"{SYNC_QUEUE},{SEND_QUEUE}",
        "--loglevel",
        loglevel,
    ]
    if beat:
        command.append("-B")
        if beat_schedule_file:  # where beat keeps its last-run times
            command += ["--schedule", beat_schedule_file]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    return command


def run(s: Settings, concurrency: int | None = None) -> int:
    """`ampsync run`: a worker with beat, on the embedded Redis when no broker is set.

    A broken feeds file stops it before anything starts, as it stops `celery -A tasks beat`
    (an embedded beat that refuses would leave a worker running without a schedule). The
    embedded Redis's address is left for this user's other commands (tasks/broker_address.py)
    and removed, with the Redis, when the worker stops: on its own, on Ctrl-C or on SIGTERM.
    """
    import beat_schedule

    beat_schedule.check_feeds(s)
    env = dict(os.environ)
    embedded = None
    address = None
    if not s.celery_broker_url:
        embedded = broker.EmbeddedRedis()
        address = embedded.start()
        env["CELERY_BROKER_URL"] = address
        where = broker_address.write(s.database_url, s.queue_table, address)
        print(
            f"embedded Redis at {address} (this user's other ampsync commands find it: {where})",
            file=sys.stderr,
        )
    # A SIGTERM (docker stop, systemd) must stop the worker and the embedded Redis too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        child = subprocess.Popen(worker_command(beat=True, concurrency=concurrency), env=env)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGTERM)
            return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if embedded is not None and address is not None:
            broker_address.remove(s.database_url, s.queue_table, address)
            embedded.stop()


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt
