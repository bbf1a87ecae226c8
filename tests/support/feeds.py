"""Feeds under test: a CRM table a feed reads, a feeds file with its runner on a stack's queue
table, and the rows a run enqueued (shared by tests/integration/test_feeds.py and
tests/e2e/test_feed_delivery.py)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, String, Table, delete, select, update

from tasks import feeds
from tasks.settings import Settings

CRM_FEED = """\
[feeds.crm]
kind = "identify"
query = "SELECT USERID, SEGMENT, GRP, LEVEL FROM {table}"
user_id = "USERID"
null = "{null}"
deleted = "{deleted}"
{more}
[feeds.crm.properties]
SEGMENT = "CRM_Segment"
GRP = "CRM_Group"
LEVEL = "CRM_Level"
"""

USERS = {
    "user-00001": ("gold", "b2b", 3),
    "user-00002": ("silver", "retail", 1),
    "user-00003": ("bronze", None, 2),
}


class Crm:
    """The CRM table a feed reads: USERID, SEGMENT, GRP, LEVEL (as in the seed article)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.table = Table(
            f"crm_{uuid.uuid4().hex[:8]}",
            MetaData(),
            # lower case: PostgreSQL folds the query's unquoted USERID to userid
            Column("userid", String(64), primary_key=True),
            Column("segment", String(32)),
            Column("grp", String(32)),
            Column("level", Integer),
        )
        self.table.create(engine)

    @property
    def name(self) -> str:
        # PostgreSQL folds unquoted names; the feed's query names the table unquoted.
        return self.table.name

    def put(self, users: dict[str, tuple]) -> None:
        t = self.table
        with self.engine.begin() as conn:
            for user, (segment, grp, level) in users.items():
                conn.execute(delete(t).where(t.c.userid == user))
                conn.execute(t.insert().values(userid=user, segment=segment, grp=grp, level=level))

    def set(self, user: str, **values) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(self.table).where(self.table.c.userid == user).values(**values))

    def remove(self, *users: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(self.table).where(self.table.c.userid.in_(users)))

    def drop(self) -> None:
        self.table.drop(self.engine)


class Feeds:
    """A feeds file and the runner for one stack's queue table."""

    def __init__(self, stack, folder: Path, config: str) -> None:
        self.stack = stack
        self.path = folder / f"feeds-{uuid.uuid4().hex[:6]}.toml"
        self.path.write_text(config)
        self.settings = Settings(
            AMPSYNC_DATABASE_URL=stack.url,
            AMPSYNC_QUEUE_TABLE=stack.table,
            AMPSYNC_FEEDS_FILE=str(self.path),
        )
        self.runner = feeds.FeedRunner(self.settings, stack.engine, stack.tables)

    def feed(self, name: str) -> feeds.Feed:
        return feeds.config_for(self.settings).get(name)

    def run(self, name: str = "crm") -> feeds.RunResult:
        return self.runner.run(self.feed(name))

    def preview(self, name: str = "crm") -> feeds.Plan:
        return self.runner.preview(self.feed(name))

    def enqueued(self, result: feeds.RunResult) -> list[dict]:
        """The rows a run enqueued, as the queue holds them."""
        if result.first_id is None:
            return []
        q = self.stack.tables.queue
        with self.stack.engine.connect() as conn:
            rows = conn.execute(select(q).where(q.c.id >= result.first_id).order_by(q.c.id))
            return [dict(r._mapping) for r in rows]


def props(row: dict) -> dict:
    return json.loads(row["properties"])


def by_user(rows: list[dict]) -> dict[str, dict]:
    return {r["user_id"]: props(r) for r in rows if r["kind"] == "identify"}


def crm_config(table: str, null: str = "unset", deleted: str = "keep", more: str = "") -> str:
    return CRM_FEED.format(table=table, null=null, deleted=deleted, more=more)
