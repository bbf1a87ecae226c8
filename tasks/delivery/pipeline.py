"""One `Pipeline` per process: the resources every task uses (settings, queue tables, the
database engine, the Amplitude client, Redis) made once, and the two operations the Celery
tasks call, `sync` (delivery/sync.py) and `send` (delivery/send.py).

Nothing in delivery/ knows about Celery except the `enqueue` callback a sync is given.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import redis
from sqlalchemy import Engine

from ..amplitude.client import Client
from ..broker import redis_client
from ..db import engine as db_engine
from ..db import schema
from ..settings import Settings
from . import policy
from .results import SendResult, SyncResult
from .send import run_send
from .shared import ClaimFloors, Outcomes, ProbeTurn, RateLimiter, ThrottledIds
from .sync import run_sync


class Pipeline:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tables = schema.define_tables(settings.queue_table)
        # Endpoints this process saw fail: only those need their failure count reset on a
        # success, so a healthy endpoint costs no write on the send path.
        self.failing: dict[str, bool] = {}

    @cached_property
    def engine(self) -> Engine:
        return db_engine.make_engine(self.settings.database_url)

    @cached_property
    def client(self) -> Client:
        s = self.settings
        return Client(s.server_url, s.require_api_key(), s.http_timeout_seconds, s.min_id_length)

    @cached_property
    def redis(self) -> redis.Redis | None:
        return redis_client(self.settings.celery_broker_url)

    @cached_property
    def floors(self) -> ClaimFloors:
        return ClaimFloors(self.redis, self.settings.queue_table)

    @cached_property
    def throttled(self) -> ThrottledIds:
        return ThrottledIds(self.redis)

    @cached_property
    def outcomes(self) -> Outcomes:
        return Outcomes(self.redis, self.settings.queue_table)

    @cached_property
    def probe(self) -> ProbeTurn:
        return ProbeTurn(self.redis, self.settings.queue_table)

    @cached_property
    def rate(self) -> RateLimiter:
        return RateLimiter(self.redis, self.settings.events_per_second)

    def endpoint(self, kind: str) -> str:
        return policy.endpoint_for(kind, self.settings)

    def rows_per_request(self, endpoint: str) -> int:
        s = self.settings
        return policy.rows_per_request(endpoint, s.batch_size, s.events_per_second)

    def sync(
        self,
        kinds: list[str],
        enqueue: Callable[[str, str, str], None],
        queued_batches: int,
        thorough: bool = True,
    ) -> SyncResult:
        return run_sync(self, kinds, enqueue, queued_batches, thorough)

    def send(self, kind: str, token: str, rerun: bool = False, run_id: str = "") -> SendResult:
        return run_send(self, kind, token, rerun, run_id)
