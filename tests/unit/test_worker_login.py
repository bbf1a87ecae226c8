"""The workers' SQL Server login as the compose `init` service creates it (tasks/db/logins.py),
read as pymssql puts it on the wire: the password only ever inside a quoted literal, the four
privileges on each of ampsync's tables and nothing more."""

from __future__ import annotations

import pytest
from pymssql import _mssql
from sqlalchemy.dialects.mssql import pymssql as mssql_pymssql

from tasks.db import logins, schema

PYMSSQL = mssql_pymssql.dialect(paramstyle="pyformat")
TABLES = schema.define_tables("amplitude_queue")


def on_the_wire(login: str, password: str) -> list[str]:
    return [
        _mssql.substitute_params(s.sql, dict(s.params)).decode() if s.params else s.sql
        for s in logins.worker_login_statements(PYMSSQL, TABLES, login, password)
    ]


def test_the_login_gets_exactly_the_four_privileges_on_each_table():
    # given the statements for the login `ampsync`
    create, *grants = on_the_wire("ampsync", "Str0ng-enough-pw")
    # then it creates the login if missing (else sets its password) and its database user
    assert "IF SUSER_ID(@login) IS NULL" in create and "ALTER LOGIN" in create
    assert "CREATE USER ' + QUOTENAME(@login) + N' FOR LOGIN" in create
    # and grants SELECT, INSERT, UPDATE, DELETE on the queue table and each of its tables
    assert grants == [
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON dbo.{name} TO [ampsync];"
        for name in (
            "amplitude_queue",
            "amplitude_queue_endpoints",
            "amplitude_queue_runs",
            "amplitude_queue_feeds",
            "amplitude_queue_feed_state",
        )
    ]
    # and nothing that reaches beyond them: no role, no schema or database right
    text = "\n".join(grants + [create])
    for wider in (
        "db_owner",
        "sp_addrolemember",
        "ALTER ROLE",
        "CONTROL",
        "SCHEMA::",
        "CREATE TABLE",
    ):
        assert wider not in text


def test_a_password_with_quotes_stays_inside_its_literal():
    # given a password that tries to end its string and run a statement of its own
    password = "x'; DROP TABLE amplitude_queue; --"
    create = on_the_wire("ampsync", password)[0]
    # then pymssql sends it as one N'…' literal with its quote doubled, and the dynamic
    # statement quotes it again with QUOTENAME
    assert "@password nvarchar(128) = N'x''; DROP TABLE amplitude_queue; --'," in create
    assert create.count("DROP TABLE") == 1
    assert "QUOTENAME(@password, '''')" in create


@pytest.mark.parametrize(
    ("login", "password", "said"),
    [
        ("amp sync", "Str0ng-enough-pw", "letters, digits and _"),
        ("ampsync]; DROP", "Str0ng-enough-pw", "letters, digits and _"),
        ("ampsync", "short", "8 to 128"),
        ("ampsync", "", "8 to 128"),
    ],
)
def test_a_name_or_password_sql_server_would_refuse_is_one_line(login, password, said):
    with pytest.raises(logins.LoginError, match=said):
        logins.worker_login_statements(PYMSSQL, TABLES, login, password)
