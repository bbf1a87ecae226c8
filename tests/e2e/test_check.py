"""`ampsync check` as a person runs it first on their own server: `python -m tasks.cli check`
in a subprocess, with nothing but AMPSYNC_DATABASE_URL and AMPSYNC_QUEUE_TABLE set.

On PostgreSQL, MariaDB and SQLite every line is `ok` or `skipped` and the exit code is 0; a
login without UPDATE on the queue table gets a FAILED line naming the GRANT to run and exit
1; an unreachable server, one line and exit 2. The scratch table is gone afterwards every
time. The README's SQL Server GRANT lines are the ones the check names.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlglot
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.dialects import mssql
from sqlglot import exp
from sqlglot.errors import ErrorLevel
from support import CLEAN_ENV, MARIADB_URL, PG_URL, ROOT

from tasks.db import check, schema, setup
from tasks.db import engine as db_engine

LINE = re.compile(r"^(ok|FAILED|skipped) +(.+?)(?:: (.*))?$")
# Lines that are skipped on a database, and why (every other line must be ok).
SKIPPED = {
    "postgresql": {"rowversion bound above 2^31"},
    "mariadb": {"rowversion bound above 2^31"},
    "sqlite": {"rowversion bound above 2^31", "a claim skips rows another claim holds"},
}


def run_check(url: str, table: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**CLEAN_ENV, "AMPSYNC_DATABASE_URL": url, "AMPSYNC_QUEUE_TABLE": table}
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", "check", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def lines(done: subprocess.CompletedProcess[str]) -> list[tuple[str, str, str]]:
    """(status, name, detail) of every line; each line must be one check."""
    parsed = []
    for line in done.stdout.splitlines():
        match = LINE.match(line)
        assert match, f"not a check line: {line!r}"
        parsed.append((match.group(1), match.group(2), match.group(3) or ""))
    return parsed


def scratch_tables(url: str, table: str) -> list[str]:
    engine = db_engine.make_engine(url)
    try:
        with engine.connect() as conn:
            return [n for n in inspect(conn).get_table_names() if n.startswith(f"{table}_chk_")]
    finally:
        engine.dispose()


@pytest.fixture
def queue_at(tmp_path: Path):
    """Factory: a fresh queue table at a URL, created as `ampsync init-db` would; dropped after,
    with any scratch table a failed test left behind."""
    made: list[tuple[str, str]] = []

    def make(url: str) -> str:
        table = f"q_{uuid.uuid4().hex[:10]}"
        engine = db_engine.make_engine(url)
        setup.init_db(engine, schema.define_tables(table))
        engine.dispose()
        made.append((url, table))
        return table

    yield make
    for url, table in made:
        left = scratch_tables(url, table)
        engine = db_engine.make_engine(url)
        with engine.begin() as conn:
            for name in left:
                conn.execute(text(f"DROP TABLE {name}"))
            for t in reversed(schema.define_tables(table).metadata.sorted_tables):
                t.drop(conn, checkfirst=True)
        engine.dispose()


def database_url(name: str, tmp_path: Path) -> str:
    return {
        "postgresql": PG_URL,
        "mariadb": MARIADB_URL,
        "sqlite": f"sqlite:///{tmp_path / 'queue.db'}",
    }[name]


@pytest.mark.parametrize("database", ["postgresql", "mariadb", "sqlite"])
def test_every_check_passes_and_the_scratch_table_is_gone(database, queue_at, tmp_path):
    # given a database where init-db has run
    url = database_url(database, tmp_path)
    table = queue_at(url)
    # when a person runs `ampsync check`
    done = run_check(url, table)
    # then it exits 0 and every line is a check that passed (or does not apply here)
    found = lines(done)
    failed = [line for line in found if line[0] != "ok" and line[1] not in SKIPPED[database]]
    assert not failed, failed
    assert done.returncode == 0, done.stdout + done.stderr
    names = [name for _, name, _ in found]
    # and it covered the server, the permissions and every worker statement
    assert names[:2] == ["database", "server"]
    assert {name for name, _ in check.STATEMENT_CHECKS} <= set(names)
    assert any(name.startswith("scratch table") for name in names)
    assert names[-1].startswith("drop scratch table")
    if database != "sqlite":
        assert (
            f"permissions on {'public.' if database == 'postgresql' else 'test.'}{table}" in names
        )
    assert ("skipped", "rowversion bound above 2^31") in [(s, n) for s, n, _ in found]
    # and the scratch table is gone, the real queue untouched
    assert scratch_tables(url, table) == []


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_json_output_parses_and_says_the_same(database, queue_at, tmp_path):
    url = database_url(database, tmp_path)
    table = queue_at(url)
    done = run_check(url, table, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["dialect"] == database
    assert report["queue_table"] == table
    assert report["scratch_table"].startswith(f"{table}_chk_")
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert set(statuses.values()) <= {"ok", "skipped"}
    assert {c["section"] for c in report["checks"]} == {"server", "permissions", "statements"}
    assert statuses["claims from two connections at once"] == "ok"
    assert scratch_tables(url, table) == []


@contextlib.contextmanager
def pg_login(table: str, schema_grant: str, queue_grant: str) -> Iterator[tuple[str, str]]:
    """A PostgreSQL role with `schema_grant` on public, `queue_grant` on the queue table and
    everything on ampsync's own tables: (its URL, its name); dropped after."""
    role = f"ampsync_lp_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    own = [f"{table}_{suffix}" for suffix in ("endpoints", "runs", "feeds", "feed_state")]
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT {schema_grant} ON SCHEMA public TO {role}"))
        conn.execute(text(f"GRANT {queue_grant} ON {table} TO {role}"))
        conn.execute(text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(own)} TO {role}"))
        conn.execute(text(f"GRANT USAGE ON SEQUENCE {table}_id_seq, {table}_runs_id_seq TO {role}"))
    try:
        yield PG_URL.replace("postgres@", f"{role}@"), role
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def test_a_postgresql_login_without_update_is_told_the_grant(queue_at):
    # given a role that may read, insert and delete the queue rows but not update them
    table = queue_at(PG_URL)
    with pg_login(table, "CREATE, USAGE", "SELECT, INSERT, DELETE") as (url, role):
        # when it runs `ampsync check`
        done = run_check(url, table)
        # then it exits 1, and the one failed line names the GRANT to run
        assert done.returncode == 1, done.stdout + done.stderr
        failed = [line for line in lines(done) if line[0] == "FAILED"]
        assert failed == [
            (
                "FAILED",
                f"permissions on public.{table}",
                f"UPDATE missing: GRANT UPDATE ON public.{table} TO {role};",
            )
        ], done.stdout
        # and everything else passed, in a scratch table it created and dropped again
        assert scratch_tables(PG_URL, table) == []


def test_the_workers_least_privilege_login_passes_with_the_statements_left_to_init(queue_at):
    # given the workers' login of the README's Security section: rows and nothing else, no
    # right to create tables
    table = queue_at(PG_URL)
    with pg_login(table, "USAGE", "SELECT, INSERT, UPDATE, DELETE") as (url, _role):
        # when it runs `ampsync check`
        done = run_check(url, table)
        # then every permission it holds is ok and the check passes
        assert done.returncode == 0, done.stdout + done.stderr
        found = lines(done)
        assert not [line for line in found if line[0] == "FAILED"], done.stdout
        assert ("ok", f"permissions on public.{table}", "SELECT, INSERT, UPDATE, DELETE") in found
        # and the statements, which need a scratch table, are skipped saying who runs them
        skipped = [line for line in found if line[0] == "skipped"]
        assert len(skipped) == len(check.STATEMENT_CHECKS), done.stdout
        assert all("may not create tables" in detail for _, _, detail in skipped)
        assert scratch_tables(PG_URL, table) == []


def test_a_mariadb_login_without_update_is_told_the_grant(queue_at):
    # given an account that may read, insert and delete in the schema, create and drop tables,
    # but never update the queue table
    table = queue_at(MARIADB_URL)
    user = f"ampsync_ro_{uuid.uuid4().hex[:6]}"
    admin = create_engine(MARIADB_URL, isolation_level="AUTOCOMMIT")
    accounts = [f"'{user}'@'%'", f"'{user}'@'localhost'"]
    own = [f"{table}_{suffix}" for suffix in ("endpoints", "runs", "feeds", "feed_state")]
    with admin.connect() as conn:
        for account in accounts:
            conn.execute(text(f"CREATE USER {account}"))
            conn.execute(
                text(f"GRANT SELECT, INSERT, DELETE, CREATE, DROP, INDEX ON test.* TO {account}")
            )
            for name in own:
                conn.execute(text(f"GRANT UPDATE ON test.{name} TO {account}"))
    try:
        # when it runs `ampsync check`
        done = run_check(MARIADB_URL.replace("root@", f"{user}@"), table)
        # then it exits 1 with a line naming the missing GRANT on the queue table
        assert done.returncode == 1, done.stdout + done.stderr
        found = lines(done)
        denied = [line for line in found if line[1] == f"permissions on test.{table}"]
        assert len(denied) == 1 and denied[0][0] == "FAILED", done.stdout
        assert re.fullmatch(
            rf"UPDATE missing: GRANT UPDATE ON test\.{table} TO '{user}'@'(%|localhost)';",
            denied[0][2],
        ), denied
        # and the tables ampsync owns passed
        for name in own:
            assert ("ok", f"permissions on test.{name}") in [(s, n) for s, n, _ in found]
        # and its scratch table is gone although the statements could not update it
        assert scratch_tables(MARIADB_URL, table) == []
    finally:
        with admin.connect() as conn:
            for account in accounts:
                conn.execute(text(f"DROP USER IF EXISTS {account}"))
        admin.dispose()


def test_an_unreachable_database_or_a_wrong_setting_is_one_line_and_exit_2():
    # a server that does not answer
    done = run_check("postgresql+psycopg://postgres@127.0.0.1:9/test", "amplitude_queue")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(
        "ampsync: AMPSYNC_DATABASE_URL: cannot reach the database at postgresql+psycopg://"
    )
    # a queue table name that is not one
    done = run_check(PG_URL, "amplitude queue; DROP TABLE x")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "AMPSYNC_QUEUE_TABLE" in done.stderr


def test_the_readme_grants_are_the_ones_check_names():
    # given the README's SQL Server section
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## SQL Server\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```tsql\n(.*?)```", section, re.S)
    shown = {line.strip() for block in blocks for line in block.splitlines()}
    # then every GRANT the check would name for the default queue table is there, as written
    grants = check.required_grants(
        mssql.dialect(), schema.define_tables("amplitude_queue"), "ampsync", "dbo"
    )
    assert set(grants) <= shown, set(grants) - shown
    # and it tells users to run the check first, and shows the recommended settings
    assert "ampsync check" in section
    assert "READ_COMMITTED_SNAPSHOT ON" in section
    assert "'optimize for ad hoc workloads', 1" in section


def test_the_sql_server_facts_are_t_sql():
    # no SQL Server runs here: the queries `check` reads its facts with at least parse as T-SQL
    for name, sql in check._MSSQL_FACTS:
        (tree,) = sqlglot.parse(sql, read="tsql", error_level=ErrorLevel.RAISE)
        assert isinstance(tree, exp.Select), name
