"""T-SQL batches: where one SQLAlchemy statement is not what SQL Server needs, ampsync sends a
batch of its own, built from compiled Core statements and run with `exec_driver_sql` exactly
as written here (docs/sqlserver.md says why each one is shaped as it is):

- `UPDATE TOP (1000) …` / `DELETE TOP (1000) …` followed by `SELECT @@ROWCOUNT`: a chunk of a
  large update, counted by the server in the same batch (`rowcount` is -1 when the server's
  user options set NOCOUNT);
- the claim: one table reference, `WITH c AS (SELECT TOP (n) … WITH (ROWLOCK, UPDLOCK,
  READPAST) … ORDER BY id) UPDATE c SET … OUTPUT inserted.id INTO @ids`;
- an INSERT followed by `SELECT SCOPE_IDENTITY()`, never `OUTPUT` without `INTO` (a trigger on
  the queue table makes SQL Server refuse it, error 334).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ClauseElement

# Rows one statement may change: SQL Server escalates to a table lock at about 5,000 locks
# on one table or index, and READPAST cannot skip a table lock (docs/sqlserver.md).
CHUNK = 1000

# The sweep's statements give way to claims and acknowledgements: a deadlock picks the sweep
# as its victim, and a lock held longer than this fails the chunk (retried) instead of
# queueing the sweep behind it.
SWEEP_SESSION = "SET DEADLOCK_PRIORITY LOW; SET LOCK_TIMEOUT 2000"
NORMAL_SESSION = "SET DEADLOCK_PRIORITY NORMAL; SET LOCK_TIMEOUT -1"


@dataclass(frozen=True)
class DriverSQL:
    """A statement as handed to the DBAPI driver: SQL text in the driver's paramstyle and its
    parameters (pymssql pastes them into the text, docs/sqlserver.md)."""

    sql: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def run(self, conn: Connection) -> Any:
        return conn.exec_driver_sql(self.sql, dict(self.params))


def driver_sql(statement: ClauseElement, dialect: Dialect) -> DriverSQL:
    """`statement` compiled as SQLAlchemy would hand it to the driver: text and parameters,
    after the types' bind processing."""
    if dialect.positional:
        raise ValueError(f"{dialect.name}+{dialect.driver}: batches need a named paramstyle")
    compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    params = dict(compiled.construct_params() or {})
    processors: Mapping[str, Any] = getattr(compiled, "_bind_processors", {})
    for name, value in params.items():
        if name in processors:
            params[name] = processors[name](value)
    return DriverSQL(str(compiled).strip(), params)


def top(statement: DriverSQL, n: int = CHUNK) -> DriverSQL:
    """`UPDATE t …` / `DELETE FROM t …` changing at most `n` rows."""
    sql = statement.sql
    for verb in ("UPDATE ", "DELETE "):
        if sql.startswith(verb):
            return DriverSQL(f"{verb}TOP ({int(n)}) {sql[len(verb) :]}", statement.params)
    raise ValueError(f"not an UPDATE or DELETE: {sql[:40]!r}")


def counted(statement: DriverSQL) -> DriverSQL:
    """The statement followed by the number of rows it changed, in the same batch."""
    return DriverSQL(f"{statement.sql};\nSELECT @@ROWCOUNT AS n", statement.params)


def with_identity(statement: DriverSQL) -> DriverSQL:
    """A one-row INSERT followed by the id it created (unaffected by triggers)."""
    return DriverSQL(
        f"{statement.sql};\nSELECT CAST(SCOPE_IDENTITY() AS BIGINT) AS id", statement.params
    )


def run_count(conn: Connection, statement: DriverSQL) -> int:
    """Run a `counted` batch; the rows it changed."""
    return int(statement.run(conn).scalar_one())
