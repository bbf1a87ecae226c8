"""Feeds: a SQL query or stored-procedure call turned into queue rows, sending only what changed.

A feed is declared in a TOML file in the user's repository (AMPSYNC_FEEDS_FILE). A run reads
the feed's source and enqueues rows into the queue table; delivering them is the pipeline's job.

- identify / group_identify feeds keep, per feed and id, the properties Amplitude accepted and
  those enqueued but not yet confirmed (`<queue>_feed_state`). A run first settles the pending
  ones from their queue rows (`sent` → accepted; `failed` or gone → not delivered), then enqueues
  one row per id whose mapped properties differ, carrying only those properties.
- event feeds read incrementally by a cursor that never skips a row committing late: below
  `MIN_ACTIVE_ROWVERSION()` on SQL Server, below the snapshot's xmin on PostgreSQL, and with an
  overlap window elsewhere. The cursor lives in `<queue>_feeds` and moves in the transaction that
  enqueues the rows; a stable insert_id from business-key columns keeps any re-read harmless.

Preview runs the same planning code without writing, and builds the payloads with
`payloads.Builder`, so what it shows is what the pipeline sends.

Modules: config (the feeds file), source (reading a source, its values, the event cursor),
plan (what a run would enqueue; pure), state (per-id state of identify feeds), runner (runs
and previews), render (preview and list output). Their statements are in tasks/db/feeds.py.
"""

from __future__ import annotations

from ..db.feeds import QUEUE_COLUMNS, FeedTables, review_statements, source_statement
from .config import Feed, FeedsConfig, load_config, parse_config
from .errors import FeedConfigError, FeedConflict, FeedError
from .plan import Plan
from .render import ASSIGNED_ON_ENQUEUE, describe, plan_as_dict, render_preview
from .runner import FeedRunner, RunResult, config_for, run_feed
from .source import cursor_value as _cursor_value  # the tests' name for it

__all__ = [
    "ASSIGNED_ON_ENQUEUE",
    "QUEUE_COLUMNS",
    "Feed",
    "FeedConfigError",
    "FeedConflict",
    "FeedError",
    "FeedRunner",
    "FeedTables",
    "FeedsConfig",
    "Plan",
    "RunResult",
    "_cursor_value",
    "config_for",
    "describe",
    "load_config",
    "parse_config",
    "plan_as_dict",
    "render_preview",
    "review_statements",
    "run_feed",
    "source_statement",
]
