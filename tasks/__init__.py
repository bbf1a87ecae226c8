"""ampsync: deliver rows of a SQL queue table to Amplitude with Celery.

    >>> from tasks import sync
    >>> sync.delay().get(timeout=60)
"""

from .celery_app import app
from .jobs import send_batch, sync

__all__ = ["app", "sync", "send_batch"]
