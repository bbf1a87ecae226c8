"""`ampsync check [--json]`: prints what tasks/db/check.py found, one line per check, and exits
0 only when nothing failed (1 otherwise; 2, with one line, when the settings are wrong or the
database cannot be reached at all)."""

from __future__ import annotations

import json

from sqlalchemy.exc import SQLAlchemyError

from .. import settings as settings_module
from ..db import check
from ..db.engine import describe_db_error
from ..settings import SettingsError

_WIDTH = max(len(s) for s in (check.OK, check.FAILED, check.SKIPPED)) + 2


def render(report: check.Report) -> str:
    return "\n".join(
        f"{r.status:<{_WIDTH}}{r.name}" + (f": {r.detail}" if r.detail else "")
        for r in report.results
    )


def command(as_json: bool = False) -> int:
    """`ampsync check [--json]` (wired in tasks/cli/main.py)."""
    s = settings_module.get()
    try:
        report = check.run(s)
    except SQLAlchemyError as exc:
        raise SettingsError(
            "AMPSYNC_DATABASE_URL: " + describe_db_error(exc, s.database_url)
        ) from None
    if as_json:
        print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    else:
        print(render(report))
    return 0 if report.ok else 1
