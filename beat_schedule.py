"""The periodic schedule Celery beat runs (`celery -A tasks beat`).

Each entry expires after one interval, so ticks that could not run (workers down, broker
unreachable) do not pile up and stampede when the workers return.
"""

from __future__ import annotations


def schedule() -> dict:
    from tasks import settings

    interval = settings.get().sync_interval
    entries = {
        "ampsync-sync": {
            "task": "ampsync.sync",
            "schedule": interval,
            "options": {"expires": interval},
        },
        # Retention of sent rows and run history; a no-op unless configured.
        "ampsync-prune": {
            "task": "ampsync.prune",
            "schedule": 3600.0,
            "options": {"expires": 3600.0},
        },
    }
    entries.update(feed_entries(settings.get()))
    return entries


def feed_entries(s) -> dict:
    """One entry per scheduled feed of AMPSYNC_FEEDS_FILE, expiring after its own interval.
    A broken file schedules no feed here: beat refuses to start with its errors instead
    (`check_feeds`), while workers and the CLI keep working."""
    from tasks import feeds

    try:
        config = feeds.config_for(s)
    except feeds.FeedConfigError:
        return {}
    return {
        f"ampsync-feed-{feed.name}": {
            "task": "ampsync.feed_run",
            "schedule": feed.schedule,
            "args": (feed.name,),
            "options": {"expires": feed.schedule},
        }
        for feed in config.scheduled()
    }


def check_feeds(s=None) -> None:
    """Stop beat with the feeds file's errors (file, line and key), one per line."""
    from tasks import feeds, settings

    try:
        feeds.config_for(s or settings.get())
    except feeds.FeedConfigError as exc:
        raise settings.SettingsError(f"feeds file is invalid:\n{exc}") from None
