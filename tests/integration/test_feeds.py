"""Feeds: a SQL query or stored procedure → queue rows, sending only what changed.

Sources are real tables in real databases (SQLite, PostgreSQL, MariaDB); runs are in-process
(`ampsync feed run` runs the same code); delivery through a real worker is
tests/e2e/test_feed_delivery.py. SQL Server statements are compiled with the mssql dialect and
parsed as T-SQL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest
import sqlglot
from sqlalchemy import select, text
from sqlalchemy.dialects import mssql
from support import MARIADB_URL, PG_URL, ROOT
from support.feeds import USERS, Crm, Feeds, by_user, crm_config, props

import beat_schedule
from tasks import feeds
from tasks.amplitude import payloads
from tasks.db import engine as db_engine
from tasks.db import schema, setup
from tasks.settings import Settings, SettingsError


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def stack(request, make_stack, tmp_path):
    """A queue table on each database; the CRM table sits in the same database."""
    url = {
        "sqlite": f"sqlite:///{tmp_path}/ampsync.db",
        "postgresql": PG_URL,
        "mariadb": MARIADB_URL,
    }[request.param]
    return make_stack(url)


@pytest.fixture
def crm(stack):
    table = Crm(stack.engine)
    yield table
    table.drop()


# --- identify: only what changed ---------------------------------------------------------------


def test_a_first_run_enqueues_every_id_and_a_rerun_without_change_enqueues_none(
    stack, crm, tmp_path
):
    # given three CRM users, one without a group
    crm.put(USERS)
    f = Feeds(stack, tmp_path, crm_config(crm.name))
    # when the feed runs for the first time
    first = f.run()
    # then every id is enqueued once, with every mapped property (NULL → $unset by default)
    assert first.rows_read == 3 and first.rows_enqueued == 3
    assert [r["kind"] for r in f.enqueued(first)] == ["identify"] * 3  # no marker events unasked
    assert by_user(f.enqueued(first)) == {
        "user-00001": {"$set": {"CRM_Segment": "gold", "CRM_Group": "b2b", "CRM_Level": 3}},
        "user-00002": {"$set": {"CRM_Segment": "silver", "CRM_Group": "retail", "CRM_Level": 1}},
        "user-00003": {
            "$set": {"CRM_Segment": "bronze", "CRM_Level": 2},
            "$unset": {"CRM_Group": "-"},
        },
    }
    # when it runs again with nothing changed (its rows are still pending: on their way)
    again = f.run()
    # then nothing is enqueued
    assert again.rows_read == 3 and again.rows_enqueued == 0
    assert stack.counts() == {"pending": 3}


def test_changing_one_users_segment_enqueues_exactly_one_row_with_exactly_that_property(
    stack, crm, tmp_path
):
    # given a feed that has run
    crm.put(USERS)
    f = Feeds(stack, tmp_path, crm_config(crm.name))
    f.run()
    # when one user's segment changes in the CRM
    crm.set("user-00002", segment="gold")
    result = f.run()
    # then one row goes, for that user, with only the segment
    rows = f.enqueued(result)
    assert [(r["kind"], r["user_id"], props(r)) for r in rows] == [
        ("identify", "user-00002", {"$set": {"CRM_Segment": "gold"}})
    ]


def test_all_changes_of_one_id_travel_in_one_row(stack, crm, tmp_path):
    crm.put(USERS)
    f = Feeds(stack, tmp_path, crm_config(crm.name))
    f.run()
    # when two properties of one user change between runs
    crm.set("user-00001", segment="platinum", level=4)
    rows = f.enqueued(f.run())
    # then one row carries both
    assert by_user(rows) == {"user-00001": {"$set": {"CRM_Segment": "platinum", "CRM_Level": 4}}}


@pytest.mark.parametrize(
    ("null", "first", "group_set", "group_cleared"),
    [
        # NULL means "no value": it is unset in Amplitude, and unset again after a value.
        (
            "unset",
            {"$set": {"CRM_Segment": "bronze", "CRM_Level": 2}, "$unset": {"CRM_Group": "-"}},
            {"$set": {"CRM_Group": "vip"}},
            {"$unset": {"CRM_Group": "-"}},
        ),
        # NULL means "no news": the property is left as Amplitude has it.
        (
            "skip",
            {"$set": {"CRM_Segment": "bronze", "CRM_Level": 2}},
            {"$set": {"CRM_Group": "vip"}},
            None,
        ),
    ],
)
def test_a_null_column_is_unset_or_skipped_as_the_feed_says(
    stack, crm, tmp_path, null, first, group_set, group_cleared
):
    # given a user whose group is NULL
    crm.put({"user-00003": USERS["user-00003"]})
    f = Feeds(stack, tmp_path, crm_config(crm.name, null=null))
    # then the first run treats the NULL as the setting says
    assert by_user(f.enqueued(f.run())) == {"user-00003": first}
    # when the group gets a value, it is set
    crm.set("user-00003", grp="vip")
    assert by_user(f.enqueued(f.run())) == {"user-00003": group_set}
    # when it goes back to NULL, it is unset — or left alone
    crm.set("user-00003", grp=None)
    cleared = f.run()
    assert by_user(f.enqueued(cleared)) == ({"user-00003": group_cleared} if group_cleared else {})
    # and a rerun changes nothing either way
    assert f.run().rows_enqueued == 0


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("deleted", "expected"),
    [
        ("keep", {}),
        (
            "unset",
            {"user-00002": {"$unset": {"CRM_Segment": "-", "CRM_Group": "-", "CRM_Level": "-"}}},
        ),
    ],
)
def test_an_id_gone_from_the_result_is_unset_or_left_alone_by_setting(
    stack, crm, tmp_path, deleted, expected
):
    crm.put(USERS)
    f = Feeds(stack, tmp_path, crm_config(crm.name, deleted=deleted))
    f.run()
    # when a user disappears from the query's result
    crm.remove("user-00002")
    # then its properties are unset only when the feed says deleted = "unset"
    assert by_user(f.enqueued(f.run())) == expected
    # and only once
    assert f.run().rows_enqueued == 0


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_an_empty_result_never_unsets_everyone(stack, crm, tmp_path):
    # given a feed that unsets deleted ids
    crm.put(USERS)
    f = Feeds(stack, tmp_path, crm_config(crm.name, deleted="unset"))
    f.run()
    # when the source suddenly returns nothing (a broken ETL, an empty staging table)
    crm.remove(*USERS)
    result = f.run()
    # then nothing is unset, and the run says why
    assert result.rows_enqueued == 0
    assert "not unsetting the properties of 3 ids" in result.note


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_marker_event_goes_with_each_changed_identify_only_when_configured(stack, crm, tmp_path):
    crm.put(USERS)
    f = Feeds(stack, tmp_path, crm_config(crm.name, more='marker_event = "CRM Updated"'))
    f.run()
    # when one user's level changes
    crm.set("user-00001", level=5)
    rows = f.enqueued(f.run())
    # then the identify goes with a "CRM Updated" event carrying the new value as user
    # properties, so charts show it at once
    identify, marker = rows
    assert (identify["kind"], props(identify)) == ("identify", {"$set": {"CRM_Level": 5}})
    assert (marker["kind"], marker["user_id"], marker["event_type"]) == (
        "event",
        "user-00001",
        "CRM Updated",
    )
    assert json.loads(marker["extra"]) == {"user_properties": {"$set": {"CRM_Level": 5}}}


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_group_feed_sends_only_the_changed_group_properties(stack, tmp_path):
    with stack.engine.begin() as conn:
        conn.execute(text("CREATE TABLE companies (name TEXT, plan TEXT, seats INTEGER)"))
        conn.execute(
            text("INSERT INTO companies VALUES ('Acme Ltd', 'pro', 40), ('Globex', 'free', 3)")
        )
    f = Feeds(
        stack,
        tmp_path,
        """
[feeds.companies]
kind = "group_identify"
query = "SELECT name, plan, seats FROM companies"
group_type = "company"
group_value = "name"
properties = { plan = "Plan", seats = "Seats" }
""",
    )
    first = f.enqueued(f.run("companies"))
    assert [(r["group_type"], r["group_value"], props(r)) for r in first] == [
        ("company", "Acme Ltd", {"$set": {"Plan": "pro", "Seats": 40}}),
        ("company", "Globex", {"$set": {"Plan": "free", "Seats": 3}}),
    ]
    with stack.engine.begin() as conn:
        conn.execute(text("UPDATE companies SET seats = 45 WHERE name = 'Acme Ltd'"))
    changed = f.enqueued(f.run("companies"))
    assert [(r["group_value"], props(r)) for r in changed] == [
        ("Acme Ltd", {"$set": {"Seats": 45}})
    ]


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_an_id_twice_in_the_result_or_one_amplitude_refuses_is_reported_not_sent(
    stack, crm, tmp_path
):
    crm.put({**USERS, "x1": ("gold", "b2b", 1)})  # shorter than Amplitude's 5 characters
    f = Feeds(
        stack,
        tmp_path,
        crm_config(crm.name).replace(
            f"FROM {crm.name}",
            f"FROM {crm.name} UNION ALL SELECT USERID, 'dup', GRP, LEVEL "
            f"FROM {crm.name} WHERE USERID = 'user-00001'",
        ),
    )
    result = f.run()
    assert sorted(by_user(f.enqueued(result))) == ["user-00002", "user-00003"]
    assert result.invalid == 2
    assert any("'user-00001': appears in 2 rows" in e for e in result.errors)
    assert any("user_id 'x1' is shorter than Amplitude's minimum" in e for e in result.errors)


# --- preview -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["sqlite", "postgresql"], indirect=True)
def test_preview_and_diff_show_exactly_what_the_next_run_enqueues_and_sends(stack, crm, tmp_path):
    crm.put(USERS)
    f = Feeds(stack, tmp_path, crm_config(crm.name))
    f.run()
    crm.set("user-00002", segment="gold")
    crm.set("user-00003", grp="vip")
    # when the feed is previewed
    plan = f.preview()
    # then the diff shows old → new per id
    assert {p.key: {k: (c.old, c.new) for k, c in p.changes.items()} for p in plan.planned} == {
        "user-00002": {"CRM_Segment": ("silver", "gold")},
        "user-00003": {"CRM_Group": (None, "vip")},
    }
    # and nothing was written: a second preview shows the same
    assert [p.row for p in f.preview().planned] == [p.row for p in plan.planned]
    assert stack.counts() == {"pending": 3}
    # when the feed then runs, it enqueues exactly the previewed rows
    rows = f.enqueued(f.run())
    assert [{c: r[c] for c in feeds.QUEUE_COLUMNS} for r in rows] == [p.row for p in plan.planned]
    # and the pipeline's Builder makes the previewed payloads from them (insert_id and time
    # come from the row's id and created_at, assigned on insert)
    builder = payloads.Builder("batch", 5, 86400, rows[0]["created_at"])
    for row, planned in zip(rows, plan.planned, strict=True):
        sent = builder.payload(payloads.Row(*[row[c] for c in payloads.ROW_COLUMNS]))
        shown = feeds.plan_as_dict(plan)["planned"][plan.planned.index(planned)]["payload"]
        assert shown.pop("insert_id") == shown.pop("time") == feeds.ASSIGNED_ON_ENQUEUE
        assert {k: v for k, v in sent.items() if k not in ("insert_id", "time")} == shown


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_the_cli_previews_runs_and_lists_a_feed(stack, crm, tmp_path):
    crm.put(USERS)
    f = Feeds(stack, tmp_path, crm_config(crm.name))
    f.run()
    crm.set("user-00001", segment="silver")
    env = {
        **os.environ,
        "AMPSYNC_DATABASE_URL": stack.url,
        "AMPSYNC_QUEUE_TABLE": stack.table,
        "AMPSYNC_FEEDS_FILE": str(f.path),
    }

    def ampsync(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "tasks.cli", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    diff = ampsync("feed", "preview", "crm", "--diff")
    assert diff.returncode == 0, diff.stderr
    assert "the next run would enqueue 1 row from 3 rows read; 0 invalid" in diff.stdout
    assert 'CRM_Segment: "gold" → "silver"' in diff.stdout
    shown = ampsync("feed", "preview", "crm", "--limit", "1")
    assert '"user_properties":{"$set":{"CRM_Segment":"silver"}}' in shown.stdout
    ran = ampsync("feed", "run", "crm")
    assert ran.returncode == 0 and "read 3 rows, enqueued 1" in ran.stdout
    listed = ampsync("feed", "list")
    assert "crm: identify from query" in listed.stdout
    assert "read 3 rows, enqueued 1, 0 invalid" in listed.stdout


# --- broken configuration, failing queries ------------------------------------------------------

GOOD = """\
[feeds.crm]
kind = "identify"
query = \"\"\"
SELECT USERID, SEGMENT
FROM crm   -- kind = "event" in a comment of the query is not a key
\"\"\"
user_id = "USERID"
schedule = 600

[feeds.crm.properties]
SEGMENT = "CRM_Segment"
"""


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ('kind = "identify"', 'kind = "identfy"'),
            "feeds.toml:2: feeds.crm.kind: must be identify, event or group_identify, not 'identfy'",
        ),
        (
            ('user_id = "USERID"', 'user_idd = "USERID"'),
            "feeds.toml:7: feeds.crm.user_idd: unknown key (did you mean user_id?)",
        ),
        (
            ("schedule = 600", "schedule = -5"),
            "feeds.toml:8: feeds.crm.schedule: must be seconds between runs",
        ),
        (
            ("schedule = 600", 'null = "ignore"'),
            "feeds.toml:8: feeds.crm.null: must be 'unset' or 'skip', not 'ignore'",
        ),
        (
            ('SEGMENT = "CRM_Segment"', 'SEGMENT = "$set"'),
            "feeds.toml:11: feeds.crm.properties.SEGMENT: property names cannot start with $",
        ),
        (
            ("schedule = 600", 'marker_event = "$identify"'),
            "feeds.toml:8: feeds.crm.marker_event: '$identify' is reserved by Amplitude",
        ),
        (
            ("schedule = 600", 'source_url = "${CRM_DB_URL}"'),
            "feeds.toml:8: feeds.crm.source_url: refers to ${CRM_DB_URL}, which is not set",
        ),
        (
            ("schedule = 600", 'cursor = "rv"'),
            "feeds.toml:8: feeds.crm.cursor: is not used by identify feeds",
        ),
        (
            ('user_id = "USERID"\n', ""),
            "feeds.toml:1: feeds.crm: user_id (or device_id) is missing",
        ),
        (
            ('kind = "identify"', "kind = identify"),
            "feeds.toml:2: invalid TOML: Invalid value (column 8)",
        ),
        (
            (
                '[feeds.crm]\nkind = "identify"',
                '[feeds.pick]\nkind = "event"\ncursor_mode = "rowversion"',
            ),
            "feeds.toml:3: feeds.pick.cursor_mode: rowversion needs SQL Server",
        ),
    ],
)
def test_a_broken_config_names_the_file_line_and_key(change, expected):
    source = GOOD.replace(*change)
    with pytest.raises(feeds.FeedConfigError) as caught:
        feeds.parse_config(source, "postgresql+psycopg://h/db", "feeds.toml", environ={})
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems


def test_the_readme_feed_examples_are_valid_configs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Feeds") :]
    examples = re.findall(r"```toml\n(.*?)```", section[: section.index("\n## ", 5)], re.S)
    assert len(examples) == 2
    for example in examples:
        config = feeds.parse_config(example, "mssql+pymssql://u:pw@dwh:1433/crm", "README.md")
        assert len(config.feeds) == 1


def test_the_good_config_parses():
    config = feeds.parse_config(GOOD, "sqlite:///q.db", "feeds.toml")
    feed = config.get("crm")
    assert (feed.kind, feed.user_id, feed.properties, feed.schedule) == (
        "identify",
        "USERID",
        {"SEGMENT": "CRM_Segment"},
        600.0,
    )
    with pytest.raises(feeds.FeedError, match="no feed named 'crn' .*did you mean 'crm'"):
        config.get("crn")


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_broken_config_stops_feed_run_with_its_line_and_enqueues_nothing(stack, tmp_path):
    path = tmp_path / "ampsync-feeds.toml"
    path.write_text(GOOD.replace('kind = "identify"', 'kind = "identfy"'))
    env = {
        **os.environ,
        "AMPSYNC_DATABASE_URL": stack.url,
        "AMPSYNC_QUEUE_TABLE": stack.table,
        "AMPSYNC_FEEDS_FILE": str(path),
    }
    ran = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "feed", "run", "crm"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 2
    assert f"{path}:2: feeds.crm.kind: must be identify, event or group_identify" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert stack.counts() == {}


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            "SELECT USERID, SEGMENT, GRP, LEVEL FROM no_such_table",
            ":3: feeds.crm.query: the query failed on sqlite:///",
        ),
        (
            "SELECT USERID, SEGMENT AS SEG, GRP, LEVEL FROM {table}",
            ":9: feeds.crm.properties.SEGMENT: the result has no column 'SEGMENT'; it has userid, "
            "SEG, grp, level",
        ),
    ],
)
def test_a_failing_query_gives_a_clear_message_and_enqueues_nothing(
    stack, crm, tmp_path, query, expected
):
    crm.put(USERS)
    config = crm_config(crm.name).replace(
        f"SELECT USERID, SEGMENT, GRP, LEVEL FROM {crm.name}", query.format(table=crm.name)
    )
    f = Feeds(stack, tmp_path, config)
    with pytest.raises(feeds.FeedError) as caught:
        f.run()
    assert expected in str(caught.value)
    assert stack.counts() == {}
    # and `ampsync feed list` shows the failure
    assert expected in f.runner.status()["crm"]["last_error"]


# --- events: no gaps, no repeats ---------------------------------------------------------------

PICKUPS = """\
[feeds.pickups]
kind = "event"
query = "SELECT order_id, user_id, store, {cursor} FROM {table}"
user_id = "user_id"
event_type = "Order Picked Up"
insert_id = ["order_id"]
cursor = "{cursor}"
{more}
[feeds.pickups.properties]
store = "Store"
"""


def insert_ids(f: Feeds, result: feeds.RunResult) -> list[str]:
    return sorted(r["insert_id"] for r in f.enqueued(result))


def all_event_insert_ids(stack) -> list[str]:
    q = stack.tables.queue
    with stack.engine.connect() as conn:
        return sorted(conn.execute(select(q.c.insert_id).where(q.c.kind == "event")).scalars())


def runs_until(f: Feeds, *wanted: str, timeout: float = 30) -> list[str]:
    """Run the feed until the wanted events are enqueued; everything enqueued on the way. (Any
    session's open transaction on the server holds the xmin bound back, briefly in a shared
    test database, so a row may take a second run to be read; never twice.)"""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not set(wanted) <= set(got) and time.monotonic() < deadline:
        got += insert_ids(f, f.run("pickups"))
    return sorted(got)


def test_an_event_feed_on_postgresql_picks_up_a_late_committing_row_exactly_once(
    make_stack, tmp_path
):
    stack = make_stack(PG_URL)
    table = f"pickups_{uuid.uuid4().hex[:8]}"
    with stack.engine.begin() as conn:
        # The writing transaction's id, filled by the database on insert.
        conn.execute(
            text(
                f"CREATE TABLE {table} (order_id text PRIMARY KEY, user_id text, "
                "store text, xid bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint)"
            )
        )
    f = Feeds(stack, tmp_path, PICKUPS.format(table=table, cursor="xid", more=""))

    def pickup(conn, order: str) -> None:
        conn.execute(
            text(f"INSERT INTO {table} (order_id, user_id, store) VALUES (:o, 'user-00001', 'A')"),
            {"o": order},
        )

    try:
        with stack.engine.begin() as conn:
            pickup(conn, "order-1")
        # given a transaction that inserts order-2 and stays open (a lower xid) …
        late = stack.engine.connect()
        late_tx = late.begin()
        pickup(late, "order-2")
        # … while order-3 is inserted and committed after it (a higher xid)
        with stack.engine.begin() as conn:
            pickup(conn, "order-3")
        # when the feed runs
        first = runs_until(f, "pickups:order-1")
        # then order-1 is enqueued, and order-3 waits: reading it now and moving the cursor past
        # it would skip order-2 for good when that commits
        assert first == ["pickups:order-1"]
        # when the open transaction commits and the feed runs again
        late_tx.commit()
        late.close()
        # then both arrive, each once, and later runs add nothing
        assert runs_until(f, "pickups:order-2", "pickups:order-3") == [
            "pickups:order-2",
            "pickups:order-3",
        ]
        assert f.run("pickups").rows_enqueued == 0
        with stack.engine.begin() as conn:
            pickup(conn, "order-4")
        assert runs_until(f, "pickups:order-4") == ["pickups:order-4"]
        # every order is in the queue exactly once
        assert all_event_insert_ids(stack) == [f"pickups:order-{n}" for n in range(1, 5)]
    finally:
        with stack.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))


def test_an_event_feed_with_an_id_cursor_on_mariadb_picks_up_a_late_commit_exactly_once(
    make_stack, tmp_path
):
    stack = make_stack(MARIADB_URL)
    table = f"pickups_{uuid.uuid4().hex[:8]}"
    with stack.engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE {table} (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
                "order_id VARCHAR(32), user_id VARCHAR(32), store VARCHAR(8))"
            )
        )
    f = Feeds(stack, tmp_path, PICKUPS.format(table=table, cursor="id", more="overlap = 100"))
    insert = text(f"INSERT INTO {table} (order_id, user_id, store) VALUES (:o, 'user-00001', 'B')")
    try:
        with stack.engine.begin() as conn:
            conn.execute(insert, {"o": "order-1"})
        # given order-2 takes id 2 in a transaction that stays open, and order-3 commits id 3
        late = stack.engine.connect()
        late_tx = late.begin()
        late.execute(insert, {"o": "order-2"})
        with stack.engine.begin() as conn:
            conn.execute(insert, {"o": "order-3"})
        # when the feed runs, it reads 1 and 3 (the cursor is now 3)
        assert insert_ids(f, f.run("pickups")) == ["pickups:order-1", "pickups:order-3"]
        # when order-2 commits below the cursor, the overlap window finds it, and only it
        late_tx.commit()
        late.close()
        assert insert_ids(f, f.run("pickups")) == ["pickups:order-2"]
        assert f.run("pickups").rows_enqueued == 0
        assert all_event_insert_ids(stack) == [f"pickups:order-{n}" for n in range(1, 4)]
    finally:
        with stack.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))


def test_an_event_feed_with_a_time_cursor_on_sqlite_misses_nothing_and_repeats_nothing(
    make_stack, tmp_path
):
    stack = make_stack(f"sqlite:///{tmp_path}/ampsync.db")
    with stack.engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE pickups (order_id TEXT, user_id TEXT, store TEXT, picked_at TEXT)")
        )
    f = Feeds(
        stack,
        tmp_path,
        PICKUPS.format(
            table="pickups", cursor="picked_at", more='time = "picked_at"\noverlap = 60'
        ),
    )

    def pickup(order: str, at: str) -> None:
        with stack.engine.begin() as conn:
            conn.execute(
                text("INSERT INTO pickups VALUES (:o, 'user-00001', 'C', :t)"),
                {"o": order, "t": f"2026-05-01 {at}"},
            )

    pickup("order-1", "10:00:00")
    pickup("order-2", "10:00:30")
    first = f.run("pickups")
    assert insert_ids(f, first) == ["pickups:order-1", "pickups:order-2"]
    # the event's own time goes to Amplitude, not the time it was read
    assert [str(r["event_time"]) for r in f.enqueued(first)][0].startswith("2026-05-01 10:00:00")
    # given a row stamped before the last one read, committed after it (within the overlap)
    pickup("order-3", "10:00:10")
    pickup("order-4", "10:02:00")
    # then the next run takes it and the new one, and repeats nothing
    assert insert_ids(f, f.run("pickups")) == ["pickups:order-3", "pickups:order-4"]
    assert f.run("pickups").rows_enqueued == 0
    assert all_event_insert_ids(stack) == [f"pickups:order-{n}" for n in range(1, 5)]


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_an_event_amplitude_would_refuse_is_enqueued_as_failed_with_its_reason(stack, tmp_path):
    with stack.engine.begin() as conn:
        conn.execute(text("CREATE TABLE pickups (order_id TEXT, user_id TEXT, store TEXT, n INT)"))
        conn.execute(
            text(
                "INSERT INTO pickups VALUES ('order-1', 'user-00001', 'A', 1), "
                "('order-2', 'null', 'A', 2)"
            )
        )
    f = Feeds(stack, tmp_path, PICKUPS.format(table="pickups", cursor="n", more="overlap = 0"))
    result = f.run("pickups")
    # then the bad event is on record (the cursor moves past it) and the good one goes
    rows = {r["insert_id"]: r for r in f.enqueued(result)}
    assert rows["pickups:order-1"]["status"] == "pending"
    assert rows["pickups:order-2"]["status"] == "failed"
    assert rows["pickups:order-2"]["last_error"] == (
        "invalid row: user_id 'null' is a placeholder Amplitude rejects"
    )
    assert result.failed_enqueued == 1


# --- concurrency, two databases -----------------------------------------------------------------


@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_two_runs_of_one_feed_at_once_enqueue_once(stack, crm, tmp_path):
    crm.put(USERS)
    slow = crm_config(crm.name).replace(
        f"FROM {crm.name}", f"FROM {crm.name}, (SELECT pg_sleep(1)) AS pause"
    )
    f = Feeds(stack, tmp_path, slow)
    outcomes: list[object] = []

    def run() -> None:
        try:
            outcomes.append(f.run())
        except Exception as exc:  # noqa: BLE001 - the assertion below names it
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # then one run enqueued every id and the other stood down, enqueuing nothing
    assert sorted(type(o).__name__ for o in outcomes) == ["FeedConflict", "RunResult"]
    assert stack.counts() == {"pending": 3}


@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_a_feed_reads_a_source_database_other_than_the_queues(stack, tmp_path, monkeypatch):
    # given the CRM in its own database (SQLite here), the queue in PostgreSQL, and the source's
    # URL taken from the environment, not written in the repository
    source_url = f"sqlite:///{tmp_path}/crm.db"
    source = db_engine.make_engine(source_url)
    crm = Crm(source)
    crm.put(USERS)
    monkeypatch.setenv("CRM_DATABASE_URL", source_url)
    f = Feeds(stack, tmp_path, crm_config(crm.name, more='source_url = "${CRM_DATABASE_URL}"'))
    # then a run reads the CRM and enqueues into the queue database
    assert f.run().rows_enqueued == 3 and stack.counts() == {"pending": 3}
    crm.set("user-00001", segment="silver")
    assert by_user(f.enqueued(f.run())) == {"user-00001": {"$set": {"CRM_Segment": "silver"}}}
    source.dispose()


# --- beat's schedule ---------------------------------------------------------------------------


def test_the_beat_schedule_has_one_expiring_entry_per_scheduled_feed(tmp_path):
    path = tmp_path / "ampsync-feeds.toml"
    path.write_text(
        GOOD + '\n[feeds.manual]\nkind = "identify"\nquery = "SELECT 1"\n'
        'user_id = "u"\nproperties = { p = "P" }\n'
    )
    s = Settings(AMPSYNC_FEEDS_FILE=str(path))
    assert beat_schedule.feed_entries(s) == {
        "ampsync-feed-crm": {
            "task": "ampsync.feed_run",
            "schedule": 600.0,
            "args": ("crm",),
            "options": {"expires": 600.0},
        },
    }
    # a missing file is no feeds; a broken one stops beat with its line
    assert beat_schedule.feed_entries(Settings(AMPSYNC_FEEDS_FILE=str(tmp_path / "none"))) == {}
    path.write_text(GOOD.replace("schedule = 600", "schedule = 0"))
    assert beat_schedule.feed_entries(s) == {}
    with pytest.raises(SettingsError, match=r"ampsync-feeds.toml:8: feeds.crm.schedule"):
        beat_schedule.check_feeds(s)


# --- SQL Server --------------------------------------------------------------------------------

MSSQL_FEEDS = """\
[feeds.crm]
kind = "identify"
procedure = "dbo.crm_segments"
user_id = "USERID"
properties = { SEGMENT = "CRM_Segment", GRP = "CRM_Group", LEVEL = "CRM_Level" }

[feeds.pickups]
kind = "event"
query = "SELECT order_id, user_id, picked_at, rv FROM dbo.pickups WHERE note <> 'a:b'"
user_id = "user_id"
event_type = "Order Picked Up"
insert_id = "order_id"
cursor = "rv"

[feeds.pickups_proc]
kind = "event"
procedure = "crm.pickups_since"
user_id = "user_id"
event_type = "Order Picked Up"
insert_id = ["store", "order_id"]
cursor = "rv"
params = { region = "EU" }
"""


def tsql(sql: str):
    return sqlglot.parse_one(sql, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)


def test_sql_server_feed_statements_compile_for_mssql_and_parse_as_tsql():
    config = feeds.parse_config(MSSQL_FEEDS, "mssql+pymssql://u:p@dwh:1433/crm")
    tables = schema.define_tables("dbo.amplitude_queue")
    dialect = mssql.dialect()
    crm = feeds.review_statements(config.get("crm"), tables, dialect)
    assert crm["source"] == "EXEC dbo.crm_segments"
    pickups = feeds.review_statements(config.get("pickups"), tables, dialect)
    # rowversion below MIN_ACTIVE_ROWVERSION(): rows of open transactions wait
    assert config.get("pickups").cursor_mode == "rowversion"
    assert pickups["bound"] == "SELECT CAST(MIN_ACTIVE_ROWVERSION() AS BIGINT) AS bound"
    assert pickups["source"] == (
        "SELECT * FROM (SELECT order_id, user_id, picked_at, rv FROM dbo.pickups WHERE note <> "
        "'a:b') AS ampsync_source WHERE ampsync_source.rv > CAST(CAST(0 AS BIGINT) AS BINARY(8)) "
        "AND ampsync_source.rv < CAST(CAST(1000 AS BIGINT) AS BINARY(8))"
    )
    proc = feeds.review_statements(config.get("pickups_proc"), tables, dialect)
    assert proc["source"] == (
        "DECLARE @ampsync_after BIGINT = 0, @ampsync_before BIGINT = 1000;\n"
        "EXEC crm.pickups_since @region = 'EU', @after = @ampsync_after, @before = @ampsync_before"
    )
    # the feed key is NVARCHAR: no conversion of pymssql's NVARCHAR parameters
    assert "feed = N'crm'" in crm["take_turn"]
    for sql in [*crm.values(), *pickups.values(), *proc.values()]:
        last = sqlglot.parse(sql, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)[-1]
        assert type(last).__name__ in ("Select", "Update", "Insert", "Execute"), sql
    ddl = setup.compile_ddl(setup.create_ddl(tables), dialect)
    created = [s for s in ddl.split("\nGO\n") if "_feed" in s]
    assert [s.split("(")[0].strip() for s in created] == [
        "CREATE TABLE dbo.amplitude_queue_feed_state",
        "CREATE TABLE dbo.amplitude_queue_feeds",
    ]
    assert "PRIMARY KEY (feed, entity)" in created[0]
    for statement in created:
        tsql(statement)


def test_init_db_creates_the_feed_tables_beside_the_queue(make_stack, tmp_path):
    stack = make_stack(f"sqlite:///{tmp_path}/ampsync.db")
    with stack.engine.connect() as conn:
        assert setup.missing_ddl(conn, stack.tables) == []
        names = set(
            conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'")).scalars()
        )
    assert {f"{stack.table}_feeds", f"{stack.table}_feed_state"} <= names


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (bytes.fromhex("00000001000107d1"), 4295034833),  # a rowversion as pymssql returns it
        (2**40, 2**40),  # a rowversion cast to BIGINT, a PostgreSQL xid
        ("2026-05-01 10:00:30", "2026-05-01T10:00:30"),  # SQLite keeps times as text
        (None, None),
    ],
)
def test_cursor_values_are_ordered_as_numbers_or_times(value, expected):
    position, _ = feeds._cursor_value(value)
    assert (position.isoformat() if hasattr(position, "isoformat") else position) == expected
