"""SQL Server cannot run here: its statements are compiled with the mssql dialect, checked for
what SQL Server needs, and parsed as T-SQL. The same statements run on PostgreSQL and MariaDB
in the other tests."""

from __future__ import annotations

import re

import pytest
import sqlglot
from pymssql import _mssql
from sqlalchemy.dialects import mssql, sqlite
from sqlalchemy.dialects.mssql import pymssql

from tasks import outcomes
from tasks.db import queue, schema, setup

DIALECT = mssql.dialect()
PYMSSQL = pymssql.dialect(paramstyle="pyformat")
TABLES = schema.define_tables("dbo.amplitude_queue")
TOKEN = "0" * 32


def claim_sql(tables, kind, limit, lease, after_id=0) -> str:
    """The claim's batch as pymssql sends it (docs/sqlserver.md, "The claim")."""
    batch = queue.claim_batch(tables, kind, limit, lease, TOKEN, PYMSSQL, after_id)
    return _mssql.substitute_params(batch.sql, dict(batch.params)).decode()


def tsql(statement) -> str:
    return str(statement.compile(dialect=DIALECT, compile_kwargs={"literal_binds": True}))


def parse(sql: str):
    return sqlglot.parse_one(sql, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)


def test_the_claim_locks_with_updlock_readpast_rowlock_and_returns_ids_with_output():
    for kind in outcomes.KINDS:
        sql = claim_sql(TABLES, kind, 2000, 300)
        assert "WITH (ROWLOCK, UPDLOCK, READPAST)" in sql
        assert "OUTPUT inserted.id INTO @ids" in sql
        assert "SELECT TOP 2000" in sql and "ORDER BY candidate.id" in sql
        # kind and status are literals (filtered indexes; no NVARCHAR parameters on VARCHAR)
        assert f"candidate.kind = '{kind}'" in sql and "candidate.status = 'pending'" in sql
        assert "SYSUTCDATETIME()" in sql  # the database's clock, never a worker's
        for statement in sqlglot.parse(sql, read="tsql", error_level=sqlglot.ErrorLevel.RAISE):
            assert statement is not None


def test_only_ordered_kinds_check_for_an_earlier_unfinished_row_of_the_same_key():
    assert "earlier.user_id = candidate.user_id" in claim_sql(TABLES, "identify", 10, 300)
    assert "earlier.group_value = candidate.group_value" in claim_sql(
        TABLES, "group_identify", 10, 300
    )
    assert (
        "earlier"
        not in queue.claim_batch(TABLES, "event", 10, 300, TOKEN, PYMSSQL, after_identify=False).sql
    )


def test_the_ddl_creates_the_queue_table_with_sql_server_types_and_parses_as_tsql():
    ddl = setup.compile_ddl(setup.create_ddl(TABLES), DIALECT)
    statements = [s for s in ddl.split("\nGO\n") if s.strip()]
    create = statements[0]
    for column, sql_type in [
        ("id", "BIGINT NOT NULL IDENTITY"),
        ("kind", "VARCHAR(16) NOT NULL"),
        ("user_id", "NVARCHAR(255)"),
        ("properties", "NVARCHAR(max)"),
        ("event_time", "DATETIME2"),
        ("last_error", "NVARCHAR(2000)"),
        ("status", "VARCHAR(16) NOT NULL DEFAULT 'pending'"),
        ("created_at", "DATETIME2 NOT NULL DEFAULT SYSUTCDATETIME()"),
    ]:
        assert re.search(rf"\b{column} {re.escape(sql_type)}", create), (column, create)
    assert create.startswith("CREATE TABLE dbo.amplitude_queue")
    assert any(
        "CREATE INDEX ix_amplitude_queue_claim ON dbo.amplitude_queue (kind, status, id)" in s
        for s in statements
    )
    for statement in statements:
        parse(statement)


@pytest.mark.parametrize(
    "name,build",
    [
        # the sweep's Core statements (SQL Server's own batches: test_mssql_statements.py)
        ("sweep", lambda: queue.sweep_statements(TABLES, 12, sqlite.dialect())),
        ("renew", lambda: [queue.renew_statement(TABLES, TOKEN, 300)]),
        ("load", lambda: [queue.load_statement(TABLES, TOKEN)]),
        (
            "acknowledge",
            lambda: queue.ack_statements(
                TABLES,
                TOKEN,
                queue.Acknowledgement(
                    sent=[1, 2],
                    failed={3: "invalid row: it's broken"},
                    retry={
                        (1.5, True, "will retry: HTTP 500"): [4],
                        (30.0, False, "will retry: 429"): [5],
                    },
                ),
            ),
        ),
        (
            "acknowledge",
            lambda: queue.ack_statements(
                TABLES,
                TOKEN,
                queue.Acknowledgement(sent=[1, 2], failed={}, retry={}, all_sent=True),
            ),
        ),
    ],
)
def test_send_side_statements_touch_only_the_claims_rows_and_parse_as_tsql(name, build):
    statements = build()
    assert statements
    for statement in statements:
        sql = tsql(statement)
        parse(sql)
        if name != "sweep":
            assert f"claim_token = '{TOKEN}'" in sql
        if name in ("acknowledge", "renew", "load"):
            assert "status = 'in_flight'" in sql


def test_a_batch_that_was_all_sent_is_acknowledged_by_its_claim_token_alone():
    ack = queue.Acknowledgement(sent=list(range(1, 2001)), failed={}, retry={}, all_sent=True)
    (statement,) = queue.ack_statements(TABLES, TOKEN, ack)
    assert " IN (" not in tsql(statement) and "status='sent'" in tsql(statement)


def test_an_acknowledgement_is_one_statement_per_outcome_not_per_row():
    ack = queue.Acknowledgement(
        sent=list(range(1, 1501)),
        failed={2000: "invalid row: x"},
        retry={(1.0, False, "will retry: 500"): [3000, 3001]},
    )
    statements = queue.ack_statements(TABLES, TOKEN, ack)
    # 1500 sent ids go in two chunks (SQL Server allows 2100 parameters), 1 failed, 1 retry
    assert len(statements) == 4


def test_schema_qualified_names_keep_their_schema():
    sql = claim_sql(schema.define_tables("crm.amp_q"), "event", 5, 60)
    assert "UPDATE b SET" in sql and "FROM crm.amp_q AS candidate" in sql


def test_init_db_print_sql_gives_a_dba_the_complete_tsql_when_the_server_is_out_of_reach(tmp_path):

    from support import CLEAN_ENV, run_cli

    # given a SQL Server URL this machine cannot reach
    env = {
        **CLEAN_ENV,
        "AMPSYNC_DATABASE_URL": "mssql+pymssql://sa:Secret1@127.0.0.1:1/dwh",
        "AMPSYNC_QUEUE_TABLE": "dbo.amplitude_queue",
    }
    # when the DDL is asked for
    result = run_cli("init-db", "--print-sql", env=env, cwd=tmp_path)
    # then it prints every statement as T-SQL, and says why on stderr (password masked)
    assert result.returncode == 0, result.stderr
    assert "cannot reach the database at mssql+pymssql://sa:***@127.0.0.1:1/dwh" in result.stderr
    statements = [s for s in result.stdout.split("\nGO\n") if s.strip()]
    assert statements[0].startswith("CREATE TABLE dbo.amplitude_queue (")
    assert any("dbo.amplitude_queue_runs" in s for s in statements)
    for statement in statements:
        parse(statement)


def test_a_claim_with_a_floor_seeks_past_it_and_still_parses_as_tsql():
    sql = claim_sql(TABLES, "identify", 2000, 300, after_id=12345)
    assert "candidate.id > CAST(12345 AS BIGINT)" in sql
    assert "earlier.id < candidate.id" in sql  # the same-key check still looks below the floor
    sqlglot.parse(sql, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
