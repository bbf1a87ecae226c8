"""`ampsync create-login NAME` (compose's `init`, as `sa`): create or update the workers'
least-privilege SQL Server login NAME with the password in AMPSYNC_WORKER_PASSWORD (never on a
command line), and grant it what tasks/db/logins.py lists. Exit 0 when done; 2 with one line
when the name, the password or the database is wrong."""

from __future__ import annotations

import os

from sqlalchemy.exc import SQLAlchemyError

from .. import settings as settings_module
from ..db.engine import describe_db_error, make_engine
from ..db.logins import LoginError, create_worker_login
from ..db.schema import define_tables
from ..settings import SettingsError

PASSWORD_VARIABLE = "AMPSYNC_WORKER_PASSWORD"


def command(login: str) -> int:
    s = settings_module.get()
    if not s.database_url.startswith("mssql"):
        raise SettingsError(
            "AMPSYNC_DATABASE_URL: the workers' login is created on SQL Server only"
        )
    password = os.environ.get(PASSWORD_VARIABLE, "")
    engine = make_engine(s.database_url)
    try:
        create_worker_login(engine, define_tables(s.queue_table), login, password)
    except LoginError as exc:
        raise SettingsError(f"{PASSWORD_VARIABLE} / login: {exc}") from None
    except SQLAlchemyError as exc:
        raise SettingsError(describe_db_error(exc, s.database_url)) from None
    finally:
        engine.dispose()
    print(f"login {login}: SELECT, INSERT, UPDATE, DELETE on {s.queue_table} and its tables")
    return 0
