"""Where `ampsync run` leaves the address of its embedded Redis, so that the other commands of
the same user on the same machine (`ampsync sync`, `status`, `celery -A tasks …`) find the
broker without CELERY_BROKER_URL.

One file per queue (database URL and table), in a private state folder:
`$XDG_STATE_HOME/ampsync/` (else `~/.local/state/ampsync/`), mode 0700. `ampsync run` writes it
once its Redis answers and removes it when it stops. A file whose Redis no longer listens (a
`run` killed with SIGKILL) is ignored. Imports nothing of ampsync: the settings read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from pathlib import Path

SOCKET_SCHEME = "redis+socket://"


def state_folder() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ampsync"


def address_file(database_url: str, queue_table: str) -> Path:
    key = hashlib.sha256(f"{database_url}\n{queue_table}".encode()).hexdigest()[:16]
    return state_folder() / f"embedded-broker-{key}"


def write(database_url: str, queue_table: str, url: str) -> Path:
    folder = state_folder()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = address_file(database_url, queue_table)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(url + "\n")
    partial.replace(path)  # readers never see half a file
    return path


def remove(database_url: str, queue_table: str, url: str) -> None:
    """Remove the file if it still names `url` (a later `run` may have replaced it)."""
    path = address_file(database_url, queue_table)
    with contextlib.suppress(OSError):
        if path.read_text().strip() == url:
            path.unlink()


def read(database_url: str, queue_table: str) -> str | None:
    """The embedded broker's URL when a `run` for this queue is up, else None."""
    try:
        url = address_file(database_url, queue_table).read_text().strip()
    except OSError:
        return None
    if not url.startswith(SOCKET_SCHEME):
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(url.removeprefix(SOCKET_SCHEME))
    except OSError:
        return None  # left behind by a run that was killed
    finally:
        probe.close()
    return url
