"""The command line that starts a worker (with beat for `ampsync run` and the demo): the one
place that says which queues a worker consumes."""

from __future__ import annotations

import sys

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
