"""The pure pieces behind SQL Server safety (docs/sqlserver.md): which errors are retried,
how waits are planned, how chunk loops end, how intervals are split for DATEADD, how values
are quoted, and which event-feed queries SQL Server would refuse wrapped."""

from __future__ import annotations

import math
import random

import pytest
from pymssql import _mssql
from sqlalchemy import column, select, table
from sqlalchemy.dialects.mssql import pymssql as mssql_pymssql
from sqlalchemy.exc import OperationalError

from tasks.db import chunks, retry, sql, tsql
from tasks.db.feeds import wrapper_problems

PYMSSQL = mssql_pymssql.dialect(paramstyle="pyformat")


class FakeDBAPIError(Exception):
    """What a driver raises: pymssql and PyMySQL put the server's number first."""


class FakePsycopgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__("deadlock detected")
        self.sqlstate = sqlstate


def wrapped(orig: BaseException) -> OperationalError:
    return OperationalError("UPDATE …", {}, orig)


# --- deadlock and lock-timeout detection ---------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (FakeDBAPIError(1205, b"Transaction (Process ID 52) was deadlocked"), True),  # pymssql
        (FakeDBAPIError(1222, b"Lock request time out period exceeded."), True),
        (
            FakeDBAPIError(
                (1205, b"deadlocked"),
            ),
            True,
        ),  # _mssql's exception: one tuple arg
        (FakeDBAPIError(1213, "Deadlock found when trying to get lock"), True),  # MariaDB
        (FakeDBAPIError(1205, "Lock wait timeout exceeded"), True),  # MySQL's 1205
        (FakePsycopgError("40P01"), True),  # PostgreSQL deadlock_detected
        (FakePsycopgError("55P03"), True),  # lock_not_available
        (FakeDBAPIError("40001", "[40001] [SQL Server]Transaction was deadlocked"), True),  # ODBC
        (FakeDBAPIError(2627, b"Violation of PRIMARY KEY constraint"), False),
        (FakeDBAPIError(8115, b"Arithmetic overflow error"), False),
        (FakePsycopgError("23505"), False),
        (FakeDBAPIError("connection reset"), False),
        (ValueError("not a database error"), False),
    ],
)
def test_a_deadlock_victim_or_lock_timeout_is_known_by_its_number(error, expected):
    assert retry.retryable(error) is expected
    # SQLAlchemy's wrapper carries the driver's exception in .orig
    assert retry.retryable(wrapped(error)) is expected


def test_retrying_runs_the_work_again_after_a_deadlock_with_jittered_waits():
    calls, waits = [], []

    def work():
        calls.append(1)
        if len(calls) < 3:
            raise wrapped(FakeDBAPIError(1205, b"deadlocked"))
        return "done"

    assert retry.retrying(work, sleep=waits.append, rand=lambda: 0.5) == "done"
    assert len(calls) == 3
    assert waits == [retry.BASE_SECONDS, retry.BASE_SECONDS * 2]


def test_retrying_gives_up_after_its_attempts_and_never_retries_other_errors():
    calls = []

    def deadlocked():
        calls.append(1)
        raise wrapped(FakeDBAPIError(1222, b"lock timeout"))

    with pytest.raises(OperationalError):
        retry.retrying(deadlocked, attempts=4, sleep=lambda s: None)
    assert len(calls) == 4

    def broken():
        calls.append(2)
        raise wrapped(FakeDBAPIError(2627, b"duplicate key"))

    with pytest.raises(OperationalError):
        retry.retrying(broken, sleep=lambda s: None)
    assert calls.count(2) == 1


def test_waits_double_are_capped_and_jittered_between_half_and_one_and_a_half():
    for _ in range(50):
        waits = retry.delays(attempts=8, base=0.05, cap=2.0, rand=random.random)
        assert len(waits) == 7
        for n, wait in enumerate(waits):
            plain = min(2.0, 0.05 * 2**n)
            assert 0.5 * plain <= wait <= 1.5 * plain


# --- chunk loops ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changed", "total", "calls"),
    [
        ([1000, 1000, 500], 2500, 3),
        ([1000, 1000, 0], 2000, 3),  # an exact multiple needs one empty chunk to know
        ([0], 0, 1),
        ([999], 999, 1),
    ],
)
def test_a_chunk_loop_runs_until_a_chunk_changes_fewer_rows_than_it_may(changed, total, calls):
    steps = iter(changed)
    made = []

    def step():
        made.append(1)
        return next(steps)

    assert chunks.loop(step, chunk=1000) == total
    assert len(made) == calls


def test_a_chunk_on_sql_server_is_update_top_counted_in_the_same_batch():
    t = table("q", column("id"), column("status"))
    statement = tsql.driver_sql(
        t.update().where(t.c.status == sql.PENDING).values(status="x"), PYMSSQL
    )
    batch = tsql.counted(tsql.top(statement, 1000))
    assert batch.sql.startswith("UPDATE TOP (1000) q SET")
    assert batch.sql.endswith(";\nSELECT @@ROWCOUNT AS n")
    deleted = tsql.top(tsql.DriverSQL("DELETE FROM q WHERE q.id = 1"), 1000)
    assert deleted.sql == "DELETE TOP (1000) FROM q WHERE q.id = 1"
    with pytest.raises(ValueError):
        tsql.top(tsql.DriverSQL("SELECT 1"))


# --- intervals for DATEADD -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "parts"),
    [
        (300, [("second", 300)]),
        (0.2, [("millisecond", 200)]),  # the tests' backoff keeps its precision
        (1.5, [("second", 1), ("millisecond", 500)]),
        (-30 * 86400, [("day", -30)]),  # AMPSYNC_HISTORY_DAYS=30: 2,592,000,000 ms did not fit
        (-(6 * 86400 + 1.25), [("day", -6), ("second", -1), ("millisecond", -250)]),
        (0, []),
        (math.nan, []),
    ],
)
def test_an_interval_is_split_into_days_seconds_and_milliseconds(seconds, parts):
    assert sql.dateadd_parts(seconds) == parts


@pytest.mark.parametrize("seconds", [1e300, math.inf, -math.inf, 2**31 * 1000.0, -1e12])
def test_any_interval_a_setting_allows_fits_dateadd_int_and_the_time_type(seconds):
    parts = sql.dateadd_parts(seconds)
    assert parts and all(abs(n) <= sql.INT_MAX for _, n in parts)
    days = sum(n for unit, n in parts if unit == "day")
    assert abs(days) <= 1000 * 365  # from any day of this millennium, still inside DATETIME2


def test_split_parts_add_up_to_the_interval_to_the_millisecond():
    rng = random.Random(11)
    for _ in range(500):
        seconds = rng.uniform(-4e7, 4e7)
        scale = {"day": 86400, "second": 1, "millisecond": 0.001}
        total = sum(scale[unit] * n for unit, n in sql.dateadd_parts(seconds))
        assert abs(total - seconds) <= 0.0005 + 1e-6


def test_sql_server_renders_nested_dateadds_and_never_a_computed_int():
    rendered = str(select(sql.utcnow_plus(-30 * 86400 - 0.5)).compile(dialect=PYMSSQL))
    assert "DATEADD(millisecond, -500, DATEADD(day, -30, SYSUTCDATETIME()))" in rendered
    assert "CAST(" not in rendered


# --- literal quoting -----------------------------------------------------------------------------


def wire(statement) -> str:
    compiled = statement.compile(dialect=PYMSSQL, compile_kwargs={"render_postcompile": True})
    return _mssql.substitute_params(compiled.string, compiled.construct_params()).decode()


def test_a_claim_token_is_sent_as_a_plain_varchar_literal_not_nvarchar():
    t = table("q", column("claim_token"))
    token = "0123456789abcdef0123456789abcdef"
    assert wire(select(t).where(t.c.claim_token == sql.token(token))).endswith(
        f"q.claim_token = '{token}'"
    )
    # the same value as a bind parameter is what pymssql would otherwise send
    assert wire(select(t).where(t.c.claim_token == token)).endswith(f"q.claim_token = N'{token}'")


def test_a_value_that_is_not_safe_to_inline_is_cast_to_varchar_instead():
    t = table("q", column("run_id"))
    sent = wire(select(t).where(t.c.run_id == sql.varchar("it's; DROP TABLE q", 32)))
    assert sent.endswith("q.run_id = CAST(N'it''s; DROP TABLE q' AS VARCHAR(32))")
    assert wire(select(t).where(t.c.run_id == sql.token("not hex!"))).endswith(
        "CAST(N'not hex!' AS VARCHAR(32))"
    )


@pytest.mark.parametrize("value", ["it's", "a b", "x'--", "", "é"])
def test_lit_refuses_anything_but_ampsyncs_own_words(value):
    with pytest.raises(ValueError):
        sql.lit(value)


def test_an_id_above_two_to_the_31_is_cast_to_bigint_on_sql_server():
    from tasks.db import schema

    q = schema.define_tables("dbo.q").queue
    sent = wire(select(q.c.id).where(q.c.id.in_([3_000_000_001, 2]), q.c.id > 5))
    assert "IN (CAST(3000000001 AS BIGINT), CAST(2 AS BIGINT))" in sent
    assert "dbo.q.id > CAST(5 AS BIGINT)" in sent


# --- the event-feed wrapper ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("SELECT order_id, rv FROM dbo.pickups ORDER BY rv", ["ORDER BY"]),
        ("SELECT order_id, amount * 2, rv FROM dbo.pickups", ["column 2 (amount * 2) has no name"]),
        ("SELECT p.id, o.id, p.rv FROM p JOIN o ON o.p = p.id", ["named 'id' like column 1"]),
        ("SELECT TOP (100) order_id, rv FROM dbo.pickups ORDER BY rv", []),
        ("SELECT order_id, rv FROM dbo.pickups ORDER BY rv OFFSET 0 ROWS", []),
        ("SELECT order_id, amount * 2 AS twice, total = a + b, rv FROM dbo.pickups", []),
        ("SELECT p.*, rv FROM dbo.pickups AS p", []),
        ("this is not SQL ((", []),  # the server says what is wrong
    ],
)
def test_a_query_sql_server_refuses_wrapped_is_named_with_what_to_change(query, says):
    problems = wrapper_problems(query, "mssql")
    assert len(problems) == len(says)
    for problem, part in zip(problems, says, strict=True):
        assert part in problem
    # PostgreSQL, MySQL and SQLite accept these wrapped
    assert wrapper_problems(query, "postgresql") == []


# --- settings ------------------------------------------------------------------------------------


def test_sql_server_through_pyodbc_is_refused_with_one_line(monkeypatch):
    from tasks import settings

    monkeypatch.setenv("AMPSYNC_DATABASE_URL", "mssql+pyodbc://sa:Secret1@dwh/crm?driver=x")
    with pytest.raises(settings.SettingsError) as raised:
        settings.load()
    message = str(raised.value)
    assert "\n" not in message and "mssql+pymssql://" in message and "Secret1" not in message


def test_an_unqualified_queue_table_on_sql_server_is_in_dbo(monkeypatch):
    from tasks import settings

    monkeypatch.setenv("AMPSYNC_DATABASE_URL", "mssql+pymssql://sa:pw@dwh/crm")
    monkeypatch.setenv("AMPSYNC_QUEUE_TABLE", "amplitude_queue")
    assert settings.load().queue_table == "dbo.amplitude_queue"
    monkeypatch.setenv("AMPSYNC_QUEUE_TABLE", "crm.amp_q")
    assert settings.load().queue_table == "crm.amp_q"
    monkeypatch.setenv("AMPSYNC_DATABASE_URL", "sqlite:///x.db")
    monkeypatch.setenv("AMPSYNC_QUEUE_TABLE", "amplitude_queue")
    assert settings.load().queue_table == "amplitude_queue"
