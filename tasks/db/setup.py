"""`ampsync init-db`: create what the database lacks of ampsync's tables (never drop or alter),
print that DDL for a DBA, create the database itself, and the start-up check that names
anything missing in one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, cast

from sqlalchemy import Column, Connection, Engine, Index, Table, func, inspect, literal, select
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateIndex, CreateTable, DDLElement
from sqlalchemy.sql.compiler import DDLCompiler

from ..settings import SettingsError
from .engine import make_engine
from .schema import QueueTables


class _AddColumn(DDLElement):
    def __init__(self, table: Table, column: Column[Any]) -> None:
        self.table, self.column = table, column


@compiles(_AddColumn)
def _add_column(element: _AddColumn, compiler: DDLCompiler, **kw: Any) -> str:
    ddl = compiler.sql_compiler.preparer
    col_spec = compiler.get_column_specification(element.column)
    keyword = "ADD" if compiler.dialect.name == "mssql" else "ADD COLUMN"
    return f"ALTER TABLE {ddl.format_table(element.table)} {keyword} {col_spec}"


def missing_ddl(conn: Connection, tables: QueueTables) -> list[DDLElement]:
    """DDL for what the database lacks: tables, ampsync's columns, indexes. Never drops or alters."""
    insp = inspect(conn)
    statements: list[DDLElement] = []
    for table in tables.metadata.sorted_tables:
        if not insp.has_table(table.name, schema=table.schema):
            statements.append(CreateTable(table))
            statements.extend(CreateIndex(ix) for ix in _sorted(table.indexes))
            continue
        present = {c["name"].lower() for c in insp.get_columns(table.name, schema=table.schema)}
        for column in table.columns:
            if column.name.lower() not in present:
                if column.info.get("owner") != "ampsync" and table is tables.queue:
                    continue  # a user column missing is reported by check_table, not added
                statements.append(_AddColumn(table, column))
        # Index names are Optional in SQLAlchemy's types; ampsync names every index it defines,
        # and reflection leaves out SQL Server's unnamed heap entry.
        have_ix = {
            cast(str, ix["name"]).lower()
            for ix in insp.get_indexes(table.name, schema=table.schema)
        }
        statements.extend(
            CreateIndex(ix)
            for ix in _sorted(table.indexes)
            if cast(str, ix.name).lower() not in have_ix
        )
    return statements


def create_ddl(tables: QueueTables) -> list[DDLElement]:
    """The DDL of a database that has none of ampsync's tables yet."""
    statements: list[DDLElement] = []
    for table in tables.metadata.sorted_tables:
        statements.append(CreateTable(table))
        statements.extend(CreateIndex(ix) for ix in _sorted(table.indexes))
    return statements


def _sorted(indexes: Iterable[Index]) -> list[Index]:
    return sorted(indexes, key=lambda ix: cast(str, ix.name))  # all named (db/schema.py)


def compile_ddl(statements: Iterable[DDLElement], dialect: Dialect) -> str:
    sep = "\nGO\n" if dialect.name == "mssql" else ";\n"
    body = sep.join(str(s.compile(dialect=dialect)).strip() for s in statements)
    return body + (sep if body else "")


# Building an index on a table with more rows than this is worth a warning: it takes a while
# and, without ONLINE = ON (Enterprise edition), blocks the table's writers meanwhile.
LARGE_TABLE_ROWS = 100_000


def applock_sql(tables: QueueTables, timeout_ms: int = 120_000) -> str:
    """SQL Server: an exclusive application lock on the queue's name, held until the DDL's
    transaction ends, so that two `init-db` starting at once do not both create (the second
    would fail, error 2714); the second waits, then finds everything there."""
    name = tables.queue.fullname  # letters, digits, _ and one dot (settings.py)
    return (
        "DECLARE @lock INT;\n"
        f"EXEC @lock = sp_getapplock @Resource = N'ampsync init-db {name}', "
        f"@LockMode = 'Exclusive', @LockOwner = 'Transaction', @LockTimeout = {int(timeout_ms)};\n"
        "IF @lock < 0 THROW 50000, "
        f"'ampsync init-db: another init-db of {name} held its lock too long', 1"
    )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def large_table_warnings(
    conn: Connection, tables: QueueTables, ddl: list[DDLElement], rows: int = LARGE_TABLE_ROWS
) -> list[str]:
    """One line per existing table that is to get indexes while it holds over `rows` rows."""
    created = {s.element for s in ddl if isinstance(s, CreateTable)}
    by_table: dict[Table, list[str]] = {}
    for statement in ddl:
        if isinstance(statement, CreateIndex):
            index = statement.element
            if index.table is not None and index.table not in created:
                by_table.setdefault(index.table, []).append(cast(str, index.name))
    lines = []
    for table, names in by_table.items():
        sample = select(literal(1).label("x")).select_from(table).limit(rows + 1).subquery()
        if conn.execute(select(func.count()).select_from(sample)).scalar_one() > rows:
            lines.append(
                f"ampsync init-db: building {', '.join(names)} on {table.fullname}, which has "
                f"over {rows:,} rows: this takes a while and blocks writers to the table; to "
                "choose the time, `ampsync init-db --print-sql` prints the DDL to apply by hand"
            )
    return lines


def init_db(
    engine: Engine,
    tables: QueueTables,
    warn: Callable[[str], None] = _stderr,
    large_rows: int = LARGE_TABLE_ROWS,
) -> list[str]:
    """Create whatever is missing; return the statements run. On SQL Server under an
    application lock (`applock_sql`); a warning (stderr) before indexes are built on a
    large existing table."""
    with engine.begin() as conn:
        if conn.dialect.name == "mssql":
            conn.exec_driver_sql(applock_sql(tables))
        ddl = missing_ddl(conn, tables)
        for line in large_table_warnings(conn, tables, ddl, large_rows):
            warn(line)
        for statement in ddl:
            conn.execute(statement)
    return [str(s.compile(dialect=engine.dialect)).strip() for s in ddl]


def check_table(conn: Connection, tables: QueueTables) -> str | None:
    """One line naming what is missing from the queue table, or None when it is complete."""
    insp = inspect(conn)
    q = tables.queue
    if not insp.has_table(q.name, schema=q.schema):
        return f"queue table {tables.queue.fullname} does not exist: run `ampsync init-db`"
    present = {c["name"].lower() for c in insp.get_columns(q.name, schema=q.schema)}
    missing = [c.name for c in q.columns if c.name.lower() not in present]
    for own in (tables.endpoints, tables.runs):
        if not insp.has_table(own.name, schema=q.schema):
            missing.append(f"table {own.fullname}")
    if missing:
        return (
            f"queue table {q.fullname} lacks {', '.join(missing)}: run `ampsync init-db` "
            "(it only adds what is missing)"
        )
    return None


# --- create-database ----------------------------------------------------------------------

# The database a server always has, to connect to while the target may not exist yet.
_SERVER_DATABASE = {
    "mssql": "master",
    "postgresql": "postgres",
    "mysql": "information_schema",
    "mariadb": "information_schema",
}


def create_database_sql(dialect: Dialect, name: str) -> tuple[str, str]:
    """(query that returns a row when the database exists, statement that creates it)."""
    quoted = dialect.identifier_preparer.quote_identifier(name)
    literal = name.replace("'", "''")
    if dialect.name == "mssql":
        return (
            f"SELECT name FROM sys.databases WHERE name = N'{literal}'",
            f"IF DB_ID(N'{literal}') IS NULL CREATE DATABASE {quoted}",
        )
    if dialect.name == "postgresql":
        return (
            f"SELECT datname FROM pg_database WHERE datname = '{literal}'",
            f"CREATE DATABASE {quoted}",
        )
    return (
        f"SELECT schema_name FROM information_schema.schemata WHERE schema_name = '{literal}'",
        f"CREATE DATABASE IF NOT EXISTS {quoted}",
    )


def create_database(url: str) -> tuple[str, bool] | None:
    """Create the database the URL names when its server lacks it; (name, created), or None for
    SQLite (its file is created on first use). Safe to run on every start, also concurrently."""
    target = make_url(url)
    backend = target.get_backend_name()
    if backend == "sqlite" or not target.database:
        return None
    if backend not in _SERVER_DATABASE:
        raise SettingsError(f"AMPSYNC_DATABASE_URL: --create-database does not support {backend}")
    server_url = target.set(database=_SERVER_DATABASE[backend]).render_as_string(False)
    # CREATE DATABASE may not run inside a transaction (SQL Server, PostgreSQL).
    engine = make_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    exists_sql, create_sql = create_database_sql(engine.dialect, target.database)
    try:
        with engine.connect() as conn:
            if conn.exec_driver_sql(exists_sql).first():
                return target.database, False
            try:
                conn.exec_driver_sql(create_sql)
            except SQLAlchemyError:
                if conn.exec_driver_sql(exists_sql).first():  # another init created it first
                    return target.database, False
                raise
            return target.database, True
    finally:
        engine.dispose()
