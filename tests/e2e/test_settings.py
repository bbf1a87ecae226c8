"""A wrong setting, an unreachable database or broker: one line a person can act on."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import API_KEY, CLEAN_ENV, PG_URL, REDIS_URL

from tasks import settings


def run(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env={**CLEAN_ENV, **env}, cwd=cwd, capture_output=True, text=True, timeout=60
    )


STATUS = [sys.executable, "-m", "tasks.cli", "status"]
WORKER = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "solo"]


@pytest.mark.parametrize(
    "command,env,expected",
    [
        (
            STATUS,
            {"AMPLITUDE_REGION": "mars"},
            "AMPLITUDE_REGION='mars': Input should be 'us' or 'eu'",
        ),
        (
            STATUS,
            {"AMPSYNC_DATABASE_URL": "not a url"},
            "AMPSYNC_DATABASE_URL='not a url': is not a SQLAlchemy URL",
        ),
        (
            STATUS,
            {"AMPSYNC_QUEUE_TABLE": "q; DROP TABLE users"},
            "AMPSYNC_QUEUE_TABLE='q; DROP TABLE users': must be a table name",
        ),
        (
            STATUS,
            {"AMPLITUDE_SERVER_URL": "ftp://x"},
            "AMPLITUDE_SERVER_URL='ftp://x': must be an http(s) URL",
        ),
        (
            STATUS,
            {"AMPSYNC_BATCH_SIZE": "5000"},
            "AMPSYNC_BATCH_SIZE=5000 is above Amplitude's 2000 events per request",
        ),
        (
            STATUS,
            {"AMPSYNC_LEASE_SECONDS": "soon"},
            "AMPSYNC_LEASE_SECONDS='soon': Input should be a valid integer",
        ),
        (
            STATUS,
            {"CELERY_BROKER_URL": "amqp://guest@localhost"},
            "CELERY_BROKER_URL='amqp://guest@localhost': must be a Redis URL",
        ),
        (
            STATUS,
            {"AMPSYNC_DATABASE_URL": "postgresql+psycopg://postgres:secret@127.0.0.1:5999/dwh"},
            "AMPSYNC_DATABASE_URL: cannot reach the database at postgresql+psycopg://postgres:***@127.0.0.1:5999/dwh",
        ),
        (WORKER, {"CELERY_BROKER_URL": REDIS_URL}, "AMPLITUDE_API_KEY is not set"),
        (WORKER, {"AMPLITUDE_API_KEY": API_KEY}, "CELERY_BROKER_URL is not set"),
        (
            WORKER,
            {"AMPLITUDE_API_KEY": API_KEY, "CELERY_BROKER_URL": "redis://127.0.0.1:6399/0"},
            "CELERY_BROKER_URL: cannot reach Redis at redis://127.0.0.1:6399/0",
        ),
        (
            WORKER,
            {
                "AMPLITUDE_API_KEY": API_KEY,
                "CELERY_BROKER_URL": REDIS_URL,
                "AMPSYNC_DATABASE_URL": PG_URL,
                "AMPSYNC_QUEUE_TABLE": "no_such_queue",
            },
            "queue table no_such_queue does not exist: run `ampsync init-db`",
        ),
    ],
    ids=[
        "region",
        "db-url",
        "table-name",
        "server-url",
        "batch-size",
        "lease",
        "broker-scheme",
        "db-unreachable",
        "worker-no-key",
        "worker-no-broker",
        "worker-broker-down",
        "worker-no-table",
    ],
)
def test_a_wrong_setting_stops_with_one_line_naming_the_variable(command, env, expected, tmp_path):
    # given a setting that is wrong; when the command starts
    result = run(command, env, tmp_path)
    # then it stops, and the last thing it says is one line that names the problem
    assert result.returncode == (2 if command is STATUS else 1)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ampsync: ") and expected in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "secret" not in result.stderr


def test_settings_are_read_from_a_dotenv_file_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("AMPLITUDE_REGION=eu\nAMPSYNC_SYNC_INTERVAL=15\n")
    for name in ("AMPLITUDE_REGION", "AMPSYNC_SYNC_INTERVAL", "AMPLITUDE_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    s = settings.load()
    assert s.server_url == "https://api.eu.amplitude.com" and s.sync_interval == 15


def test_the_api_key_is_never_shown_in_a_settings_error(monkeypatch):
    monkeypatch.setenv("AMPLITUDE_API_KEY", "x" * 3)
    monkeypatch.setenv("AMPSYNC_MAX_ATTEMPTS", "0")
    with pytest.raises(settings.SettingsError) as error:
        settings.load()
    assert "AMPSYNC_MAX_ATTEMPTS" in str(error.value) and "xxx" not in str(error.value)
