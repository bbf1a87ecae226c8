"""The `ampsync` command line and the install, as a person meets them: `--version` and help,
options before or after the command, stdout a script can read, a settings mistake that does
not close a Python shell, a worker that refuses to start when its database driver is missing,
the usual short URL schemes working end to end, and the README's quick start in a fresh
virtual environment."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from support import API_KEY, CLEAN_ENV, MARIADB_URL, PG_URL, REDIS_URL, ROOT, identify, run_cli

SPEC_COMMANDS = (
    "init-db",
    "run",
    "sync",
    "status",
    "retry-failed",
    "emulator",
    "statements",
    "check",
    "metrics",
    "demo",
    "feed",
)


def one_line(stderr: str) -> str:
    """The whole of stderr, which must be exactly one line."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# --- the CLI's shape (point 7) ------------------------------------------------------------------


def test_version_prints_the_installed_version_and_exits_0(tmp_path):
    done = run_cli("--version", env=CLEAN_ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ampsync {version('ampsync')}"


def test_help_lists_every_command_and_each_command_explains_its_options(tmp_path):
    # given a new user asking for help
    top = run_cli("--help", env=CLEAN_ENV, cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    listed = re.findall(r"^  ([a-z-]+)\s{2,}\S", top.stdout.split("Commands:")[1], re.M)
    # then every command of the manual is listed with a line of help
    assert set(SPEC_COMMANDS) <= set(listed), listed
    # and a command's own help explains each of its options
    retry = run_cli("retry-failed", "--help", env=CLEAN_ENV, cwd=tmp_path)
    assert retry.returncode == 0, retry.stderr
    for option, words in {
        "--kind": "Only rows of this kind",
        "--ids": "Only these row ids",
        "--class": "Which failures",
        "--since": "ISO 8601",
        "--until": "created before",
    }.items():
        assert re.search(rf" {option}\b.*?{words}", " ".join(retry.stdout.split())), option


@pytest.mark.parametrize(
    "args",
    [["--log-format", "json", "statements"], ["statements", "--log-format", "json"]],
    ids=["before", "after"],
)
def test_the_log_format_is_accepted_before_or_after_the_command(tmp_path, args):
    # given a command that needs no server; when --log-format comes before or after it
    done = run_cli(*args, env=CLEAN_ENV, cwd=tmp_path)
    # then both forms run the command
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("-- ampsync statements for sqlite:///ampsync.db")


def test_a_usage_mistake_exits_2_naming_the_option(tmp_path):
    done = run_cli("sync", "--kind", "order", env=CLEAN_ENV, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert "Invalid value for '--kind': 'order' is not one of" in done.stderr


def test_sync_wait_writes_json_on_stdout_and_its_progress_on_stderr(make_stack):
    # given rows and a running worker
    stack = make_stack()
    stack.start_worker()
    stack.insert([identify(f"user-{n:05d}", {"CRM_Level": n}) for n in range(20)])
    # when the operator syncs, waits, and pipes stdout into a JSON reader
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "sync", "--wait", "--timeout", "90"],
        env={**CLEAN_ENV, **stack.env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # then stdout is the sync's summary and nothing else; the bar went to stderr
    assert json.loads(done.stdout)["rows_claimed"] == 20
    bar = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"\[#{30}\]\s+20/20 rows\s+100%.*sent 20\s+failed 0.*", bar), bar
    assert stack.counts() == {"sent": 20}


# --- a settings mistake is an exception, not an exit (point 3) ----------------------------------

SHELL = """
from tasks import sync
try:
    sync.delay()
except ValueError as exc:
    print("caught:", exc)
print("the shell goes on")
"""


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"AMPSYNC_MAX_ATTEMPTS": "0", "CELERY_BROKER_URL": REDIS_URL}, "AMPSYNC_MAX_ATTEMPTS='0'"),
        ({}, "CELERY_BROKER_URL is not set"),
    ],
    ids=["bad-setting", "no-broker"],
)
def test_a_settings_mistake_in_a_python_shell_raises_and_the_shell_goes_on(tmp_path, env, expected):
    # given a Python process that imports tasks with a setting wrong or missing
    done = subprocess.run(
        [sys.executable, "-c", SHELL],
        env={**CLEAN_ENV, "PYTHONPATH": str(ROOT), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # then sync.delay() raises an exception it can catch, carrying the one line, and the
    # interpreter is still there afterwards
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"caught: ampsync: {expected}" in done.stdout
    assert done.stdout.strip().endswith("the shell goes on")


def test_the_cli_turns_a_settings_mistake_into_exit_2_and_one_line(tmp_path):
    done = run_cli("status", env={**CLEAN_ENV, "AMPSYNC_MAX_ATTEMPTS": "0"}, cwd=tmp_path)
    assert done.returncode == 2
    assert one_line(done.stderr).startswith("ampsync: AMPSYNC_MAX_ATTEMPTS='0': ")


# --- database drivers (point 1) -----------------------------------------------------------------

WORKER = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "solo", "-l", "INFO"]
# psycopg2 is never installed with ampsync (its PostgreSQL driver is psycopg 3)
NO_DRIVER_URL = "postgresql+psycopg2://postgres:secret1@127.0.0.1:5432/test"


def test_a_worker_whose_database_driver_is_missing_refuses_to_start_in_one_line(tmp_path):
    # given a worker configured for a driver this Python does not have
    env = {
        **CLEAN_ENV,
        "AMPSYNC_DATABASE_URL": NO_DRIVER_URL,
        "AMPLITUDE_API_KEY": API_KEY,
        "CELERY_BROKER_URL": REDIS_URL,
    }
    # when it starts
    done = subprocess.run(WORKER, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    # then it exits before saying ready, its last line naming the driver and what to install
    output = done.stdout + done.stderr
    assert done.returncode != 0 and " ready." not in output, output[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ampsync: AMPSYNC_DATABASE_URL=")
    assert "psycopg2 is not installed" in last and "'ampsync[postgresql]'" in last
    assert "Traceback" not in output and "secret1" not in output


@pytest.mark.parametrize("command", [["init-db"], ["status"], ["check"]])
def test_a_command_whose_database_driver_is_missing_says_so_in_one_line(tmp_path, command):
    env = {**CLEAN_ENV, "AMPSYNC_DATABASE_URL": NO_DRIVER_URL}
    done = run_cli(*command, env=env, cwd=tmp_path)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "psycopg2 is not installed" in line and "'ampsync[postgresql]'" in line


def bare_scheme(url: str, scheme: str) -> str:
    """The same database as `url`, written with a bare scheme (postgres://, mysql://)."""
    return make_url(url).set(drivername=scheme).render_as_string(hide_password=False)


@pytest.mark.parametrize(
    ("url", "scheme"), [(PG_URL, "postgres"), (MARIADB_URL, "mysql")], ids=["postgres", "mysql"]
)
def test_a_bare_scheme_url_works_for_the_commands_and_the_worker(make_stack, url, scheme):
    # given AMPSYNC_DATABASE_URL written the common short way, e.g. postgres://…
    alias = bare_scheme(url, scheme)
    assert "+" not in alias.split("://")[0]
    stack = make_stack(url, AMPSYNC_DATABASE_URL=alias)
    # when the operator asks for the status and starts a worker with it
    status = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "status", "--json"],
        env={**CLEAN_ENV, **stack.env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr[-2000:]
    assert isinstance(json.loads(status.stdout), dict)
    stack.start_worker()  # asserts it says ready
    stack.insert([identify("user-00001", {"CRM_Segment": "gold"})])
    # then the worker delivers the row through the driver ampsync installs
    assert stack.drain(timeout=60) == {"sent": 1}
    assert stack.rows()[max(stack.rows())]["sent_at"] is not None


# --- the README's quick start in a fresh virtual environment (point 8) --------------------------


def quick_start_line() -> str:
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1]
    return next(line.strip() for line in section.splitlines() if "python3 -m venv" in line)


def copy_of_the_repository(to: Path) -> Path:
    ignored = shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "*.db", "*.db-*", ".env", "results"
    )
    shutil.copytree(ROOT, to, ignore=ignored)
    return to


def test_the_readme_quick_start_installs_in_a_fresh_venv_and_the_demo_delivers(tmp_path):
    # given a clean copy of the repository and the README's two-command quick start
    repo = copy_of_the_repository(tmp_path / "ampsync")
    line = quick_start_line()
    assert line.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    env = {k: v for k, v in CLEAN_ENV.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # when a person pastes it into a shell
    done = subprocess.run(
        ["bash", "-c", line], env=env, cwd=repo, capture_output=True, text=True, timeout=900
    )
    # then ampsync installs into .venv and the demo delivers and exits 0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "queue table by kind and status:" in done.stdout
    assert re.search(r"^\s+identify\s+sent\s+\d+$", done.stdout, re.M), done.stdout[-2000:]
    venv = repo / ".venv" / "bin"
    # and the installed package says what it is: version, license, classifiers, URLs, extras
    shown = subprocess.run(
        [
            str(venv / "python"),
            "-c",
            "import importlib.metadata as m, json; d = m.metadata('ampsync'); print(json.dumps("
            "{k: d.get_all(k) for k in ('Version', 'License-Expression', 'Classifier', "
            "'Project-URL', 'Provides-Extra')}))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    meta = json.loads(shown.stdout)
    assert meta["License-Expression"] == ["MIT"] and meta["Classifier"] and meta["Project-URL"]
    assert {"postgresql", "mysql"} <= set(meta["Provides-Extra"])
    # and without the [postgresql] extra, a PostgreSQL URL says which extra to install
    pg = subprocess.run(
        [str(venv / "ampsync"), "status"],
        env={**env, "AMPSYNC_DATABASE_URL": bare_scheme(PG_URL, "postgres")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pg.returncode == 2
    assert "pip install 'ampsync[postgresql]'" in one_line(pg.stderr)
