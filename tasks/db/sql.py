"""Building blocks of every statement: the database's clock, time arithmetic and literal
strings, compiled for each dialect ampsync supports.

Times come from the database's clock, never a worker's. `kind` and `status` are compared with
literals, not bind parameters: SQL Server's filtered indexes need literals, and pymssql sends
string parameters as NVARCHAR, which turns seeks on these VARCHAR columns into scans
(docs/sqlserver.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, literal_column
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from ..outcomes import Status


class utcnow(FunctionElement[datetime]):
    """The database's current UTC time (naive), so leases never depend on a worker's clock."""

    type = DateTime()
    inherit_cache = True


@compiles(utcnow)
def _utcnow_default(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite and anything else
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


@compiles(utcnow, "mssql")
def _utcnow_mssql(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "SYSUTCDATETIME()"


@compiles(utcnow, "postgresql")
def _utcnow_pg(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "(now() AT TIME ZONE 'utc')"


@compiles(utcnow, "mysql")
def _utcnow_mysql(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "UTC_TIMESTAMP(6)"


class utcnow_plus(FunctionElement[datetime]):
    """The database's UTC time plus a number of seconds (a bind parameter or literal)."""

    type = DateTime()
    inherit_cache = True


@compiles(utcnow_plus)
def _plus_default(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    return (
        f"strftime('%Y-%m-%d %H:%M:%f', 'now', ({compiler.process(seconds, **kw)}) || ' seconds')"
    )


@compiles(utcnow_plus, "mssql")
def _plus_mssql(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    # DATEADD takes an int; milliseconds keep sub-second backoff for tests.
    return f"DATEADD(millisecond, CAST(({compiler.process(seconds, **kw)}) * 1000 AS INT), SYSUTCDATETIME())"


@compiles(utcnow_plus, "postgresql")
def _plus_pg(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    return (
        f"((now() AT TIME ZONE 'utc') + make_interval(secs => {compiler.process(seconds, **kw)}))"
    )


@compiles(utcnow_plus, "mysql")
def _plus_mysql(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    return f"DATE_ADD(UTC_TIMESTAMP(6), INTERVAL ({compiler.process(seconds, **kw)}) * 1000000 MICROSECOND)"


def lit(value: str) -> ColumnElement[Any]:
    """A string literal in the SQL text (see module docstring)."""
    assert value.replace("_", "").isalnum()
    return literal_column(f"'{value}'")


PENDING, IN_FLIGHT, SENT, FAILED = (lit(s) for s in Status)
