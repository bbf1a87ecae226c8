"""What identify / group_identify feeds remember per id (`<queue>_feed_state`): the properties
Amplitude accepted, and those enqueued but not yet confirmed, by queue row. Loading the state
settles the pending changes from their queue rows, so a plan compares with what Amplitude holds.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Connection

from ..db import feeds as db_feeds
from .config import Feed
from .plan import EntityState


def load_state(
    conn: Connection, ft: db_feeds.FeedTables, feed: Feed
) -> tuple[dict[str, EntityState], dict[str, int]]:
    """The feed's state, with rows that were pending settled from the queue table: the changes
    of a `sent` row become accepted; a `failed` (or vanished) row's are forgotten, so the next
    plan enqueues them again. Returns the state and how many rows were settled each way."""
    state: dict[str, EntityState] = {}
    for entity, accepted, pending in db_feeds.read_state(conn, ft, feed.name):
        state[entity] = EntityState(
            accepted=orjson.loads(accepted) if accepted else {},
            pending={int(k): v for k, v in orjson.loads(pending).items()} if pending else {},
            exists=True,
        )
    waiting = sorted({qid for s in state.values() for qid in s.pending})
    status = db_feeds.queue_statuses(conn, ft, waiting)
    settled = {"sent": 0, "not_delivered": 0}
    for s in state.values():
        for qid in sorted(s.pending):
            st = status.get(qid)
            if st in ("pending", "in_flight"):
                continue
            changes = s.pending.pop(qid)
            s.dirty = True
            if st == "sent":
                s.accepted.update(changes)
                settled["sent"] += 1
            else:
                settled["not_delivered"] += 1
    return state, settled


def write_state(
    conn: Connection, ft: db_feeds.FeedTables, feed: Feed, state: dict[str, EntityState]
) -> None:
    """Store the ids whose state this run changed."""

    def row(entity: str, s: EntityState) -> db_feeds.StateRow:
        pending: dict[str, Any] = {str(k): v for k, v in s.pending.items()}
        return db_feeds.StateRow(
            entity,
            orjson.dumps(s.accepted).decode(),
            orjson.dumps(pending).decode() if s.pending else None,
        )

    changed = [row(k, s) for k, s in state.items() if s.dirty and s.exists]
    new = [row(k, s) for k, s in state.items() if s.dirty and not s.exists]
    db_feeds.write_state(conn, ft, feed.name, changed, new)
