"""Statements that can change many rows (the sweep, retry-failed, prune) run in chunks of at
most CHUNK rows, each chunk its own short transaction, until a chunk changes fewer: on SQL
Server `UPDATE TOP (1000)` / `DELETE TOP (1000)` counted by `@@ROWCOUNT`, on MySQL/MariaDB
`… LIMIT 1000`, on PostgreSQL and SQLite an id-limited subquery. No statement then takes
enough locks for SQL Server to escalate to a table lock, which `READPAST` cannot skip
(docs/sqlserver.md, "Lock escalation")."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Delete, Table, Update, delete, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.util import ClauseAdapter

from . import retry
from .tsql import CHUNK, NORMAL_SESSION, SWEEP_SESSION, DriverSQL, counted, driver_sql, top


@dataclass(frozen=True)
class Change:
    """Every row of `table` matching `where` updated with `values`, or deleted when `values`
    is None. Each chunk must take its rows out of `where` (a status changes, a row goes), so
    that the next chunk finds the next rows."""

    table: Table
    where: tuple[ColumnElement[bool], ...]
    values: Mapping[str, Any] | None = field(default=None)

    def _base(self, where: tuple[ColumnElement[bool], ...]) -> Update | Delete:
        if self.values is None:
            return delete(self.table).where(*where)
        return update(self.table).where(*where).values(**self.values)

    def statement(
        self, dialect: Dialect, chunk: int = CHUNK, low_priority: bool = False
    ) -> Update | Delete | DriverSQL:
        """One chunk's statement as `dialect` runs it."""
        if dialect.name == "mssql":
            batch = counted(top(driver_sql(self._base(self.where), dialect), chunk))
            if low_priority:
                batch = DriverSQL(f"{SWEEP_SESSION};\n{batch.sql}", batch.params)
            return batch
        if dialect.name in ("mysql", "mariadb"):
            # the compiler reads `<its dialect's name>_limit`
            return self._base(self.where).with_dialect_options(
                mysql_limit=chunk, mariadb_limit=chunk
            )
        inner = self.table.alias("chunk")
        adapt = ClauseAdapter(inner)
        ids = (
            select(inner.c.id)
            .where(*(adapt.traverse(w) for w in self.where))
            .order_by(inner.c.id)
            .limit(chunk)
        )
        # The conditions are repeated outside: a row changed by another transaction since
        # the subquery read it is checked again (PostgreSQL rereads it before updating).
        return self._base((*self.where, self.table.c.id.in_(ids)))


def loop(step: Callable[[], int], chunk: int = CHUNK) -> int:
    """Run `step` (one chunk, returning the rows it changed) until a chunk changes fewer than
    `chunk` rows; the total changed."""
    total = 0
    while True:
        changed = step()
        total += changed
        if changed < chunk:
            return total


def run(conn: Connection, change: Change, chunk: int = CHUNK, low_priority: bool = False) -> int:
    """Apply `change` chunk by chunk, each chunk committed (and retried after a deadlock or a
    lock timeout); the rows changed."""
    statement = change.statement(conn.dialect, chunk, low_priority)

    def once(c: Connection) -> int:
        if isinstance(statement, DriverSQL):
            return int(statement.run(c).scalar_one())
        return int(c.execute(statement).rowcount)

    return loop(lambda: retry.transaction(conn, once), chunk)


@contextmanager
def low_priority(conn: Connection) -> Iterator[None]:
    """The sweep's and prune's chunks set `DEADLOCK_PRIORITY LOW` and a `LOCK_TIMEOUT` on SQL
    Server; these last for the connection, so they are set back when the block ends (a
    connection that cannot be set back is discarded, not returned to the pool)."""
    try:
        yield
    finally:
        if conn.dialect.name == "mssql":
            try:
                with conn.begin():
                    conn.exec_driver_sql(NORMAL_SESSION)
            except SQLAlchemyError:
                conn.invalidate()
