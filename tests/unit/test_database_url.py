"""AMPSYNC_DATABASE_URL: the common short schemes mean the drivers ampsync installs, and a URL
whose driver this Python lacks is refused when the settings are read, in one line that says
what to install (a worker must not start and then fail every task)."""

from __future__ import annotations

import pytest

from tasks import settings
from tasks.settings import Settings


def load_with(monkeypatch, tmp_path, url: str) -> Settings:
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("AMPSYNC_DATABASE_URL", url)
    return settings.load()


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://u:pw@db:5432/dwh", "postgresql+psycopg://u:pw@db:5432/dwh"),
        ("postgresql://u:pw@db/dwh", "postgresql+psycopg://u:pw@db/dwh"),
        ("mysql://root@db:3306/dwh", "mysql+pymysql://root@db:3306/dwh"),
        ("mariadb://root@db/dwh", "mariadb+pymysql://root@db/dwh"),
        ("mssql://sa:pw@db:1433/dwh", "mssql+pymssql://sa:pw@db:1433/dwh"),
        # explicit drivers and SQLite are kept as written
        ("postgresql+psycopg://u@db/dwh", "postgresql+psycopg://u@db/dwh"),
        ("mysql+pymysql://root@db/dwh", "mysql+pymysql://root@db/dwh"),
        ("sqlite:///ampsync.db", "sqlite:///ampsync.db"),
    ],
)
def test_a_bare_scheme_means_the_driver_ampsync_installs(monkeypatch, tmp_path, given, used):
    # given a URL as people write it; when the settings are read
    s = load_with(monkeypatch, tmp_path, given)
    # then the URL names the driver ampsync installs, not SQLAlchemy's default
    assert s.database_url == used


def test_a_password_with_reserved_characters_survives_the_rewrite(monkeypatch, tmp_path):
    s = load_with(monkeypatch, tmp_path, "postgres://u:p%40ss%2Fw@db/dwh")
    assert s.database_url == "postgresql+psycopg://u:p%40ss%2Fw@db/dwh"


@pytest.mark.parametrize(
    ("url", "names"),
    [
        # drivers this test environment does not have (ampsync never installs them)
        ("postgresql+psycopg2://u:secret1@db/dwh", ["psycopg2", "'ampsync[postgresql]'"]),
        ("mysql+mysqldb://root:secret1@db/dwh", ["mysqldb", "MySQLdb", "'ampsync[mysql]'"]),
        ("postgresql+asyncpg://u:secret1@db/dwh", ["asyncpg", "postgresql://"]),
    ],
)
def test_a_driver_that_is_not_installed_is_refused_in_one_line_naming_what_to_install(
    monkeypatch, tmp_path, url, names
):
    # given a URL whose driver is not installed; when the settings are read
    with pytest.raises(settings.SettingsError) as refused:
        load_with(monkeypatch, tmp_path, url)
    # then one line names the variable, the driver and what to install, and hides the password
    line = str(refused.value)
    assert line.startswith("ampsync: AMPSYNC_DATABASE_URL=") and "\n" not in line
    assert "is not installed" in line and all(n in line for n in names), line
    assert "secret1" not in line


def test_a_database_sqlalchemy_does_not_know_is_refused_in_one_line(monkeypatch, tmp_path):
    with pytest.raises(settings.SettingsError) as refused:
        load_with(monkeypatch, tmp_path, "oracle9://scott@db/orcl")
    line = str(refused.value)
    assert "knows no database 'oracle9'" in line and "\n" not in line


def test_the_settings_error_is_a_normal_exception_not_an_exit():
    # a Python shell or web app that imports tasks catches it like any ValueError; SystemExit
    # would close the interpreter
    assert issubclass(settings.SettingsError, ValueError)
    assert not issubclass(settings.SettingsError, SystemExit)
