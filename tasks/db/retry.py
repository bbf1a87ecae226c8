"""Deadlock victims and lock timeouts are retried, with jitter, on every statement ampsync
sends: under concurrency SQL Server picks a deadlock victim (error 1205) or gives up waiting
for a lock (1222, with `SET LOCK_TIMEOUT`), and the work is simply to be done again. The
same holds for PostgreSQL (40P01, 55P03, 40001) and MySQL/MariaDB (1213, 1205). Each
function of tasks/db runs its transaction through `transaction()`; a caller that owns a
longer transaction (a feed run) wraps it in `retrying()` (docs/sqlserver.md, "Deadlocks").
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection

T = TypeVar("T")

# SQL Server: 1205 deadlock victim, 1222 lock request time out. MySQL/MariaDB: 1213 deadlock,
# 1205 lock wait timeout. pymssql and PyMySQL carry the number as the exception's first arg.
RETRYABLE_NUMBERS = frozenset({1205, 1222, 1213})
# PostgreSQL (psycopg's `sqlstate`): deadlock, lock not available, serialization failure;
# ODBC drivers put the SQLSTATE first (40001 is SQL Server's deadlock victim).
RETRYABLE_SQLSTATES = frozenset({"40P01", "55P03", "40001"})

ATTEMPTS = 5
BASE_SECONDS = 0.05
MAX_SECONDS = 2.0


def error_number(exc: BaseException) -> int | str | None:
    """The server's error number (or SQLSTATE) of a database error, as the DBAPI carries it:
    SQLAlchemy's wrapper holds the driver's exception in `.orig`."""
    orig = getattr(exc, "orig", None) or exc
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str):
        return sqlstate
    number = getattr(orig, "number", None)
    if isinstance(number, int):
        return number
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], tuple):  # pymssql's _mssql exception: ((number, text),)
        args = args[0]
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    if args and isinstance(args[0], str) and len(args[0]) == 5 and args[0][:2].isalnum():
        return args[0]  # an ODBC SQLSTATE such as '40001'
    return None


def retryable(exc: BaseException) -> bool:
    """A deadlock victim or a lock timeout: the transaction can simply run again."""
    number = error_number(exc)
    return number in RETRYABLE_NUMBERS or number in RETRYABLE_SQLSTATES


def delays(
    attempts: int = ATTEMPTS,
    base: float = BASE_SECONDS,
    cap: float = MAX_SECONDS,
    rand: Callable[[], float] = random.random,
) -> list[float]:
    """The waits before each retry: doubling from `base`, capped, each times a random factor
    between 0.5 and 1.5 so that the two sides of a deadlock do not meet again."""
    return [min(cap, base * 2**n) * (0.5 + rand()) for n in range(attempts - 1)]


def retrying(
    work: Callable[[], T],
    attempts: int = ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
) -> T:
    """`work()`, run again after a deadlock or lock timeout, at most `attempts` times in all.
    `work` must be a whole transaction: the failed one was rolled back."""
    waits = delays(attempts, rand=rand)
    for wait in waits:
        try:
            return work()
        except Exception as exc:
            if not retryable(exc):
                raise
        sleep(wait)
    return work()


def transaction(conn: Connection, work: Callable[[Connection], T]) -> T:
    """`work(conn)` in its own transaction (committed), retried as `retrying` says."""

    def once() -> T:
        with conn.begin():
            return work(conn)

    return retrying(once)
