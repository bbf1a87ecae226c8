"""Who is alive, as Redis keys: a worker's heartbeat and beat's last tick.

`ampsync status` reads them to tell a dead system from an idle one, and `ampsync sync` to say
at once that no worker consumes its queue instead of waiting on a message nobody will take.

- Each worker writes `ampsync:worker:<name>` every HEARTBEAT_SECONDS from a thread of its
  main process (a long task in a solo pool does not stop it), with a TTL of a few beats: a
  worker killed without a goodbye disappears on its own. A worker that stops cleanly deletes
  its key.
- Beat writes `ampsync:beat` each time it dispatches an entry (`tasks/worker/beat.py`), with
  no TTL: a beat that died shows as a last tick long ago, which is what an operator needs.

Times are Redis's clock (`TIME`), never a worker's: every reader compares them with the same
server's clock, so machines whose clocks drift still agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger("ampsync.presence")

WORKER_KEY = "ampsync:worker:"
BEAT_KEY = "ampsync:beat"
HEARTBEAT_SECONDS = 5.0
# Four missed beats: a worker whose main process is stalled that long is as good as gone.
WORKER_TTL_SECONDS = 20


def server_time(client: redis.Redis) -> float:
    """Redis's clock, in seconds since the epoch."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


@dataclass(frozen=True)
class Worker:
    name: str
    queues: tuple[str, ...]
    concurrency: int | None
    pid: int | None
    heartbeat_age: float  # seconds since its last heartbeat, by Redis's clock


def write_heartbeat(client: redis.Redis, name: str, info: dict[str, Any]) -> None:
    body = json.dumps({**info, "name": name, "at": server_time(client)})
    client.set(WORKER_KEY + name, body, ex=WORKER_TTL_SECONDS)


def forget_worker(client: redis.Redis, name: str) -> None:
    client.delete(WORKER_KEY + name)


def live_workers(client: redis.Redis) -> list[Worker]:
    """The workers whose heartbeat has not expired, by name."""
    names = sorted(client.scan_iter(match=WORKER_KEY + "*", count=500))
    if not names:
        return []
    now = server_time(client)
    workers = []
    for raw in client.mget(names):
        if raw is None:  # expired between SCAN and MGET
            continue
        info = json.loads(raw)
        workers.append(
            Worker(
                name=info["name"],
                queues=tuple(info.get("queues") or ()),
                concurrency=info.get("concurrency"),
                pid=info.get("pid"),
                heartbeat_age=max(0.0, now - float(info["at"])),
            )
        )
    return workers


def consumers_of(workers: list[Worker], queue: str) -> list[Worker]:
    return [w for w in workers if queue in w.queues]


def record_beat_tick(client: redis.Redis, entry: str) -> None:
    """Beat dispatched `entry` now."""
    body = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "entry": entry,
        "at": server_time(client),
    }
    client.set(BEAT_KEY, json.dumps(body))


def beat_state(client: redis.Redis) -> dict[str, Any] | None:
    """Beat's last tick: host, pid, the entry it dispatched, and `age` in seconds; None when
    no beat ever ticked on this broker."""
    return _aged(client, BEAT_KEY)


class Heartbeat:
    """The thread that keeps one worker's key alive."""

    def __init__(self, client: redis.Redis, name: str, info: Callable[[], dict[str, Any]]) -> None:
        self.client = client
        self.name = name
        self.info = info  # read at every beat: `cancel_consumer` changes the queues
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ampsync-heartbeat", daemon=True)

    def start(self) -> None:
        # The first beat before `ready.` is logged: whoever waits for that line finds the key.
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_SECONDS + 1)
        with contextlib.suppress(redis.RedisError):
            forget_worker(self.client, self.name)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self._beat()

    def _beat(self) -> None:
        try:
            write_heartbeat(self.client, self.name, self.info())
        except redis.RedisError as exc:  # the broker is down: Celery says so too; try again
            log.warning("heartbeat not written: %s", exc)


# --- the worker's side: Celery signals -----------------------------------------------------

_heartbeat: Heartbeat | None = None


def _on_worker_ready(sender: Any, **_kwargs: Any) -> None:
    """`sender` is the worker's consumer: its name and the queues it consumes."""
    global _heartbeat
    from .. import broker
    from .. import settings as settings_module

    client = broker.redis_client(settings_module.get().celery_broker_url)
    if client is None:
        return

    def info() -> dict[str, Any]:
        task_consumer = getattr(sender, "task_consumer", None)
        return {
            "queues": sorted(q.name for q in getattr(task_consumer, "queues", None) or ()),
            "concurrency": getattr(getattr(sender, "controller", None), "concurrency", None),
            "pid": os.getpid(),
        }

    _heartbeat = Heartbeat(client, sender.hostname, info)
    _heartbeat.start()


def _on_worker_shutdown(**_kwargs: Any) -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None


def connect_signals() -> None:
    from celery import signals

    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)


# --- the last sync ---------------------------------------------------------------------------

SYNC_KEY = "ampsync:last-sync"


def record_sync(client: redis.Redis, summary: dict[str, Any]) -> None:
    """A sync finished (idle ones too, which leave no run history)."""
    client.set(SYNC_KEY, json.dumps({**summary, "at": server_time(client)}, default=str))


def last_sync(client: redis.Redis) -> dict[str, Any] | None:
    return _aged(client, SYNC_KEY)


def _aged(client: redis.Redis, key: str) -> dict[str, Any] | None:
    """The record at `key` with its `age` in seconds by Redis's clock; None when absent."""
    raw = client.get(key)
    if raw is None:
        return None
    info = json.loads(raw)
    info["age"] = max(0.0, server_time(client) - float(info["at"]))
    return dict(info)
