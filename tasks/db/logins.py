"""The workers' least-privilege login on SQL Server, created by the compose `init` service as
`sa` (README, "Security"): a server login, its database user, and SELECT, INSERT, UPDATE,
DELETE on the queue table and ampsync's tables beside it — nothing else. Workers use no
procedure and take no application lock (`sp_getapplock` is init-db's, run by `sa`), so they
need no EXECUTE. Safe to run again: an existing login gets the new password, an existing user
and grants stay.

The password is a parameter, never part of the text: pymssql pastes it in as a quoted N'…'
literal (docs/sqlserver.md) and QUOTENAME quotes it again inside the dynamic statement.
"""

from __future__ import annotations

import re

from sqlalchemy import Engine
from sqlalchemy.engine import Dialect

from .check import PRIVILEGES, table_grant
from .schema import QueueTables
from .tsql import DriverSQL

# A plain identifier: it is written into GRANT statements bracket-quoted, never as a value.
LOGIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class LoginError(ValueError):
    """A login name or password SQL Server would refuse; the message says which and why."""


def worker_login_statements(
    dialect: Dialect, tables: QueueTables, login: str, password: str
) -> list[DriverSQL]:
    if not LOGIN_NAME.match(login):
        raise LoginError(f"login {login!r}: letters, digits and _ only, at most 64")
    if not 8 <= len(password) <= 128:
        raise LoginError("the workers' password: 8 to 128 characters (SQL Server's policy)")
    preparer = dialect.identifier_preparer
    user = f"[{login}]"
    create = DriverSQL(
        "DECLARE @login sysname = %(login)s, @password nvarchar(128) = %(password)s, "
        "@sql nvarchar(max);\n"
        "IF SUSER_ID(@login) IS NULL\n"
        "  SET @sql = N'CREATE LOGIN ' + QUOTENAME(@login) + N' WITH PASSWORD = ' "
        "+ QUOTENAME(@password, '''') + N', CHECK_POLICY = ON';\n"
        "ELSE\n"
        "  SET @sql = N'ALTER LOGIN ' + QUOTENAME(@login) + N' WITH PASSWORD = ' "
        "+ QUOTENAME(@password, '''');\n"
        "EXEC sp_executesql @sql;\n"
        "IF DATABASE_PRINCIPAL_ID(@login) IS NULL\n"
        "BEGIN\n"
        "  SET @sql = N'CREATE USER ' + QUOTENAME(@login) + N' FOR LOGIN ' + QUOTENAME(@login);\n"
        "  EXEC sp_executesql @sql;\n"
        "END",
        {"login": login, "password": password},
    )
    grants = [
        DriverSQL(
            table_grant(
                list(PRIVILEGES),
                f"{preparer.quote_schema(t.schema or 'dbo')}.{preparer.quote(t.name)}",
                user,
            )
        )
        for t in (tables.queue, tables.endpoints, tables.runs, tables.feeds, tables.feed_state)
    ]
    return [create, *grants]


def create_worker_login(engine: Engine, tables: QueueTables, login: str, password: str) -> None:
    """Create (or update) the workers' login and its grants, in one transaction."""
    statements = worker_login_statements(engine.dialect, tables, login, password)
    with engine.begin() as conn:
        for statement in statements:
            statement.run(conn)
