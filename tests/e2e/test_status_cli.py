"""The operator's command line, run as a person runs it (subprocesses against a real worker):
`ampsync status` and `status --json`, `sync --wait` and `demo` with their progress bar, JSON
log lines for log shippers, and `init-db --create-database`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlglot
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.dialects import mssql
from sqlalchemy.engine import make_url
from sqlglot import exp
from sqlglot.errors import ErrorLevel
from support import (
    MARIADB_URL,
    PG_URL,
    REDIS_URL,
    ROOT,
    Stack,
    event,
    identify,
    poll_until,
    run_cli,
    settle_a_day_of_outcomes,
)

from tasks.db.setup import create_database_sql


def ampsync(
    stack: Stack | None,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    timeout: float = 90,
) -> subprocess.CompletedProcess:
    """`ampsync …` in a subprocess with the stack's settings, as an operator types it."""
    full_env = {**os.environ, **(stack.env if stack else {}), **(env or {})}
    return run_cli(*args, env=full_env, cwd=cwd, timeout=timeout)


# --- status --------------------------------------------------------------------------------------


def test_status_reports_rows_age_backoff_paused_endpoints_and_errors_with_passwords_masked(
    make_stack,
):
    # given a database and a broker whose URLs carry passwords, and slow backoff and pauses so
    # that what status reports stays put while it is read
    db_url = PG_URL.replace("postgres@", "postgres:db-secret-pw@")
    broker_url = REDIS_URL.replace("redis://", "redis://:broker-secret-pw@")
    stack = make_stack(
        db_url,
        AMPSYNC_BACKOFF_BASE="300",
        AMPSYNC_BACKOFF_BASE_5XX="300",
        AMPSYNC_BACKOFF_MAX="600",
        AMPSYNC_BACKOFF_MAX_5XX="600",
        AMPSYNC_PAUSE_BASE="300",
        AMPSYNC_PAUSE_MAX="600",
        AMPSYNC_GROUP_IDENTIFY_API="groupidentify",
    )
    stack.start_worker()
    # and rows that were delivered or failed, and failed requests: a 500 to events, an HTML
    # 400 to group identify (that endpoint pauses)
    settle_a_day_of_outcomes(stack)

    # when the operator asks for the status as JSON
    done = ampsync(stack, "status", "--json", env={"CELERY_BROKER_URL": broker_url})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # then the database and the broker are named, without their passwords
    assert "secret-pw" not in done.stdout
    assert report["database"] == db_url.replace("db-secret-pw", "***")
    assert report["broker"] == broker_url.replace("broker-secret-pw", "***")
    assert report["queue_table"] == stack.table
    # and the rows are counted by kind and status
    assert report["rows"] == {
        "identify": {"sent": 3, "failed": 2},
        "event": {"failed": 1, "pending": 2},
        "group_identify": {"pending": 1},
    }
    # and the oldest pending row's age, and the rows waiting on backoff (events after the 500,
    # the group row behind its paused endpoint)
    assert 0 <= report["oldest_pending_seconds"] < 120
    assert report["waiting_on_backoff"] == 3
    # and which endpoint is paused and why; the events endpoint only counts one failure
    endpoints = {e["endpoint"]: e for e in report["endpoints"]}
    assert endpoints["groupidentify"]["paused"] is True
    assert "400" in endpoints["groupidentify"]["reason"]
    assert endpoints["batch"]["paused"] is False and endpoints["batch"]["failures"] == 1
    # and the most common errors of failed rows, with their counts, most common first
    errors = [(e["rows"], e["error"]) for e in report["common_errors"]]
    assert [n for n, _ in errors] == [2, 1]
    assert errors[0][1].startswith("invalid row: properties is not valid JSON")
    assert errors[1][1] == "invalid row: user_id 'null' is a placeholder Amplitude rejects"

    # when the operator asks for the readable table, then it says the same
    table = ampsync(stack, "status", env={"CELERY_BROKER_URL": broker_url})
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "secret-pw" not in table.stdout and ":***@" in lines[0] and ":***@" in lines[1]
    cells = {
        line.split()[0]: line.split()[1:]
        for line in lines
        if line.split()[:1] and line.split()[0] in ("kind", "event", "identify", "group_identify")
    }
    assert cells["kind"] == ["pending", "in_flight", "sent", "failed"]
    assert cells["identify"] == ["0", "0", "3", "2"]
    assert cells["event"] == ["2", "0", "0", "1"]
    assert cells["group_identify"] == ["1", "0", "0", "0"]
    assert re.search(r"^oldest pending row: \d+ s$", table.stdout, re.M)
    assert "rows waiting on backoff: 3" in lines
    assert any(line.startswith("PAUSED groupidentify until ") and "400" in line for line in lines)
    assert re.search(r"^\s+2 × invalid row: properties is not valid JSON", table.stdout, re.M)
    assert re.search(r"^\s+1 × invalid row: user_id 'null'", table.stdout, re.M)


# --- progress ------------------------------------------------------------------------------------

BAR = r"\[#{{30}}\]\s+{n}/{n} rows\s+100%\s+\d+ rows/s\s+sent {sent}\s+failed {failed}\s+[\d.]+ s"


def test_sync_wait_follows_the_rows_with_a_progress_bar_and_rows_per_second(make_stack):
    # given 60 rows, one of them invalid, and a running worker
    stack = make_stack()
    stack.start_worker()
    stack.insert(
        [identify(f"user-{n:05d}", {"CRM_Level": n}) for n in range(59)]
        + [identify("user-bad00", {"$nope": {"x": 1}})]
    )
    # when the operator syncs and waits
    done = ampsync(stack, "sync", "--wait")
    # then it prints the sync's summary (stdout), and a bar that ends full, with rows/s and
    # outcomes (stderr)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["rows_claimed"] == 60
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(BAR.format(n=60, sent=59, failed=1), last), last
    assert stack.counts() == {"sent": 59, "failed": 1}


def test_demo_draws_the_same_progress_bar_and_exits_0(tmp_path):
    # given nothing set up: the demo brings its own SQLite, Redis, emulator and worker
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AMPSYNC_", "AMPLITUDE_", "CELERY_"))
    }
    # when it runs with a few sample users
    done = run_cli("demo", "--users", "12", env=env, cwd=tmp_path)
    # then its progress ends full: 12 identifies, 4 orders, a group, 2 broken rows
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search("^demo:  " + BAR.format(n=19, sent=17, failed=2) + "$", done.stderr, re.M)


# --- JSON logs -----------------------------------------------------------------------------------


def _json_lines(log: Path) -> list[dict]:
    """Every line the process wrote, each of which must be one JSON object."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("how", ["AMPSYNC_LOG_FORMAT=json", "ampsync --log-format json run"])
def test_a_worker_asked_for_json_logs_writes_one_json_object_per_line(make_stack, tmp_path, how):
    stack = make_stack(AMPSYNC_SYNC_INTERVAL="1")
    log = tmp_path / "worker.log"
    if how == "AMPSYNC_LOG_FORMAT=json":
        # given a worker started with the setting, as compose's worker service would be
        proc = stack.start_worker(extra_env={"AMPSYNC_LOG_FORMAT": "json"})
        log = stack.logs[-1]
    else:
        # given `ampsync run` (worker and beat) asked for JSON on the command line
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tasks.cli",
                "--log-format",
                "json",
                "run",
                "--concurrency",
                "1",
            ],
            env={**os.environ, **stack.env},
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
            start_new_session=True,
        )
        stack.workers.append(proc)
        assert poll_until(lambda: " ready." in log.read_text(), timeout=30), (
            "the worker to be ready"
        )
    # when it delivers rows (the `run` worker's beat starts the syncs by itself)
    stack.insert([identify("user-00001", {"CRM_Segment": "gold"}), event("null", "Visit")])
    if how == "AMPSYNC_LOG_FORMAT=json":
        stack.sync()
    assert poll_until(lambda: stack.counts() == {"sent": 1, "failed": 1}, timeout=30), (
        stack.counts()
    )
    time.sleep(0.5)  # the batch's log line follows its acknowledgement
    # then every line it wrote is a JSON object with time, level, logger and message
    records = _json_lines(log)
    assert proc.poll() is None
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    messages = [r["message"] for r in records]
    assert any(m.endswith(" ready.") for m in messages)
    # and each batch's line names its task, so a log shipper can follow one task
    batches = [
        r
        for r in records
        if r["logger"] == "ampsync.tasks" and r.get("task_name") == "ampsync.send_batch"
    ]
    outcomes = sorted(
        re.search(r"\((\w+), run \w+\): (.*)$", r["message"]).groups() for r in batches
    )
    assert outcomes == [
        ("event", "0 sent, 1 failed, 0 retried in 0 requests"),
        ("identify", "1 sent, 0 failed, 0 retried in 1 requests"),
    ]
    assert all(re.fullmatch(r"[0-9a-f-]{36}", r["task_id"]) for r in batches)


# --- init-db --create-database -------------------------------------------------------------------


@pytest.mark.parametrize("server_url", [PG_URL, MARIADB_URL], ids=["postgresql", "mariadb"])
def test_init_db_create_database_creates_a_missing_database_once_then_the_table(
    server_url, tmp_path
):
    # given a database name the server does not have
    name = f"ampsync_tmp_{uuid.uuid4().hex[:8]}"
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    env = {"AMPSYNC_DATABASE_URL": url, "AMPSYNC_QUEUE_TABLE": "amplitude_queue"}
    server = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        # when init runs twice, as `docker compose up` does on every start
        first = ampsync(None, "init-db", "--create-database", env=env, cwd=tmp_path)
        second = ampsync(None, "init-db", "--create-database", env=env, cwd=tmp_path)
        # then the first creates the database and the table, the second finds both
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines()[0] == f"database {name}: created"
        assert re.fullmatch(r"amplitude_queue: \d+ statements run", first.stdout.splitlines()[1])
        assert second.returncode == 0, second.stderr
        assert second.stdout.splitlines() == [
            f"database {name}: exists",
            "amplitude_queue: up to date",
        ]
        engine = create_engine(url)
        with engine.connect() as conn:
            assert {"amplitude_queue", "amplitude_queue_endpoints"} <= set(
                inspect(conn).get_table_names()
            )
        engine.dispose()
    finally:
        quote = '"' if server_url.startswith("postgresql") else "`"
        with server.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {quote}{name}{quote}"))
        server.dispose()


@pytest.mark.parametrize("name", ["ampsync", "dwh-2024", "odd]name'x"])
def test_create_database_on_sql_server_is_one_guarded_t_sql_statement(name):
    # given the statements --create-database runs on SQL Server (none runs here: parsed only)
    exists_sql, create_sql = create_database_sql(mssql.dialect(), name)
    # then both parse as T-SQL, and the CREATE only runs when DB_ID finds no such database
    for sql in (exists_sql, create_sql):
        tree = sqlglot.parse_one(sql, read="tsql", error_level=ErrorLevel.RAISE)
        assert not list(tree.find_all(exp.Command)), sql
    escaped = name.replace("'", "''")
    bracketed = "[" + name.replace("]", "]]") + "]"
    assert create_sql == f"IF DB_ID(N'{escaped}') IS NULL CREATE DATABASE {bracketed}"
    assert exists_sql == f"SELECT name FROM sys.databases WHERE name = N'{escaped}'"
