"""ampsync: deliver rows of a SQL queue table to Amplitude with Celery.

    >>> from tasks import sync
    >>> sync.delay().get(timeout=60)

The layout is in docs/architecture.md.
"""

from .worker.app import app
from .worker.jobs import feed_run, prune, send_batch, sync

__all__ = ["app", "sync", "send_batch", "prune", "feed_run"]
