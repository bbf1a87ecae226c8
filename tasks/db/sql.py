"""Building blocks of every statement: the database's clock, time arithmetic, literal strings
and big integers, compiled for each dialect ampsync supports.

Times come from the database's clock, never a worker's. `kind` and `status` are compared with
literals, not bind parameters: SQL Server's filtered indexes need literals, and pymssql sends
string parameters as NVARCHAR, which turns seeks on these VARCHAR columns into scans
(docs/sqlserver.md). The same holds for every other VARCHAR column ampsync compares
(`claim_token`, `endpoint`, `run_id`, `task`): `varchar()` writes them as plain literals.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    String,
    TypeDecorator,
    cast,
    literal_column,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import BindParameter, ColumnElement, FunctionElement
from sqlalchemy.sql.type_api import TypeEngine

from ..outcomes import Status

# SQL Server's `int`: DATEADD's number and any bare integer literal must fit it (a bare literal
# above it is typed DECIMAL, docs/sqlserver.md).
INT_MAX = 2_147_483_647

# An interval longer than this means "never" (a backoff) or "forever" (a retention): it is cut
# to this length, which every database's time type still holds from today in both directions.
MAX_INTERVAL_SECONDS = 1000 * 365 * 86400


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
@compiles(utcnow, "mariadb")  # a mariadb:// URL names its own dialect
def _utcnow_mysql(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "UTC_TIMESTAMP(6)"


def clamp_seconds(seconds: float) -> float:
    """An interval within ±MAX_INTERVAL_SECONDS (NaN is 0): any value a setting allows,
    `inf` included, becomes one every database can add to its clock."""
    if math.isnan(seconds):
        return 0.0
    return max(-float(MAX_INTERVAL_SECONDS), min(float(MAX_INTERVAL_SECONDS), float(seconds)))


def dateadd_parts(seconds: float) -> list[tuple[str, int]]:
    """The interval as SQL Server's DATEADD steps: whole days, whole seconds and milliseconds,
    each inside `int` for every interval (DATEADD takes an int; 30 days in milliseconds does
    not fit one). Zero steps are left out; precision is the millisecond."""
    value = clamp_seconds(seconds)
    sign = -1 if value < 0 else 1
    days, rest = divmod(round(abs(value) * 1000), 86_400_000)
    whole, millis = divmod(rest, 1000)
    return [
        (unit, sign * n)
        for unit, n in (("day", days), ("second", whole), ("millisecond", millis))
        if n
    ]


class utcnow_plus(FunctionElement[datetime]):
    """The database's UTC time plus a number of seconds. The number is written into the
    statement (it is part of SQLAlchemy's cache key), cut to MAX_INTERVAL_SECONDS."""

    type = DateTime()
    inherit_cache = True

    def __init__(self, seconds: float) -> None:
        super().__init__(literal_column(repr(clamp_seconds(seconds))))


def _seconds(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    return compiler.process(seconds, **kw)


@compiles(utcnow_plus)
def _plus_default(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = _seconds(element, compiler, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', ({seconds}) || ' seconds')"


@compiles(utcnow_plus, "mssql")
def _plus_mssql(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    # DATEADD takes an int: days, seconds and milliseconds, each in range (docs/sqlserver.md).
    sql = "SYSUTCDATETIME()"
    for unit, n in dateadd_parts(float(_seconds(element, compiler, **kw))):
        sql = f"DATEADD({unit}, {n}, {sql})"
    return sql


@compiles(utcnow_plus, "postgresql")
def _plus_pg(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = _seconds(element, compiler, **kw)
    return f"((now() AT TIME ZONE 'utc') + make_interval(secs => {seconds}))"


@compiles(utcnow_plus, "mysql")
@compiles(utcnow_plus, "mariadb")
def _plus_mysql(element: utcnow_plus, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = _seconds(element, compiler, **kw)
    return f"DATE_ADD(UTC_TIMESTAMP(6), INTERVAL ({seconds}) * 1000000 MICROSECOND)"


# --- literal strings ---------------------------------------------------------------------------

_SAFE = re.compile(r"[A-Za-z0-9_\-.]{1,64}")
_HEX = re.compile(r"[0-9a-f]{32}")


def lit(value: str) -> ColumnElement[Any]:
    """A string literal in the SQL text, for ampsync's own words (kinds, statuses, endpoint
    names): letters, digits, `_`, `-` and `.` only (see module docstring)."""
    if not _SAFE.fullmatch(value):
        raise ValueError(f"not a literal ampsync writes into SQL: {value!r}")
    return literal_column(f"'{value}'")


def varchar(value: str, length: int = 32) -> ColumnElement[Any]:
    """A value compared with a VARCHAR column: a plain '…' literal when it is made of safe
    characters (a claim token is 32 hex digits, a run id 12), else the value as a parameter
    CAST to VARCHAR, so that pymssql's N'…' never meets the column unconverted."""
    if _SAFE.fullmatch(value):
        return literal_column(f"'{value}'")
    return cast(BindParameter(None, value, type_=String(length)), String(length))


def token(value: str) -> ColumnElement[Any]:
    """A claim token (32 hex digits, `uuid4().hex`) compared with `claim_token`."""
    if _HEX.fullmatch(value):
        return literal_column(f"'{value}'")
    return varchar(value)


PENDING, IN_FLIGHT, SENT, FAILED = (lit(s) for s in Status)


# --- big integers --------------------------------------------------------------------------------


class bigint(FunctionElement[int]):
    """An integer meant as BIGINT. pymssql writes integers bare, and SQL Server types a bare
    literal above 2,147,483,647 DECIMAL: on SQL Server it is written CAST(… AS BIGINT)."""

    type = BigInteger()
    inherit_cache = True


@compiles(bigint)
def _bigint_default(element: bigint, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = element.clauses
    return compiler.process(value, **kw)


@compiles(bigint, "mssql")
def _bigint_mssql(element: bigint, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = element.clauses
    return f"CAST({compiler.process(value, **kw)} AS BIGINT)"


class Id(TypeDecorator[int]):
    """The type of ampsync's BIGINT ids: INTEGER on SQLite (it autoincrements only INTEGER
    keys); every value compared with an id goes through `bigint` (CAST on SQL Server)."""

    impl = BigInteger
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(Integer() if dialect.name == "sqlite" else BigInteger())

    def bind_expression(self, bindvalue: BindParameter[int]) -> ColumnElement[int]:
        return bigint(bindvalue)


# --- stored sizes and lenient reads ------------------------------------------------------------


class stored_bytes(FunctionElement[int]):
    """The bytes a text column holds, as UTF-8, measured by the database without handing the
    value to Python; 0 for NULL. On SQL Server NVARCHAR holds UTF-16, two bytes a character
    (four for a surrogate pair): half of DATALENGTH never exceeds the UTF-8 size, so a row is
    never judged larger than it is (docs/architecture.md, "Memory")."""

    type = BigInteger()
    inherit_cache = True


@compiles(stored_bytes)
def _stored_bytes_default(element: stored_bytes, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite: LENGTH of text counts characters; of the same value as a BLOB, its bytes.
    (value,) = element.clauses
    return f"COALESCE(LENGTH(CAST({compiler.process(value, **kw)} AS BLOB)), 0)"


@compiles(stored_bytes, "postgresql")
def _stored_bytes_pg(element: stored_bytes, compiler: SQLCompiler, **kw: Any) -> str:
    # OCTET_LENGTH reads the size from a TOASTed value's header: nothing is decompressed.
    (value,) = element.clauses
    return f"COALESCE(OCTET_LENGTH({compiler.process(value, **kw)}), 0)"


@compiles(stored_bytes, "mysql")
@compiles(stored_bytes, "mariadb")
def _stored_bytes_mysql(element: stored_bytes, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = element.clauses  # LENGTH counts bytes in the column's character set (utf8mb4)
    return f"COALESCE(LENGTH({compiler.process(value, **kw)}), 0)"


@compiles(stored_bytes, "mssql")
def _stored_bytes_mssql(element: stored_bytes, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = element.clauses
    return f"COALESCE(DATALENGTH({compiler.process(value, **kw)}) / 2, 0)"


class LenientTime(TypeDecorator[datetime]):
    """A time column read so that a value the dialect cannot parse (any text fits a SQLite
    time column) reaches Python as stored instead of failing the whole result: the payload
    builder then fails that row alone, with the value in its reason."""

    impl = DateTime
    cache_ok = True

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        parse = self.impl_instance.result_processor(dialect, coltype)
        if parse is None:
            return None

        def process(value: Any) -> Any:
            try:
                return parse(value)
            except (ValueError, TypeError):
                return value

        return process
