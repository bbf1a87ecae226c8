"""Beat's scheduler: Celery's own (last-run times in a shelve file), which also

- records each dispatch in Redis, so `ampsync status` shows beat's last tick
  (`tasks/worker/presence.py`);
- follows AMPSYNC_FEEDS_FILE while it runs: a feed added, changed or removed is scheduled,
  rescheduled or dropped within FEEDS_CHECK_SECONDS, so `ampsync feed list` (which reads the
  file) says what beat really does. A file broken while beat runs keeps the schedule it had
  and logs its errors; beat refuses to *start* on a broken file (`beat_schedule.check_feeds`).

`app.conf.beat_scheduler` names it, so `celery -A tasks beat` and `worker -B` both use it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import redis
from celery.beat import PersistentScheduler

from .. import broker
from .. import settings as settings_module
from . import presence

log = logging.getLogger("ampsync.beat")

FEEDS_CHECK_SECONDS = 10.0
FEED_ENTRY_PREFIX = "ampsync-feed-"  # beat_schedule.feed_entries names entries so


def _file_stamp(path: str) -> tuple[int, int] | None:
    """What changes when the file is written, created or deleted."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Scheduler(PersistentScheduler):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        s = settings_module.get()
        self._feeds_file = s.feeds_file
        self._feeds_stamp = _file_stamp(s.feeds_file)
        self._redis = broker.redis_client(s.celery_broker_url)
        super().__init__(*args, **kwargs)

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        super().apply_entry(entry, producer=producer)
        if self._redis is not None:
            try:
                presence.record_beat_tick(self._redis, entry.name)
            except redis.RedisError as exc:
                log.warning("beat's tick not recorded: %s", exc)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        self._follow_feeds_file()
        # Wake at least every FEEDS_CHECK_SECONDS to look at the feeds file (a stat).
        return min(super().tick(*args, **kwargs), FEEDS_CHECK_SECONDS)

    def _follow_feeds_file(self) -> None:
        stamp = _file_stamp(self._feeds_file)
        if stamp == self._feeds_stamp:
            return
        self._feeds_stamp = stamp
        import beat_schedule

        s = settings_module.get()
        try:
            beat_schedule.check_feeds(s)
        except settings_module.SettingsError as exc:
            log.error("%s\nthe feeds' schedule stays as it was until the file is fixed", exc)
            return
        entries = beat_schedule.feed_entries(s)
        for name in [n for n in self.schedule if n.startswith(FEED_ENTRY_PREFIX)]:
            if name not in entries:
                del self.schedule[name]
                log.info("beat: %s dropped (no longer in %s)", name, self._feeds_file)
        changed = {
            name: entry
            for name, entry in entries.items()
            if name not in self.schedule
            or self.schedule[name].schedule.run_every.total_seconds() != entry["schedule"]
        }
        if changed:
            self.update_from_dict(changed)
            log.info("beat: %s scheduled from %s", ", ".join(sorted(changed)), self._feeds_file)
