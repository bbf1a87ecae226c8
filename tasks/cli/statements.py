"""`ampsync statements`: every statement ampsync can send to the configured database, as its
driver sends it, grouped by what it does (tasks/db/catalog.py builds the list). Needs no
server: a DBA reviews it before granting, and it is what the SQL Server tests check."""

from __future__ import annotations

import sys
from typing import Any

from .. import feeds
from .. import settings as settings_module
from ..db import catalog, schema
from ..settings import Settings, mask_url


def render(s: Settings) -> str:
    """The whole listing for the settings' database."""
    dialect = catalog.dialect_for(s.database_url)
    tables = schema.define_tables(s.queue_table)
    declared: list[Any] | None = None
    try:
        config = feeds.config_for(s)
        declared = list(config.feeds.values()) or None
    except feeds.FeedError as exc:
        print(
            f"ampsync: feeds file not read ({str(exc).splitlines()[0]}); showing example feeds",
            file=sys.stderr,
        )
    entries = catalog.statements(tables, dialect, catalog.Values.from_settings(s), declared)
    sep = "\nGO\n" if dialect.name == "mssql" else ";\n"
    how = (
        "as pymssql sends them: every value pasted into the text by the driver"
        if dialect.name == "mssql"
        else "compiled with their values inlined"
    )
    lines = [
        f"-- ampsync statements for {mask_url(s.database_url)} ({dialect.name}+{dialect.driver}),",
        f"-- queue table {tables.queue.fullname}, {how}; representative values for the",
        f"-- current settings ({len(entries)} statements).",
    ]
    group = None
    for entry in entries:
        if entry.group != group:
            group = entry.group
            lines.append(f"\n-- ==== {group} " + "=" * max(0, 80 - len(group) - 9))
        lines.append(f"\n-- {entry.name}" + (f" ({entry.note})" if entry.note else ""))
        lines.append(entry.sql + sep.rstrip("\n"))
    return "\n".join(lines) + "\n"


def cmd_statements() -> int:
    """`ampsync statements` (wired in tasks/cli/main.py)."""
    sys.stdout.write(render(settings_module.get()))
    return 0
