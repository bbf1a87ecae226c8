"""A worker process that big rows left large is replaced (issue 15, point 7):
AMPSYNC_WORKER_MAX_MEMORY_MB becomes Celery's worker_max_memory_per_child."""

from __future__ import annotations

import pytest

from tasks import settings
from tasks.settings import Settings
from tasks.worker import app as worker_app


@pytest.fixture
def configure():
    """Configure the Celery app from given settings; the process's own settings after."""
    yield lambda **env: worker_app._configure(Settings(_env_file=None, **env))
    worker_app._configure(settings.get())


@pytest.mark.parametrize(
    ("value", "expected_kib"),
    [(None, 512 * 1024), ("300", 300 * 1024), ("0", None)],
    ids=["default: 512 MB", "300 MB", "0: never replaced"],
)
def test_given_a_memory_limit_when_the_app_is_configured_then_celery_replaces_processes_above_it(
    configure, monkeypatch, value, expected_kib
):
    monkeypatch.delenv("AMPSYNC_WORKER_MAX_MEMORY_MB", raising=False)
    configure(**({} if value is None else {"AMPSYNC_WORKER_MAX_MEMORY_MB": value}))
    assert worker_app.app.conf.worker_max_memory_per_child == expected_kib


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_given_a_bad_memory_limit_when_loaded_then_the_process_stops_with_one_line_naming_it(
    monkeypatch, tmp_path, value
):
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("AMPSYNC_WORKER_MAX_MEMORY_MB", value)
    with pytest.raises(settings.SettingsError) as error:
        settings.load()
    message = str(error.value)
    assert message.startswith(f"ampsync: AMPSYNC_WORKER_MAX_MEMORY_MB='{value}': ")
    assert "\n" not in message
