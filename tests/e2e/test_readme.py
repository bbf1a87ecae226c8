"""The README as a user's manual: its SQL Server examples parse as T-SQL, and PostgreSQL and
SQLite equivalents of each `INSERT … SELECT` (written here, producing the same rows) go through
the real pipeline and arrive as the README says. Also the Python-shell sync exactly as the
README types it, and the settings and error messages it quotes.

No SQL Server runs here: the T-SQL is only parsed (README, "Checked only by parsing T-SQL").
What an example produces is compared with the example itself — its target columns, its literal
values, the keys its `FOR JSON PATH` subqueries name — so an equivalent that drifted from the
README fails.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import sqlglot
from sqlalchemy import text
from sqlglot import exp
from sqlglot.errors import ErrorLevel
from support import ROOT, Stack, identify

from tasks import broker, outcomes
from tasks.settings import Settings

README = (ROOT / "README.md").read_text()
USER_COLUMNS = (
    "kind",
    "user_id",
    "device_id",
    "event_type",
    "event_time",
    "insert_id",
    "group_type",
    "group_value",
    "properties",
    "extra",
)


def sql_blocks() -> list[tuple[str | None, str]]:
    """Every ```sql block of the README, with the name of its `<!-- example: … -->` marker."""
    pattern = r"(?:<!-- example: ([\w-]+) -->\n)?```sql\n(.*?)```"
    return [(name or None, body) for name, body in re.findall(pattern, README, re.S)]


def parse_tsql(sql: str) -> list[exp.Expression]:
    trees = sqlglot.parse(sql, read="tsql", error_level=ErrorLevel.RAISE)
    # sqlglot falls back to an opaque Command for what it cannot parse: not good enough here
    commands = [n.sql() for t in trees for n in t.walk() if isinstance(n, exp.Command)]
    assert not commands, commands
    return trees


def example(name: str) -> exp.Insert:
    """The one INSERT INTO amplitude_queue of the named README example."""
    body = dict((n, b) for n, b in sql_blocks() if n)[name]
    inserts = [i for t in parse_tsql(body) for i in t.find_all(exp.Insert)]
    assert len(inserts) == 1 and inserts[0].this.this.name == "amplitude_queue", name
    return inserts[0]


def shape(insert: exp.Insert) -> dict[str, tuple[str, object]]:
    """Column → ("literal", value) | ("json", key paths) | ("expression", sql), per the
    README's SELECT list; `FOR JSON PATH` nests dotted aliases and drops NULL columns."""
    columns = [c.name for c in insert.this.expressions]
    values = insert.expression.expressions
    assert len(columns) == len(values)
    described: dict[str, tuple[str, object]] = {}
    for column, value in zip(columns, values, strict=True):
        if isinstance(value, exp.National) or isinstance(value, exp.Literal) and value.is_string:
            described[column] = ("literal", value.this)
        elif isinstance(value, exp.Subquery) and value.this.args.get("for_"):
            described[column] = ("json", {p.alias_or_name for p in value.this.expressions})
        else:
            described[column] = ("expression", value.sql("tsql"))
    return described


def key_paths(obj: dict, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in obj.items():
        if isinstance(value, dict) and value and key.startswith("$"):
            paths |= key_paths(value, f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths


def assert_rows_match_example(name: str, rows: list[dict]) -> None:
    """The rows an equivalent wrote are rows the README example would write."""
    described = shape(example(name))
    assert rows, name
    for column in USER_COLUMNS:
        if column not in described:
            assert {r[column] for r in rows} == {None}, (name, column)
    for column, (how, value) in described.items():
        written = [r[column] for r in rows]
        if how == "literal":
            parsed = [json.loads(w) for w in written] if value.startswith("{") else written
            assert parsed == [json.loads(value) if value.startswith("{") else value] * len(rows)
        elif how == "json":
            keys = [key_paths(json.loads(w)) for w in written]
            # each row names only the example's keys; NULL columns are left out, so only all
            # rows together name them all
            assert all(k <= value for k in keys), (name, column, keys, value)
            assert set().union(*keys) == value, (name, column)


def run_sql(stack: Stack, sql: str, **tables: str) -> list[dict]:
    """Run an equivalent (tables named `<name>` are filled in); returns the queue rows it wrote."""
    for placeholder, table in {"queue": stack.table, **tables}.items():
        sql = sql.replace(f"<{placeholder}>", table)
    before = max(stack.rows(), default=0)
    if stack.engine.dialect.name == "postgresql":
        # outside a transaction, so that a DO block may COMMIT per chunk
        with stack.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(sql)
    else:
        with stack.engine.begin() as conn:
            conn.exec_driver_sql(sql)
    return [row for row_id, row in stack.rows().items() if row_id > before]


# --- the T-SQL ---------------------------------------------------------------------------------


def test_every_sql_block_of_the_readme_parses_as_t_sql():
    blocks = sql_blocks()
    assert len(blocks) >= 6
    for name, body in blocks:
        assert parse_tsql(body), name


def test_every_insert_example_has_an_equivalent_run_below():
    named = {n for n, body in sql_blocks() if n and "INSERT INTO amplitude_queue" in body}
    unnamed = [b for n, b in sql_blocks() if not n and "INSERT INTO amplitude_queue" in b]
    assert not unnamed, "mark each INSERT example with <!-- example: name -->"
    assert named == set(PG) | set(SQLITE) == set(PG)


# --- PostgreSQL and SQLite equivalents -----------------------------------------------------------

PG = {
    "identify-crm": """
        INSERT INTO <queue> (kind, user_id, properties)
        SELECT 'identify', c.user_id,
               json_strip_nulls(json_build_object('CRM_Segment', c.segment, 'CRM_Group', c.grp,
                                                  'CRM_Level', c.level))::text
        FROM <customers> AS c""",
    "identify-unset": """
        INSERT INTO <queue> (kind, user_id, properties)
        SELECT 'identify', c.user_id, '{"$unset": {"CRM_Level": "-"}}'
        FROM <customers> AS c
        WHERE c.level IS NULL AND c.left_loyalty_programme = 1""",
    "event-order-picked-up": """
        INSERT INTO <queue> (kind, user_id, event_type, event_time, insert_id, properties, extra)
        SELECT 'event', o.customer_id, 'Order Picked Up',
               (o.picked_up_at AT TIME ZONE 'Europe/Moscow') AT TIME ZONE 'UTC',
               CONCAT('order-picked-up-', o.order_id),
               json_strip_nulls(json_build_object('order_id', o.order_id,
                                                  'store', o.store_code))::text,
               json_strip_nulls(json_build_object('revenue', o.total, 'platform', 'Store'))::text
        FROM <orders> AS o
        WHERE o.picked_up_at >= CURRENT_DATE - 1 AND o.picked_up_at < CURRENT_DATE""",
    "group-identify": """
        INSERT INTO <queue> (kind, group_type, group_value, properties)
        SELECT 'group_identify', 'company', a.company_name,
               json_strip_nulls(json_build_object('plan', a.tariff, 'seats', a.seats))::text
        FROM <accounts> AS a""",
    # PL/pgSQL may COMMIT inside a DO block run outside a transaction: one per chunk
    "identify-chunked": """
        DO $$
        DECLARE last_key BIGINT := 0; next_key BIGINT := 0;
        BEGIN
            WHILE next_key IS NOT NULL LOOP
                next_key := (SELECT MAX(chunk.customer_key)
                             FROM (SELECT c.customer_key FROM <customers> AS c
                                   WHERE c.customer_key > last_key
                                   ORDER BY c.customer_key LIMIT 4000) AS chunk);
                INSERT INTO <queue> (kind, user_id, properties)
                SELECT 'identify', c.user_id,
                       json_strip_nulls(json_build_object('CRM_Segment', c.segment,
                                                          'CRM_Group', c.grp,
                                                          'CRM_Level', c.level))::text
                FROM <customers> AS c
                WHERE c.customer_key > last_key AND c.customer_key <= next_key;
                COMMIT;
                last_key := next_key;
            END LOOP;
        END $$""",
}
SQLITE = {
    # json_patch drops members whose value is null, as FOR JSON drops NULL columns
    "identify-crm": """
        INSERT INTO <queue> (kind, user_id, properties)
        SELECT 'identify', c.user_id,
               json_patch('{}', json_object('CRM_Segment', c.segment, 'CRM_Group', c.grp,
                                            'CRM_Level', c.level))
        FROM <customers> AS c""",
    # SQLite has no time zones; Moscow has been UTC+3 all year since 2014
    "event-order-picked-up": """
        INSERT INTO <queue> (kind, user_id, event_type, event_time, insert_id, properties, extra)
        SELECT 'event', o.customer_id, 'Order Picked Up',
               datetime(o.picked_up_at, '-3 hours'),
               'order-picked-up-' || o.order_id,
               json_patch('{}', json_object('order_id', o.order_id, 'store', o.store_code)),
               json_patch('{}', json_object('revenue', o.total, 'platform', 'Store'))
        FROM <orders> AS o
        WHERE o.picked_up_at >= date('now', '-1 day') AND o.picked_up_at < date('now')""",
}

CUSTOMERS = [  # customer_key, user_id, segment, grp, level, left_loyalty_programme
    (1, "crm-00001", "gold", "b2b", 3, 0),
    (2, "crm-00002", "silver", "retail", None, 1),
    (3, "crm-00003", "bronze", None, 1, 0),
]


def make_sources(stack: Stack, today: datetime) -> dict[str, str]:
    """The CRM and sales tables the examples read, beside the queue table."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "customers": f"crm_customers_{suffix}",
        "orders": f"sales_orders_{suffix}",
        "accounts": f"crm_accounts_{suffix}",
    }
    yesterday = today - timedelta(days=1)
    orders = [  # order_id, customer_id, store_code, total, picked_up_at (Moscow local time)
        (1001, "crm-00001", "A", 25.5, yesterday.replace(hour=12, minute=30)),
        (1002, "crm-00003", None, 10, yesterday.replace(hour=23, minute=59)),
        (1003, "crm-00002", "B", 5, today.replace(hour=0, minute=10)),  # today: not yet
        (1004, "crm-00002", "B", 7, (yesterday - timedelta(days=1)).replace(hour=23)),
    ]
    with stack.engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE {names['customers']} (customer_key BIGINT, "
                "user_id VARCHAR(64), segment VARCHAR(32), grp VARCHAR(32), "
                "level INTEGER, left_loyalty_programme INTEGER)"
            )
        )
        conn.execute(
            text(
                f"CREATE TABLE {names['orders']} (order_id BIGINT, customer_id "
                "VARCHAR(64), store_code VARCHAR(8), total NUMERIC(10, 2), "
                "picked_up_at TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                f"CREATE TABLE {names['accounts']} (company_name VARCHAR(64), "
                "tariff VARCHAR(32), seats INTEGER)"
            )
        )
        conn.execute(
            text(f"INSERT INTO {names['customers']} VALUES (:k, :u, :s, :g, :l, :x)"),
            [dict(zip("kusglx", c, strict=True)) for c in CUSTOMERS],
        )
        conn.execute(
            text(f"INSERT INTO {names['orders']} VALUES (:o, :c, :s, :t, :p)"),
            [dict(zip("ocstp", o, strict=True)) for o in orders],
        )
        conn.execute(
            text(f"INSERT INTO {names['accounts']} VALUES (:n, :t, :s)"),
            [{"n": "Acme Ltd", "t": "enterprise", "s": 40}, {"n": "Tiny LLC", "t": None, "s": 3}],
        )
    return names


def drop_sources(stack: Stack, names: dict[str, str]) -> None:
    with stack.engine.begin() as conn:
        for table in names.values():
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))


def utc_ms(moscow_local: datetime) -> int:
    return int((moscow_local - timedelta(hours=3)).replace(tzinfo=UTC).timestamp() * 1000)


def orders_arrived(stack: Stack, today: datetime) -> None:
    """Yesterday's two orders arrived once each, at their UTC time, with revenue; the order
    inserted twice was dropped as a duplicate."""
    yesterday = today - timedelta(days=1)
    state = stack.state()
    orders = sorted(
        (e for e in state["events"] if e["event_type"] == "Order Picked Up"),
        key=lambda e: e["insert_id"],
    )
    assert [
        (
            e["user_id"],
            e["insert_id"],
            e["time"],
            e["event_properties"],
            e["revenue"],
            e["platform"],
        )
        for e in orders
    ] == [
        (
            "crm-00001",
            "order-picked-up-1001",
            utc_ms(yesterday.replace(hour=12, minute=30)),
            {"order_id": 1001, "store": "A"},
            25.5,
            "Store",
        ),
        (
            "crm-00003",
            "order-picked-up-1002",
            utc_ms(yesterday.replace(hour=23, minute=59)),
            {"order_id": 1002},
            10,
            "Store",
        ),
    ]


def test_the_postgresql_equivalents_deliver_what_the_readme_says(pg):
    today = datetime.combine(
        pg.engine.connect().execute(text("SELECT CURRENT_DATE")).scalar_one(), datetime.min.time()
    )
    names = make_sources(pg, today)
    try:
        # given crm-00002 already has a level in Amplitude
        pg.insert([identify("crm-00002", {"CRM_Level": 4})])
        pg.drain()
        # when the CRM identify runs; then it writes the rows the example writes
        assert_rows_match_example("identify-crm", run_sql(pg, PG["identify-crm"], **names))
        assert pg.drain() == {"sent": 4}
        users = pg.state()["users"]
        assert {
            u: users[u]["user_properties"] for u in ("crm-00001", "crm-00002", "crm-00003")
        } == {
            "crm-00001": {"CRM_Segment": "gold", "CRM_Group": "b2b", "CRM_Level": 3},
            # NULL leaves a property as it is
            "crm-00002": {"CRM_Segment": "silver", "CRM_Group": "retail", "CRM_Level": 4},
            "crm-00003": {"CRM_Segment": "bronze", "CRM_Level": 1},
        }
        # when $unset runs for those who left the programme; then their level is gone
        assert_rows_match_example("identify-unset", run_sql(pg, PG["identify-unset"], **names))
        pg.drain()
        props = pg.state()["users"]["crm-00002"]["user_properties"]
        assert props == {"CRM_Segment": "silver", "CRM_Group": "retail"}

        # when yesterday's orders are loaded, twice by mistake
        first = run_sql(pg, PG["event-order-picked-up"], **names)
        assert_rows_match_example("event-order-picked-up", first)
        run_sql(pg, PG["event-order-picked-up"], **names)
        assert len(first) == 2 and pg.drain().get("failed") is None
        # then each order arrived once, at its UTC time
        orders_arrived(pg, today)

        # when the groups are loaded; then NULL columns are left out there too
        assert_rows_match_example("group-identify", run_sql(pg, PG["group-identify"], **names))
        pg.drain()
        assert pg.state()["groups"]["company"] == {
            "Acme Ltd": {"plan": "enterprise", "seats": 40},
            "Tiny LLC": {"seats": 3},
        }
    finally:
        drop_sources(pg, names)


def test_the_chunked_load_commits_4000_rows_per_transaction_and_all_arrive(pg):
    # given 9000 customers in the CRM
    names = make_sources(pg, datetime(2026, 1, 2))
    with pg.engine.begin() as conn:
        conn.execute(text(f"DELETE FROM {names['customers']}"))
        conn.execute(
            text(
                f"INSERT INTO {names['customers']} SELECT n, 'big-' || lpad(n::text, 5, '0'), "
                "(ARRAY['gold', 'silver', 'bronze'])[1 + n % 3], 'b2b', n % 5, 0 "
                "FROM generate_series(1, 9000) AS n"
            )
        )
    try:
        # when the chunked load runs
        rows = run_sql(pg, PG["identify-chunked"], **names)
        assert_rows_match_example("identify-chunked", rows)
        # then it committed 4000 rows per transaction (PostgreSQL stamps each row with its
        # transaction id, xmin)
        with pg.engine.connect() as conn:
            sizes = conn.execute(text(f"SELECT COUNT(*) FROM {pg.table} GROUP BY xmin")).scalars()
            assert sorted(sizes) == [1000, 4000, 4000]
        # and every row is delivered (statistics first, as autovacuum gathers them within a
        # minute of a load: without any, PostgreSQL plans the claim's same-user check as a
        # scan of every row per candidate, seconds per claim of 2000 on a table this size)
        with pg.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"ANALYZE {pg.table}")
        assert pg.drain(timeout=90) == {"sent": 9000}
        users = pg.state()["users"]
        assert users["big-09000"]["user_properties"] == {
            "CRM_Segment": "gold",
            "CRM_Group": "b2b",
            "CRM_Level": 0,
        }
        assert sum(u.startswith("big-") for u in users) == 9000
    finally:
        drop_sources(pg, names)


# --- the Python shell ----------------------------------------------------------------------------

SHELL = (
    """python -c "from tasks import sync; print(sync.delay(kind='identify').get(timeout=60))\""""
)


def test_a_manual_sync_from_a_python_shell_prints_its_summary(pg):
    # given the one-liner the README gives, and rows loaded by hand
    assert SHELL in README
    pg.insert([identify(f"user-{n:05d}", {"CRM_Segment": "gold"}) for n in range(3)])
    # when it is run as a user runs it, with the workers' settings
    code = re.search(r'-c "(.*)"', SHELL).group(1)
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **pg.env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    # then it prints the sync's summary: what it claimed and handed to the workers
    assert done.returncode == 0, done.stderr
    summary = ast.literal_eval(done.stdout.strip())
    assert summary["rows_claimed"] == 3 and summary["by_kind"] == {"identify": 3}
    assert summary["batches_enqueued"] == 1 and summary["paused"] == {}
    assert re.fullmatch(r"[0-9a-f]{12}", summary["run_id"])
    # and the README shows a summary with the same fields
    shown = re.search(r"^\{'run_id'.*\}$", README, re.M).group(0)
    assert set(ast.literal_eval(shown)) == set(summary)
    assert pg.drain() == {"sent": 3}


def test_the_sqlite_equivalents_deliver_what_the_readme_says(make_stack, tmp_path):
    stack = make_stack(f"sqlite:///{tmp_path / 'queue.db'}")
    stack.start_worker()
    with stack.engine.connect() as conn:
        today = datetime.fromisoformat(conn.execute(text("SELECT date('now')")).scalar_one())
    names = make_sources(stack, today)
    # when the identify and the orders run (the orders twice)
    assert_rows_match_example("identify-crm", run_sql(stack, SQLITE["identify-crm"], **names))
    orders = run_sql(stack, SQLITE["event-order-picked-up"], **names)
    assert_rows_match_example("event-order-picked-up", orders)
    run_sql(stack, SQLITE["event-order-picked-up"], **names)
    # then everything is delivered, as on PostgreSQL
    assert stack.drain() == {"sent": 7}
    users = stack.state()["users"]
    assert users["crm-00002"]["user_properties"] == {"CRM_Segment": "silver", "CRM_Group": "retail"}
    orders_arrived(stack, today)


# --- settings and error messages -------------------------------------------------------------------


def test_the_settings_table_lists_every_setting():
    section = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_0-9]+)`(?: / `([A-Z_0-9]+)`)?", section, re.M))
    names = {n for pair in documented for n in pair if n}
    assert names == {f.alias for f in Settings.model_fields.values()}


def test_troubleshooting_quotes_the_messages_ampsync_writes():
    section = README.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    # the failure classes that open every last_error
    for prefix in (outcomes.INVALID, outcomes.REJECTED, outcomes.GAVE_UP, outcomes.RETRYING):
        assert f"**`{prefix}" in section, prefix
    # the messages that stop a process, as ampsync words them
    assert broker.NO_BROKER.split(":")[0] in section
    assert "Amplitude rejected the API key: check AMPLITUDE_API_KEY and AMPLITUDE_REGION" in section
    assert "AMPLITUDE_API_KEY is not set" in section
    assert "AMPSYNC_DATABASE_URL: cannot reach the database at" in section
    assert "CELERY_BROKER_URL: cannot reach Redis at" in section
