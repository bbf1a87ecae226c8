"""Every statement ampsync can send to SQL Server, as pymssql puts it on the wire, checked
against what a real server needs (docs/sqlserver.md). No SQL Server runs here: the text is
parsed as T-SQL (sqlglot) and held to the rules below; the same logic runs on PostgreSQL,
MariaDB and SQLite in the other tests.

Two parts:
- the catalogue (tasks/db/catalog.py, what `ampsync statements` prints), one case per
  statement: a statement without a case fails, and every statement is held to every rule;
- one test per point of the SQL Server review (issue 11), each written against the functions
  the workers call, so that it fails on the code before the fix.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import datetime

import pytest
import sqlglot
from pymssql import _mssql
from sqlalchemy.dialects.mssql import pymssql as mssql_pymssql
from sqlglot import expressions as exp

from tasks.db import feeds, queue, schema, setup

DIALECT = mssql_pymssql.dialect(paramstyle="pyformat")  # as create_engine makes it
TABLES = schema.define_tables("dbo.amplitude_queue")
INT_MAX = 2_147_483_647
TOKEN = "0123456789abcdef0123456789abcdef"

# The VARCHAR columns of ampsync's tables (kind, status, claim_token, endpoint, run_id, task):
# compared with N'…' they are converted and their index seek becomes a scan.
VARCHAR = {
    c.name
    for t in TABLES.metadata.sorted_tables
    for c in t.columns
    if c.type.compile(dialect=DIALECT).startswith("VARCHAR")
}


# --- rules every statement is held to ----------------------------------------------------------


def parts(sql: str) -> list[exp.Expression]:
    """The batch's statements as sqlglot reads T-SQL. sqlglot cannot read `UPDATE TOP (n) t`
    (valid T-SQL; `DELETE TOP (n)` it reads): the TOP is taken out for parsing only."""
    readable = re.sub(r"\bUPDATE TOP \(\d+\) ", "UPDATE ", sql)
    return [
        p
        for p in sqlglot.parse(readable, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
        if p is not None
    ]


def nvarchar_compared_with_varchar(tree: exp.Expression) -> list[str]:
    found = []
    for node in tree.find_all(exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.In):
        if isinstance(node.parent, exp.Update) and node.arg_key == "expressions":
            continue  # SET column = value assigns, it does not compare
        sides = [node.this] + (
            list(node.expressions) if isinstance(node, exp.In) else [node.expression]
        )
        columns = [s for s in sides if isinstance(s, exp.Column) and s.name in VARCHAR]
        nationals = [s for s in sides if isinstance(s, exp.National)]
        if columns and nationals:
            found.append(node.sql(dialect="tsql"))
    return found


def decimal_literals(sql: str) -> list[str]:
    """Bare integer literals above int's range (typed DECIMAL by SQL Server) that are not
    converted to BIGINT right where they stand."""
    text = re.sub(r"N?'(?:[^']|'')*'", "''", sql)  # string literals out
    bad = []
    for m in re.finditer(r"(?<![\w.@])-?\d+(?![\w.])", text):
        if abs(int(m.group())) <= INT_MAX:
            continue
        before, after = text[: m.start()], text[m.end() :]
        cast = re.search(r"CAST\($", before) and after.startswith(" AS BIGINT)")
        declared = re.search(r"@\w+ BIGINT = $", before)
        if not (cast or declared):
            bad.append(m.group())
    return bad


def dateadd_arguments(sql: str) -> list[str]:
    """Every DATEADD's number, as written."""
    return re.findall(r"DATEADD\(\s*\w+\s*,\s*([^,]+?)\s*,", sql)


def statements_of(sql: str) -> list[str]:
    """The batch split at the semicolons outside string literals."""
    pieces, start, quoted = [], 0, False
    for i, char in enumerate(sql):
        if char == "'":
            quoted = not quoted
        elif char == ";" and not quoted:
            pieces.append(sql[start:i])
            start = i + 1
    pieces.append(sql[start:])
    return [p for p in pieces if p.strip()]


def outputs_without_into(sql: str) -> list[str]:
    return [
        s.strip()[:80]
        for s in statements_of(sql)
        if re.search(r"\bOUTPUT\b", s) and not re.search(r"\bOUTPUT\b[^;]*\bINTO\b", s)
    ]


def changes_of_queue_rows(tree: exp.Expression) -> bool:
    target = tree.this if isinstance(tree, exp.Update | exp.Delete) else None
    name = target.name if isinstance(target, exp.Table) else ""
    return name in (TABLES.queue.name, TABLES.runs.name)


def bounded(statement_sql: str) -> str | None:
    """How an UPDATE or DELETE of queue rows is kept below lock escalation: TOP (≤ 1,000), one
    claim's rows (its token: at most a batch, ≤ 2,000, one lock per row and index), an id
    list of ≤ 1,000, or one id. None when nothing bounds it."""
    if m := re.match(r"\s*(?:UPDATE|DELETE) TOP \((\d+)\)", statement_sql):
        return "top" if int(m.group(1)) <= 1000 else None
    if re.search(r"\.claim_token = '[0-9a-f]{32}'", statement_sql):
        return "claim"
    if m := re.search(r"\.id IN \(([^)]*(?:\)[^)]*)*?)\)(?: |$)", statement_sql):
        return "ids" if m.group(1).count("CAST(") <= 1000 else None
    if re.search(r"\.id = CAST\(\d+ AS BIGINT\)", statement_sql):
        return "id"
    return None


def check_rules(sql: str) -> None:
    trees = parts(sql)  # parses as T-SQL
    for tree in trees:
        assert not nvarchar_compared_with_varchar(tree), nvarchar_compared_with_varchar(tree)
    assert not decimal_literals(sql), decimal_literals(sql)
    for number in dateadd_arguments(sql):
        assert re.fullmatch(r"-?\d+", number), f"DATEADD computes its number: {number}"
        assert abs(int(number)) <= INT_MAX, number
    assert not outputs_without_into(sql), outputs_without_into(sql)
    pieces = statements_of(sql)
    for tree, piece in zip(trees, pieces, strict=False):
        if changes_of_queue_rows(tree):
            assert bounded(piece), f"may change more than 1,000 rows at once: {piece[:120]}"
    if re.search(r"\bWITH c AS \(", sql):  # a claim: its one table reference reads locked
        cte = sql.split("WITH c AS (", 1)[1]
        assert re.search(
            r"FROM dbo\.amplitude_queue AS candidate WITH \(ROWLOCK, UPDLOCK, READPAST\)", cte
        )
        assert re.search(r"SELECT TOP \d+ candidate\.id", cte)


# --- the catalogue: one case per statement ----------------------------------------------------

CLAIM = (
    "WITH (ROWLOCK, UPDLOCK, READPAST)",
    "sum(c.stored_bytes) OVER (ORDER BY c.id ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)",
    "UPDATE b SET",
    "WHERE bytes_before < CAST(20000000 AS BIGINT)",
    "OUTPUT inserted.id INTO @ids",
    "DATEADD(second, 3000, SYSUTCDATETIME())",
    "SELECT id FROM @ids",
)
FLOOR = ("candidate.id > CAST(3000000003 AS BIGINT)",)
DUE = ("SELECT TOP 1", "status = 'pending'")
CHUNK = ("SET DEADLOCK_PRIORITY LOW", "SET LOCK_TIMEOUT", "TOP (1000)", "SELECT @@ROWCOUNT AS n")
NORMAL = ("SET DEADLOCK_PRIORITY NORMAL; SET LOCK_TIMEOUT -1",)
FOREVER = "DATEADD(day, 365000, SYSUTCDATETIME())"  # an unbounded wait, cut to 1,000 years
LONG_AGO = "DATEADD(day, -365000, SYSUTCDATETIME())"
MINE = (f"claim_token = '{'3f2a9c1e5b7d4e6f8a0b1c2d3e4f5a6b'}'", "status = 'in_flight'")


def feed_cases(name: str, kind: str, source: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    group = f"feed {name} ({kind})"
    cases = {
        f"{group}: source": source,
        f"{group}: its row": (f"feed = N'{name}'",),
        f"{group}: its row, first run (1/2)": ("INSERT INTO dbo.amplitude_queue_feeds",),
        f"{group}: its row, first run (2/2)": (f"feed = N'{name}'",),
        f"{group}: take its turn": ("version = 7;", "SELECT @@ROWCOUNT AS n"),
        f"{group}: the queue database's time": ("SYSUTCDATETIME()",),
        f"{group}: enqueue": ("SELECT CAST(SCOPE_IDENTITY() AS BIGINT) AS id",),
        f"{group}: enqueue an invalid row as failed": ("id = CAST(3000000001 AS BIGINT)",),
        f"{group}: record the run": ("SET cursor_value=",),
        f"{group}: record a failed run": ("last_error=N'the query failed'",),
        f"{group}: last runs": ("FROM dbo.amplitude_queue_feeds",),
    }
    if kind == "event":
        cases[f"{group}: cursor bound"] = ("CAST(MIN_ACTIVE_ROWVERSION() AS BIGINT)",)
    else:
        cases.update(
            {
                f"{group}: state": ("FROM dbo.amplitude_queue_feed_state",),
                f"{group}: status of pending rows": ("IN (CAST(3000000001 AS BIGINT)",),
                f"{group}: state written (1/2)": ("entity = N'Alice'",),
                f"{group}: state written (2/2)": ("INSERT INTO dbo.amplitude_queue_feed_state",),
            }
        )
    return cases


CASES: dict[str, tuple[str, ...]] = {
    **{f"claim: claim {k}": CLAIM for k in ("identify", "event", "group_identify")},
    **{
        f"claim: claim {k} past the claim floor": CLAIM + FLOOR
        for k in ("identify", "event", "group_identify")
    },
    **{
        f"claim: due rows left of {k}": DUE + (f"kind = '{k}'",)
        for k in ("identify", "event", "group_identify")
    },
    "send: count a re-run (1/2)": MINE + ("attempts >= 1000",),
    "send: count a re-run (2/2)": MINE + ("attempts + 1",),
    "send: load and renew (1/2)": MINE + ("DATEADD(second, 2970, SYSUTCDATETIME()) AS short",),
    "send: load and renew (2/2)": MINE + ("locked_until=DATEADD(second, 3000, SYSUTCDATETIME())",),
    "send: defer identify rows out of order (1/2)": (
        "earlier.claim_token != '3f2a9c1e5b7d4e6f8a0b1c2d3e4f5a6b'",
    ),
    "send: defer identify rows out of order (2/2)": ("id IN (CAST(3000000002 AS BIGINT))",),
    "send: defer group_identify rows out of order (1/2)": (
        "earlier.group_value = mine.group_value",
    ),
    "send: defer group_identify rows out of order (2/2)": ("id IN (CAST(3000000002 AS BIGINT))",),
    "send: load": MINE + ("ORDER BY dbo.amplitude_queue.id",),
    "acknowledge: all sent (1/2)": MINE + ("status='sent'",),
    "acknowledge: all sent (2/2)": ("INSERT INTO dbo.amplitude_queue_runs",),
    "acknowledge: sent, failed and retried (1/7)": MINE + ("status='sent'",),
    "acknowledge: sent, failed and retried (2/7)": MINE
    + ("CASE dbo.amplitude_queue.id WHEN CAST(3000000002 AS BIGINT) THEN N'rejected",),
    "acknowledge: sent, failed and retried (3/7)": MINE
    + (f"next_attempt_at={FOREVER}", "N'will retry: HTTP 503'"),
    "acknowledge: sent, failed and retried (4/7)": MINE
    + (f"next_attempt_at={FOREVER}", "attempts - 1"),
    "acknowledge: sent, failed and retried (5/7)": MINE + (f"next_attempt_at={FOREVER}",),
    "acknowledge: sent, failed and retried (6/7)": MINE + (f"next_attempt_at={FOREVER}",),
    "acknowledge: sent, failed and retried (7/7)": ("INSERT INTO dbo.amplitude_queue_runs",),
    "sweep: sweep (1/5)": CHUNK + ("status = 'in_flight'", "attempts >= 1000", "status='failed'"),
    "sweep: sweep (2/5)": CHUNK + ("status = 'in_flight'", "attempts < 1000", "status='pending'"),
    "sweep: sweep (3/5)": CHUNK + ("kind > 'identify'",),
    # AMPSYNC_MAX_AGE_SECONDS at its largest, 2,000,000 s: 23 days and 12,800 s
    "sweep: sweep (4/5)": CHUNK + ("DATEADD(second, -12800, DATEADD(day, -23, SYSUTCDATETIME()))",),
    "sweep: sweep (5/5)": NORMAL,
    "retry-failed: retry-failed --kind --class --since --until": (
        "UPDATE TOP (1000)",
        "SELECT @@ROWCOUNT AS n",
        "created_at >= '2026-11-28 09:00:00.123'",
    ),
    "retry-failed: retry-failed --ids": ("UPDATE TOP (1000)", "id IN (CAST(3000000001 AS BIGINT)"),
    "retry-failed: retry-failed: rows first tried over 7 days ago": (
        "DATEADD(day, -7, SYSUTCDATETIME())",
    ),
    "prune: prune (1/3)": CHUNK + ("DELETE TOP (1000) FROM dbo.amplitude_queue WHERE", LONG_AGO),
    "prune: prune (2/3)": CHUNK + ("DELETE TOP (1000) FROM dbo.amplitude_queue_runs", LONG_AGO),
    "prune: prune (3/3)": NORMAL,
    "history: record a sync": ("INSERT INTO dbo.amplitude_queue_runs",),
    "history: last runs (1/2)": ("task = 'sync'",),
    "history: last runs (2/2)": ("task = 'batch'", "run_id IN ('5e0c1a2b3c4d')"),
    "endpoint pause: read": ("endpoint = 'batch'",),
    "endpoint pause: read all": ("FROM dbo.amplitude_queue_endpoints",),
    "endpoint pause: record a failure (first) (1/2)": ("endpoint = 'batch'",),
    "endpoint pause: record a failure (first) (2/2)": (
        "INSERT INTO dbo.amplitude_queue_endpoints",
        FOREVER,
    ),
    "endpoint pause: record a failure (again) (1/2)": ("endpoint = 'batch'",),
    "endpoint pause: record a failure (again) (2/2)": ("endpoint = 'batch'", FOREVER),
    "endpoint pause: clear": ("endpoint = 'batch'", "failures > 0"),
    "status: rows by kind and status": ("GROUP BY",),
    "status: rows by status up to an id": ("id <= CAST(3000000003 AS BIGINT)",),
    "status: highest id": ("max(dbo.amplitude_queue.id)",),
    "status: oldest pending row (1/2)": ("min(dbo.amplitude_queue.created_at)",),
    "status: oldest pending row (2/2)": ("next_attempt_at > SYSUTCDATETIME()",),
    "status: commonest errors (1/2)": ("SELECT TOP 10",),
    "status: commonest errors (2/2)": ("SELECT TOP 5",),
    "status: users near the update limit": ("DATEADD(second, -3600, SYSUTCDATETIME())",),
    "status: failed rows": ("status = 'failed'",),
    "retry-failed: failed rows by class": (
        "status = 'failed'",
        "LIKE N'gave up after%'",
        "IN (CAST(3000000001 AS BIGINT))",
    ),
    "status: database time": ("SYSUTCDATETIME()",),
    "metrics: oldest pending row of each kind (1/2)": ("SELECT SYSUTCDATETIME()",),
    "metrics: oldest pending row of each kind (2/2)": (
        "status = 'pending' GROUP BY dbo.amplitude_queue.kind",
    ),
    "metrics: batches finished since (1/2)": ("SELECT SYSUTCDATETIME()",),
    "metrics: batches finished since (2/2)": (
        "finished_at >= '2026-11-28 09:00:00.123'",
        "task = 'batch'",
    ),
    **feed_cases(
        "pickups",
        "event",
        (
            "rv > CAST(CAST(3000000001 AS BIGINT) AS BINARY(8))",
            "rv < CAST(CAST(3000000900 AS BIGINT) AS BINARY(8))",
        ),
    ),
    **feed_cases(
        "pickups_proc",
        "event",
        (
            "DECLARE @ampsync_after BIGINT = 3000000001, @ampsync_before BIGINT = 3000000900",
            "@after = @ampsync_after",
        ),
    ),
    **feed_cases("crm", "identify", ("SELECT user_id, segment FROM crm_customers",)),
}


@pytest.fixture(scope="module")
def catalogue():
    from tasks.db import catalog

    largest = catalog.Values.largest()
    entries = catalog.statements(
        TABLES, catalog.dialect_for("mssql+pymssql://u:p@dwh/crm"), largest
    )
    return {f"{e.group}: {e.name}": e.sql for e in entries}


def test_every_statement_in_the_catalogue_has_its_case(catalogue):
    assert set(catalogue) - set(CASES) == set(), "statements without a case"
    assert set(CASES) - set(catalogue) == set(), "cases without a statement"


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_statement_is_what_sql_server_needs(catalogue, name):
    sql = catalogue[name]
    for part in CASES[name]:
        assert part in sql, (part, sql)
    check_rules(sql)


def test_the_catalogue_holds_at_the_default_settings_too():
    from tasks.db import catalog

    dialect = catalog.dialect_for("mssql+pymssql://u:p@dwh/crm")
    for entry in catalog.statements(TABLES, dialect, catalog.Values()):
        check_rules(entry.sql)


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://u@db/x", "mysql+pymysql://u@db/x", "sqlite:///x.db"]
)
def test_the_catalogue_renders_for_every_other_database_with_values_inlined(url):
    from tasks.db import catalog

    entries = catalog.statements(schema.define_tables("amplitude_queue"), catalog.dialect_for(url))
    assert len(entries) > 80
    assert not any("%(" in e.sql or "__[POSTCOMPILE" in e.sql for e in entries)
    assert not any("OUTPUT" in e.sql for e in entries)


# --- the points of the review, each against the functions the workers call -------------------


class Wire:
    """A connection that executes nothing: it keeps each statement as pymssql would put it on
    the wire and answers with `rows` (and `rowcount`, -1 as with NOCOUNT on)."""

    dialect = DIALECT

    def __init__(self, rows=(), rowcount: int = -1) -> None:
        self.rows, self.rowcount, self.sent = list(rows), rowcount, []

    def _result(self):
        outer = self

        class Result:
            rowcount = outer.rowcount
            returns_rows = True

            def __init__(self):
                self._rows = outer.rows

            def scalars(self):
                return [r[0] for r in self._rows]

            def scalar_one(self):
                return self._rows[0][0]

            def all(self):
                return list(self._rows)

            def first(self):
                return self._rows[0] if self._rows else None

        return Result()

    def execute(self, statement, params=None):
        if isinstance(params, list):  # executemany: the first row stands for all
            params = params[0]
        compiled = statement.compile(
            dialect=DIALECT,
            column_keys=sorted(params or {}) or None,
            compile_kwargs={"render_postcompile": True},
        )
        values = compiled.construct_params(params or {})
        self.sent.append(_mssql.substitute_params(compiled.string, values).decode())
        return self._result()

    def exec_driver_sql(self, sql, params=None):
        self.sent.append(_mssql.substitute_params(sql, dict(params or {})).decode())
        return self._result()

    @contextmanager
    def begin(self):
        yield self

    def invalidate(self):
        pass

    def in_transaction(self):
        return False


def test_point_1_every_dateadd_fits_int_at_the_largest_retention_and_waits():
    # prune at AMPSYNC_HISTORY_DAYS=30 (the default), any retention, max age, lease, backoff
    wire = Wire(rows=[(0,)], rowcount=0)
    queue.prune(wire, TABLES, sent_days=36500, history_days=30)
    queue.sweep(wire, TABLES, max_attempts=12, max_age_seconds=2_000_000)
    for seconds in (0.2, 300, 3000, 1e9, float("inf")):
        wire.execute(queue.renew_statement(TABLES, TOKEN, seconds))
    sent = "\n".join(wire.sent)
    numbers = dateadd_arguments(sent)
    assert len(numbers) >= 8
    for number in numbers:
        assert re.fullmatch(r"-?\d+", number) and abs(int(number)) <= INT_MAX, number
    assert "DATEADD(day, -30, SYSUTCDATETIME())" in sent
    assert "DATEADD(millisecond, 200, SYSUTCDATETIME())" in sent  # sub-second backoff kept


def test_point_2_no_varchar_column_meets_an_nvarchar_literal_in_what_a_send_sends():
    wire = Wire(rows=[], rowcount=0)
    queue.load(wire, TABLES, TOKEN)
    queue.renew(wire, TABLES, TOKEN, 300)
    queue.count_rerun(wire, TABLES, TOKEN, 12)
    queue.defer_out_of_order(wire, TABLES, "identify", TOKEN)
    ack = queue.Acknowledgement(
        sent=[1], failed={2: "invalid row: x"}, retry={(1.0, True, "r"): [3]}
    )
    queue.acknowledge(wire, TABLES, TOKEN, ack)
    from tasks.db import endpoints, history

    endpoints.read(wire, TABLES, "batch")
    endpoints.clear_failures(wire, TABLES, "batch")
    history.last_runs(wire, TABLES)
    assert len(wire.sent) >= 9
    for sql in wire.sent:
        for tree in parts(sql):
            assert not nvarchar_compared_with_varchar(tree), sql
    assert f"claim_token = '{TOKEN}'" in wire.sent[0]


def test_point_3_a_rowversion_bound_above_two_to_the_31_reaches_sql_server_as_the_counter():
    feed = feeds_example("rowversion")
    statement = feeds.source_statement(feed, DIALECT)
    compiled = statement.compile(dialect=DIALECT)
    sent = _mssql.substitute_params(
        compiled.string,
        compiled.construct_params({"after": 3_000_000_001, "before": 3_000_000_900}),
    ).decode()
    assert "CAST(CAST(3000000001 AS BIGINT) AS BINARY(8))" in sent
    assert not decimal_literals(sent)
    parts(sent)


def test_point_4_the_claim_is_one_locked_table_reference_updated_through_a_cte():
    for kind in ("identify", "event", "group_identify"):
        wire = Wire(rows=[(3_000_000_001,)])
        claim = queue.claim(wire, TABLES, kind, 2000, 300)
        (sql,) = wire.sent
        assert claim.rows == 1
        assert re.search(r"WITH c AS \(\nSELECT TOP 2000 candidate\.id", sql)
        assert "FROM dbo.amplitude_queue AS candidate WITH (ROWLOCK, UPDLOCK, READPAST)" in sql
        # through the CTE that keeps the locked rows within the byte budget (issue 15)
        assert "UPDATE b SET status = 'in_flight'" in sql
        assert re.search(r"\),\nb AS \(\nSELECT c\.id, .*\sFROM c\n\)", sql, re.S)
        assert "UPDATE dbo.amplitude_queue" not in sql  # no second, unhinted reference
        check_rules(sql)


def test_point_5_the_sweep_runs_at_low_deadlock_priority_with_a_lock_timeout_then_resets():
    wire = Wire(rows=[(0,)], rowcount=0)
    queue.sweep(wire, TABLES, max_attempts=12, max_age_seconds=600)
    assert all(
        s.startswith("SET DEADLOCK_PRIORITY LOW; SET LOCK_TIMEOUT 2000;") for s in wire.sent[:-1]
    )
    assert wire.sent[-1] == "SET DEADLOCK_PRIORITY NORMAL; SET LOCK_TIMEOUT -1"


def test_point_6_statements_that_can_touch_many_rows_go_1000_at_a_time():
    wire = Wire(rows=[(0,)], rowcount=0)
    queue.sweep(wire, TABLES, max_attempts=12, max_age_seconds=600)
    queue.retry_failed(wire, TABLES, kind="event")
    queue.prune(wire, TABLES, sent_days=7, history_days=30)
    changes = [s for s in wire.sent if re.search(r"\b(UPDATE|DELETE)\b", s)]
    assert len(changes) == 7
    for sql in changes:
        assert re.search(r"\b(UPDATE|DELETE) TOP \(1000\) ", sql), sql
        assert sql.endswith("SELECT @@ROWCOUNT AS n")


def test_point_7_output_only_into_a_table_variable():
    wire = Wire(rows=[(7,)])
    queue.claim(wire, TABLES, "event", 100, 300)
    assert not outputs_without_into(wire.sent[0]), wire.sent[0]
    queue.acknowledge(
        wire, TABLES, TOKEN, queue.Acknowledgement([1], {}, {}, all_sent=True), history=RUN
    )
    feeds.enqueue(wire, feeds.FeedTables.of(TABLES), [{"kind": "event", "user_id": "u1"}])
    assert len(wire.sent) == 4
    for sql in wire.sent:
        assert not outputs_without_into(sql), sql
    assert "OUTPUT inserted.id INTO @ids" in wire.sent[0]


def test_point_8_the_per_key_indexes_include_what_the_order_probe_reads():
    ddl = setup.compile_ddl(setup.create_ddl(TABLES), DIALECT)
    for key in ("user_id, kind, id", "device_id, kind, id", "group_type, group_value, kind, id"):
        assert re.search(rf"\({key}\) INCLUDE \(status, next_attempt_at\)", ddl), key


def test_point_9_feed_entities_are_compared_in_a_binary_collation():
    ddl = setup.compile_ddl(setup.create_ddl(TABLES), DIALECT)
    assert "entity NVARCHAR(300) COLLATE Latin1_General_BIN2 NOT NULL" in ddl
    # the behaviour, on MariaDB's case-insensitive default collation:
    # tests/integration/test_chunks_and_retries.py


def test_point_10_a_feed_takes_its_turn_without_the_drivers_rowcount():
    # NOCOUNT on: the driver's rowcount is -1; the server's @@ROWCOUNT, in the same batch, is 1
    wire = Wire(rows=[(1,)], rowcount=-1)
    assert feeds.take_turn(wire, feeds.FeedTables.of(TABLES), "crm", 7) is True
    assert wire.sent[0].endswith(";\nSELECT @@ROWCOUNT AS n")
    refused = Wire(rows=[(0,)], rowcount=-1)
    assert feeds.take_turn(refused, feeds.FeedTables.of(TABLES), "crm", 7) is False


def test_point_11_init_db_qualifies_names_with_dbo_and_takes_an_application_lock(monkeypatch):
    from tasks import settings

    monkeypatch.setenv("AMPSYNC_DATABASE_URL", "mssql+pymssql://sa:pw@dwh/crm")
    monkeypatch.setenv("AMPSYNC_QUEUE_TABLE", "amplitude_queue")
    s = settings.load()
    ddl = setup.compile_ddl(setup.create_ddl(schema.define_tables(s.queue_table)), DIALECT)
    assert ddl.startswith("CREATE TABLE dbo.amplitude_queue (")
    assert "CREATE INDEX ix_amplitude_queue_claim ON dbo.amplitude_queue" in ddl
    lock = setup.applock_sql(schema.define_tables(s.queue_table))
    assert "EXEC @lock = sp_getapplock @Resource = N'ampsync init-db dbo.amplitude_queue'" in lock
    assert "@LockOwner = 'Transaction'" in lock and "IF @lock < 0 THROW" in lock
    # the large-table warning runs on real databases: test_chunks_and_retries.py


def test_point_12_sql_server_through_pyodbc_is_refused_at_settings_validation(monkeypatch):
    from tasks import settings

    monkeypatch.setenv("AMPSYNC_DATABASE_URL", "mssql+pyodbc://sa:pw@dwh/crm?driver=ODBC+Driver+18")
    with pytest.raises(settings.SettingsError) as refused:
        settings.load()
    assert "mssql+pymssql://" in str(refused.value)
    assert len(str(refused.value).splitlines()) == 1


def test_point_13_a_query_sql_server_refuses_wrapped_fails_first_saying_what_to_change():
    from sqlalchemy import create_engine

    from tasks.feeds import FeedError
    from tasks.feeds.source import Cursor, read_source

    feed = feeds_example("rowversion", query="SELECT order_id, rv FROM dbo.pickups ORDER BY rv")
    unreachable = create_engine("mssql+pymssql://u:p@127.0.0.1:1/crm")
    with pytest.raises(FeedError) as failed:
        read_source(feed, unreachable, Cursor.from_row(None, None))
    assert "ORDER BY" in str(failed.value) and "remove it" in str(failed.value)


# --- helpers -----------------------------------------------------------------------------------

RUN = {
    "run_id": "5e0c1a2b3c4d",
    "task": "batch",
    "kind": "event",
    "claim_token": TOKEN,
    "started_at": datetime(2026, 11, 28, 9, 0),
}


def feeds_example(mode: str, query: str = "SELECT order_id, rv FROM dbo.pickups"):
    from tasks.feeds.config import Feed

    fields = set(Feed.__dataclass_fields__)
    values = dict(
        name="pickups",
        kind="event",
        query=query,
        procedure=None,
        params={},
        cursor="rv",
        cursor_mode=mode,
        source_url="mssql+pymssql://u:p@127.0.0.1:1/crm",
    )
    try:
        return Feed(**{k: v for k, v in values.items() if k in fields})
    except TypeError:
        import types

        return types.SimpleNamespace(**values, where=lambda key=None: f"feed pickups: {key}")


def test_ampsync_statements_prints_the_catalogue_without_a_reachable_server(tmp_path):

    from support import CLEAN_ENV, run_cli

    # given a SQL Server URL this machine cannot reach, and no feeds file
    env = {**CLEAN_ENV, "AMPSYNC_DATABASE_URL": "mssql+pymssql://sa:Secret1@127.0.0.1:1/dwh"}
    # when the statements are asked for
    result = run_cli("statements", env=env, cwd=tmp_path)
    # then every statement is printed as pymssql sends it, grouped, the password masked
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Secret1" not in out and "mssql+pymssql://sa:***@127.0.0.1:1/dwh" in out
    for group in ("claim", "send", "acknowledge", "sweep", "retry-failed", "prune", "history"):
        assert f"-- ==== {group} " in out
    assert "queue table dbo.amplitude_queue" in out
    batches = [b for b in out.split("\nGO\n") if b.strip()]
    assert len(batches) > 80
    for batch in batches:
        sql = "\n".join(line for line in batch.splitlines() if not line.startswith("--"))
        if sql.strip():
            check_rules(sql.strip())
