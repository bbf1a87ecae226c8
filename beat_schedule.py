"""The periodic schedule Celery beat runs (`celery -A tasks beat`).

Each entry expires after one interval, so ticks that could not run (workers down, broker
unreachable) do not pile up and stampede when the workers return.
"""

from __future__ import annotations


def schedule() -> dict:
    from tasks import settings

    interval = settings.get().sync_interval
    return {
        "ampsync-sync": {
            "task": "ampsync.sync",
            "schedule": interval,
            "options": {"expires": interval},
        },
    }
