"""`ampsync check`: what a person runs first on their own server.

Three parts, each a list of `Result`s (one line each when printed by tasks/cli/check.py):

1. **server**: the facts that decide how ampsync's statements behave there — version, edition,
   collation, READ_COMMITTED_SNAPSHOT and compatibility level on SQL Server; version,
   encoding or collation and isolation level elsewhere.
2. **permissions**: what the login may do to the queue table and ampsync's own tables
   (SELECT, INSERT, UPDATE, DELETE; CREATE TABLE only while `init-db` has not run), each missing
   one named with the GRANT that gives it.
3. **statements**: every statement the workers send, run through the real functions of
   `queue.py`, `endpoints.py`, `history.py`, `feeds.py` and `reports.py` in a scratch table of
   its own (the queue table's name and a random suffix, built by `init-db`'s own code and
   dropped at the end, also after a failure), never in the real queue.

A failure carries the server's own error text. The README's "SQL Server" section says what
this proves and what only a real server under load shows.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, inspect, select, text, update
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ..amplitude.limits import DEDUP_WINDOW_SECONDS
from ..outcomes import GAVE_UP, INVALID, REJECTED, RETRYING
from ..settings import Settings, mask_url
from . import endpoints, history, queue, reports, setup
from . import feeds as db_feeds
from .engine import make_engine
from .schema import QueueTables, define_tables

OK, FAILED, SKIPPED = "ok", "FAILED", "skipped"
SERVER, PERMISSIONS, STATEMENTS = "server", "permissions", "statements"
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")

# queue.py sends id lists and failed rows' reasons 1,000 ids a statement; the chunked checks
# use more rows than that, so at least two chunks run.
CHUNKED_ROWS = 1050
# Concurrent claims: rows in the table and rows each of the two claims asks for.
RACE_ROWS, RACE_LIMIT = 400, 300
# How long a claim may take while another connection holds some of the rows: it must skip them.
SKIP_TIMEOUT_SECONDS = 20.0
# A rowversion above 2^31: SQL Server types a bare integer literal that large DECIMAL.
BIG_ROWVERSION = 3_000_000_001
# Rows a check stamps as long gone (sent, first tried, finished), for prune and the max-age sweep.
LONG_AGO = datetime(2000, 1, 1)


@dataclass(frozen=True)
class Result:
    section: str  # SERVER, PERMISSIONS or STATEMENTS
    name: str
    status: str  # OK, FAILED or SKIPPED
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "section": self.section,
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
        }


@dataclass
class Report:
    database: str  # the URL, password masked
    dialect: str
    queue_table: str
    scratch_table: str | None = None
    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != FAILED for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "database": self.database,
            "dialect": self.dialect,
            "queue_table": self.queue_table,
            "scratch_table": self.scratch_table,
            "checks": [r.as_dict() for r in self.results],
        }


class CheckFailed(Exception):
    """A check found the database behaving otherwise than ampsync needs; the message says how."""


class Skip(Exception):
    """A check that does not apply to this database; the message says why."""


def server_error(exc: BaseException) -> str:
    """The server's own error text on one line (pymssql's (number, bytes) made readable)."""
    orig = getattr(exc, "orig", None) if isinstance(exc, DBAPIError) else None
    if orig is not None:
        args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
        if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], bytes):
            message = args[1].decode("utf-8", "replace").split("DB-Lib error message")[0]
            return _one_line(f"error {args[0]}: {message}")
        return _one_line(str(orig) or type(orig).__name__)
    return _one_line(
        f"{type(exc).__name__}: {exc}" if not isinstance(exc, CheckFailed) else str(exc)
    )


def _one_line(message: str, limit: int = 600) -> str:
    return " ".join(message.split())[:limit]


def run(settings: Settings, engine: Engine | None = None) -> Report:
    """Every check, in order. The first connection is made outside any check: when the server
    cannot be reached at all, the SQLAlchemyError goes to the caller (one line, exit 2)."""
    tables = define_tables(settings.queue_table)
    engine = engine or make_engine(settings.database_url)
    with engine.connect():
        pass
    report = Report(
        mask_url(settings.database_url), engine.dialect.name, tables.queue.fullname, None, []
    )
    report.results.append(
        Result(SERVER, "database", OK, f"{report.database}, queue table {report.queue_table}")
    )
    report.results += server_facts(engine)
    report.results += permissions(engine, tables, settings.database_url)
    scratch_name = scratch_table_name(settings.queue_table)
    if _least_privilege(engine, tables):
        report.results += [
            Result(
                STATEMENTS,
                name,
                SKIPPED,
                "this login may not create tables, as the workers' own login should not: the "
                "statements run in a scratch table, so run `ampsync check` once with the login "
                "that created the queue table (README, Security)",
            )
            for name, _ in STATEMENT_CHECKS
        ]
        return report
    report.scratch_table = scratch_name
    report.results += statements(engine, settings, scratch_name)
    return report


def _least_privilege(engine: Engine, tables: QueueTables) -> bool:
    """A server login whose queue tables exist and that may not create tables: the workers'
    login of the README's Security section. Its permissions are checked; the statements, which
    need a scratch table, are left to a login that may create one."""
    if engine.dialect.name == "sqlite":
        return False
    try:
        with engine.connect() as conn:
            if not all(_has_table(conn, table) for table in _own_tables(tables)):
                return False
            schema = tables.queue.schema or inspect(conn).default_schema_name or ""
            return not _may_create(conn, schema, _login(conn))[0]
    except SQLAlchemyError:
        return False  # the statements section then says what fails


# --- 1. server facts ---------------------------------------------------------------------------

_MSSQL_FACTS: tuple[tuple[str, str], ...] = (
    (
        "server",
        "SELECT CONCAT('SQL Server ', CAST(SERVERPROPERTY('ProductVersion') AS NVARCHAR(128)), "
        "' (', CAST(SERVERPROPERTY('ProductLevel') AS NVARCHAR(128)), ')')",
    ),
    ("edition", "SELECT CAST(SERVERPROPERTY('Edition') AS NVARCHAR(128))"),
    ("collation", "SELECT CAST(DATABASEPROPERTYEX(DB_NAME(), 'Collation') AS NVARCHAR(128))"),
    (
        "read_committed_snapshot",
        "SELECT CASE is_read_committed_snapshot_on WHEN 1 THEN 'ON' ELSE 'OFF' END "
        "FROM sys.databases WHERE name = DB_NAME()",
    ),
    (
        "compatibility level",
        "SELECT CAST(compatibility_level AS NVARCHAR(8)) FROM sys.databases WHERE name = DB_NAME()",
    ),
    (
        "optimize for ad hoc workloads",
        "SELECT CASE CAST(value_in_use AS INT) WHEN 1 THEN 'ON' ELSE 'OFF' END "
        "FROM sys.configurations WHERE name = 'optimize for ad hoc workloads'",
    ),
    # NOCOUNT set by the server's user options hides row counts from every statement.
    ("NOCOUNT", "SELECT CASE WHEN @@OPTIONS & 512 = 512 THEN 'ON' ELSE 'OFF' END"),
)
_POSTGRESQL_FACTS: tuple[tuple[str, str], ...] = (
    ("server", "SELECT 'PostgreSQL ' || current_setting('server_version')"),
    (
        "encoding and collation",
        "SELECT pg_encoding_to_char(encoding) || ', collation ' || datcollate "
        "FROM pg_database WHERE datname = current_database()",
    ),
    ("default isolation", "SELECT current_setting('default_transaction_isolation')"),
)
_MYSQL_FACTS: tuple[tuple[str, str], ...] = (
    ("server", "SELECT VERSION()"),
    (
        "character set and collation",
        "SELECT CONCAT(@@character_set_database, ', collation ', @@collation_database)",
    ),
)
_SQLITE_FACTS: tuple[tuple[str, str], ...] = (
    ("server", "SELECT 'SQLite ' || sqlite_version()"),
    ("encoding", "PRAGMA encoding"),
    ("journal mode", "PRAGMA journal_mode"),
)
_FACTS = {
    "mssql": _MSSQL_FACTS,
    "postgresql": _POSTGRESQL_FACTS,
    "mysql": _MYSQL_FACTS,
    "mariadb": _MYSQL_FACTS,
    "sqlite": _SQLITE_FACTS,
}
# What the README recommends on SQL Server, shown beside the value when it differs.
_MSSQL_ADVICE = {
    "read_committed_snapshot": (
        "ON",
        "recommended ON: readers of the queue table (reports, your own SELECTs) then never "
        "wait on a claim (README, SQL Server)",
    ),
    "optimize for ad hoc workloads": (
        "ON",
        "recommended ON: pymssql sends every statement as text with its values in it, so the "
        "plan cache fills with single-use plans (README, SQL Server)",
    ),
    "NOCOUNT": ("OFF", "the server's user options set NOCOUNT: row counts read -1"),
}


def server_facts(engine: Engine) -> list[Result]:
    results = []
    dialect = engine.dialect.name
    with engine.connect() as conn:
        for name, sql in _FACTS.get(dialect, ()):
            try:
                with conn.begin():
                    value = conn.execute(text(sql)).scalar()
            except SQLAlchemyError as exc:
                results.append(Result(SERVER, name, SKIPPED, f"not readable: {server_error(exc)}"))
                continue
            shown = _one_line(str(value))
            advice = _MSSQL_ADVICE.get(name) if dialect == "mssql" else None
            if advice and shown != advice[0]:
                shown += f" ({advice[1]})"
            results.append(Result(SERVER, name, OK, shown))
        try:
            isolation = str(conn.get_isolation_level())
        except (SQLAlchemyError, NotImplementedError) as exc:
            results.append(Result(SERVER, "isolation", SKIPPED, server_error(exc)))
        else:
            note = {
                "mssql": "READPAST needs it (docs/sqlserver.md)",
                "sqlite": "one writer at a time",
            }.get(dialect, "")
            results.append(
                Result(SERVER, "isolation", OK, isolation + (f", {note}" if note else ""))
            )
    return results


# --- 2. permissions ----------------------------------------------------------------------------


def _own_tables(tables: QueueTables) -> list[Any]:
    return [tables.queue, tables.endpoints, tables.runs, tables.feeds, tables.feed_state]


def permissions(engine: Engine, tables: QueueTables, url: str) -> list[Result]:
    dialect = engine.dialect.name
    try:
        if dialect == "sqlite":
            return _sqlite_permissions(engine, tables, url)
        with engine.connect() as conn:
            return _server_permissions(conn, tables)
    except Exception as exc:  # any failure here is one line, not a traceback
        return [Result(PERMISSIONS, "permissions", FAILED, server_error(exc))]


def _sqlite_permissions(engine: Engine, tables: QueueTables, url: str) -> list[Result]:
    path = make_url(url).database or ""
    if path in ("", ":memory:"):
        return [Result(PERMISSIONS, "database file", SKIPPED, "an in-memory database")]
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    problems = []
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        problems.append(f"{path} is not readable and writable by this user")
    # WAL mode writes <file>-wal and <file>-shm beside it: the folder must be writable too.
    if not os.access(folder, os.W_OK | os.X_OK):
        problems.append(f"the folder {folder} is not writable by this user (WAL files)")
    results = [
        Result(
            PERMISSIONS,
            "database file",
            FAILED if problems else OK,
            "; ".join(problems) + " (chmod/chown it)" if problems else f"{path} writable",
        )
    ]
    with engine.connect() as conn:
        missing = [t.fullname for t in _own_tables(tables) if not _has_table(conn, t)]
    results.append(_tables_result(missing, creatable=not problems, grant=""))
    return results


def _has_table(conn: Connection, table: Any) -> bool:
    return bool(inspect(conn).has_table(table.name, schema=table.schema))


def _tables_result(missing: list[str], creatable: bool, grant: str) -> Result:
    if not missing:
        return Result(PERMISSIONS, "tables", OK, "the queue table and ampsync's tables exist")
    what = ", ".join(missing) + " missing"
    if creatable:
        return Result(
            PERMISSIONS, "tables", OK, f"{what}; this login may create them: run `ampsync init-db`"
        )
    return Result(
        PERMISSIONS,
        "tables",
        FAILED,
        f"{what}, and this login may not create them: run {grant}, or have a DBA apply "
        "`ampsync init-db --print-sql`",
    )


def _server_permissions(conn: Connection, tables: QueueTables) -> list[Result]:
    dialect = conn.dialect.name
    preparer = conn.dialect.identifier_preparer
    default_schema = inspect(conn).default_schema_name or ""
    schema = tables.queue.schema or default_schema
    login = _login(conn)
    results = [Result(PERMISSIONS, "login", OK, f"{login} (schema {schema})")]
    grantee = login if dialect in ("mysql", "mariadb") else preparer.quote(login)
    missing_tables = []
    for table in _own_tables(tables):
        name = (
            f"{preparer.quote_schema(table.schema or default_schema)}.{preparer.quote(table.name)}"
        )
        if not _has_table(conn, table):
            missing_tables.append(name)
            continue
        held = _privileges(conn, name, table)
        lacking = [p for p in PRIVILEGES if p not in held]
        grants = [table_grant(lacking, name, grantee)] if lacking else []
        if dialect == "postgresql" and "id" in table.c:
            sequence = conn.execute(
                text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": name}
            ).scalar()
            if (
                sequence
                and not conn.execute(
                    text("SELECT has_sequence_privilege(:s, 'USAGE')"), {"s": sequence}
                ).scalar()
            ):
                lacking.append(f"USAGE on {sequence}")
                grants.append(f"GRANT USAGE ON SEQUENCE {sequence} TO {grantee};")
        results.append(
            Result(
                PERMISSIONS,
                f"permissions on {name}",
                FAILED if grants else OK,
                f"{', '.join(lacking)} missing: {' '.join(grants)}"
                if grants
                else ", ".join(PRIVILEGES),
            )
        )
    if dialect == "postgresql":
        usage = conn.execute(
            text("SELECT has_schema_privilege(:s, 'USAGE')"), {"s": schema}
        ).scalar()
        if not usage:
            results.append(
                Result(
                    PERMISSIONS,
                    f"schema {schema}",
                    FAILED,
                    f"USAGE missing: GRANT USAGE ON SCHEMA {preparer.quote_schema(schema)} "
                    f"TO {grantee};",
                )
            )
    creatable, grant = _may_create(conn, schema, grantee)
    results.append(_tables_result(missing_tables, creatable, grant))
    return results


def _login(conn: Connection) -> str:
    sql = {
        "mssql": "SELECT USER_NAME()",
        "postgresql": "SELECT current_user",
    }.get(conn.dialect.name, "SELECT CURRENT_USER()")
    login = str(conn.execute(text(sql)).scalar())
    if conn.dialect.name in ("mysql", "mariadb"):
        user, _, host = login.rpartition("@")
        return f"'{user}'@'{host}'"
    return login


def _mysql_grantees(conn: Connection) -> list[str]:
    """The current account and the roles enabled for it, as information_schema names them."""
    grantees = [_login(conn)]
    try:
        roles = conn.execute(text("SELECT ROLE_NAME FROM information_schema.ENABLED_ROLES"))
        for (role,) in roles:
            grantees += [f"'{role}'", f"'{role}'@''", f"'{role}'@'%'"]
    except SQLAlchemyError:
        pass  # MySQL before 8, or no roles
    return grantees


def _mysql_privileges(conn: Connection, schema: str, table: str | None) -> set[str]:
    """Privileges on `schema`.`table` (or on the schema) from global, schema and table grants."""
    grantees = _mysql_grantees(conn)
    params: dict[str, Any] = {"schema": schema, "table": table or ""}
    names = ", ".join(f":g{i}" for i in range(len(grantees)))
    params.update({f"g{i}": g for i, g in enumerate(grantees)})
    sql = (
        f"SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE IN ({names}) "
        f"UNION SELECT PRIVILEGE_TYPE FROM information_schema.SCHEMA_PRIVILEGES "
        f"WHERE GRANTEE IN ({names}) AND :schema LIKE TABLE_SCHEMA"
    )
    if table:
        sql += (
            f" UNION SELECT PRIVILEGE_TYPE FROM information_schema.TABLE_PRIVILEGES "
            f"WHERE GRANTEE IN ({names}) AND TABLE_SCHEMA = :schema AND TABLE_NAME = :table"
        )
    return {str(p).upper() for p in conn.execute(text(sql), params).scalars()}


def _privileges(conn: Connection, name: str, table: Any) -> set[str]:
    dialect = conn.dialect.name
    if dialect == "postgresql":
        checks = ", ".join(f"has_table_privilege(:t, '{p}')" for p in PRIVILEGES)
        row = conn.execute(text(f"SELECT {checks}"), {"t": name}).one()
    elif dialect == "mssql":
        checks = ", ".join(f"HAS_PERMS_BY_NAME(:t, 'OBJECT', '{p}')" for p in PRIVILEGES)
        row = conn.execute(text(f"SELECT {checks}"), {"t": name}).one()
    else:
        schema = table.schema or inspect(conn).default_schema_name or ""
        return _mysql_privileges(conn, schema, table.name)
    return {p for p, held in zip(PRIVILEGES, row, strict=True) if held}


def _may_create(conn: Connection, schema: str, grantee: str) -> tuple[bool, str]:
    """Whether the login may create ampsync's tables and indexes there, and the GRANT if not."""
    dialect = conn.dialect.name
    grant = " ".join(create_grants(conn.dialect, schema, grantee))
    if dialect == "postgresql":
        ok = conn.execute(text("SELECT has_schema_privilege(:s, 'CREATE')"), {"s": schema}).scalar()
        return bool(ok), grant
    if dialect == "mssql":
        row = conn.execute(
            text(
                "SELECT HAS_PERMS_BY_NAME(DB_NAME(), 'DATABASE', 'CREATE TABLE'), "
                "HAS_PERMS_BY_NAME(:s, 'SCHEMA', 'ALTER')"
            ),
            {"s": schema},
        ).one()
        return bool(row[0]) and bool(row[1]), grant
    held = _mysql_privileges(conn, schema, None)
    return all(p in held for p in _MYSQL_CREATE), grant


_MYSQL_CREATE = ("CREATE", "INDEX")


def table_grant(privileges: list[str], name: str, grantee: str) -> str:
    """The GRANT of `privileges` on a table (name and grantee quoted as the database wants)."""
    return f"GRANT {', '.join(privileges)} ON {name} TO {grantee};"


def create_grants(dialect: Dialect, schema: str, grantee: str) -> list[str]:
    """What a login needs to create ampsync's tables and indexes in `schema` (init-db, and the
    scratch table of `ampsync check`)."""
    quoted = dialect.identifier_preparer.quote_schema(schema)
    if dialect.name == "postgresql":
        return [f"GRANT CREATE ON SCHEMA {quoted} TO {grantee};"]
    if dialect.name == "mssql":
        return [
            f"GRANT CREATE TABLE TO {grantee};",
            f"GRANT ALTER ON SCHEMA::{quoted} TO {grantee};",
        ]
    return [f"GRANT {', '.join(_MYSQL_CREATE)} ON {quoted}.* TO {grantee};"]


def required_grants(dialect: Dialect, tables: QueueTables, grantee: str, schema: str) -> list[str]:
    """The GRANTs of the workers' login: the four privileges on each table, then what init-db
    needs (on PostgreSQL `check` also names USAGE on each id sequence). For the README's test."""
    preparer = dialect.identifier_preparer
    lines = [
        table_grant(
            list(PRIVILEGES),
            f"{preparer.quote_schema(t.schema or schema)}.{preparer.quote(t.name)}",
            grantee,
        )
        for t in _own_tables(tables)
    ]
    return lines + create_grants(dialect, schema, grantee)


# --- 3. the workers' statements in a scratch table -----------------------------------------------


def scratch_table_name(queue_table: str) -> str:
    """The queue table's name and a random suffix, in its schema, short enough that every
    index and table named after it stays within each database's identifier limit (63)."""
    schema, _, name = queue_table.rpartition(".")
    suffix = f"_chk_{secrets.token_hex(4)}"
    name = name[: 40 - len(suffix)] + suffix
    return f"{schema}.{name}" if schema else name


@dataclass
class _Scratch:
    engine: Engine
    settings: Settings
    tables: QueueTables

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def lease(self) -> float:
        return float(self.settings.lease_seconds)

    def clear(self) -> None:
        with self.engine.begin() as conn:
            for table in reversed(self.tables.metadata.sorted_tables):
                conn.execute(delete(table))

    def insert(self, rows: list[dict[str, Any]]) -> list[int]:
        """Insert rows as a user's SQL would; their ids in order."""
        with self.engine.begin() as conn:
            return queue.insert_rows_ids(conn, self.tables, rows)

    def rows(self, ids: list[int] | None = None) -> dict[int, dict[str, Any]]:
        q = self.tables.queue
        statement = select(q).order_by(q.c.id)
        with self.engine.connect() as conn:
            found = {r.id: dict(r._mapping) for r in conn.execute(statement)}
        return {i: found[i] for i in ids if i in found} if ids is not None else found

    def statuses(self, ids: list[int] | None = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows(ids).values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts

    def set_times(self, ids: list[int], **values: datetime) -> None:
        q = self.tables.queue
        with self.engine.begin() as conn:
            conn.execute(update(q).where(q.c.id.in_(ids)).values(**values))


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _identify(user: str | None, n: int, device: str | None = None) -> dict[str, Any]:
    return {
        "kind": "identify",
        "user_id": user,
        "device_id": device,
        "properties": f'{{"plan": "gold ✓ {n}", "name": "O\'Brien"}}',
    }


def _event(user: str, n: int) -> dict[str, Any]:
    return {
        "kind": "event",
        "user_id": user,
        "event_type": "Order Picked Up ✓",
        "insert_id": f"check-{n}",
        "properties": f'{{"n": {n}}}',
    }


def _group(value: str, n: int) -> dict[str, Any]:
    return {
        "kind": "group_identify",
        "group_type": "company",
        "group_value": value,
        "properties": f'{{"seats": {n}}}',
    }


# Text a server stores only as NVARCHAR / UTF-8 survives: Cyrillic, a quote, a check mark.
_USER = "check-Алиса'✓"


def _claim_kind(kind: str) -> Callable[[_Scratch], str]:
    def check(x: _Scratch) -> str:
        if kind == "identify":
            rows = [_identify(_USER, 1), _identify(_USER, 2), _identify(None, 3, "check-device")]
            later = _identify(_USER, 4)
        elif kind == "group_identify":
            rows = [_group("Acme Ü", 1), _group("Acme Ü", 2), _group("Tiny", 3)]
            later = _group("Acme Ü", 4)
        else:
            rows = [_event(_USER, n) for n in range(3)]
            later = _event(_USER, 3)
        ids = x.insert(rows)
        with x.engine.connect() as conn:
            claim = queue.claim(conn, x.tables, kind, 10, x.lease)
            _expect(claim.rows == 3, f"claimed {claim.rows} of 3 due rows")
            # A send that waited in the broker longer than its lease allows renews it first.
            loaded = queue.renew_and_load(conn, x.tables, claim.token, x.lease, x.lease + 60)
            _expect(
                [r.id for r in loaded] == ids,
                f"loaded ids {[r.id for r in loaded]}, expected {ids} in id order",
            )
            first = loaded[0]
            value = first.user_id if kind != "group_identify" else first.group_value
            expected = rows[0]["user_id"] if kind != "group_identify" else rows[0]["group_value"]
            _expect(value == expected, f"text came back as {value!r}, not {expected!r}")
            deferred = queue.defer_out_of_order(conn, x.tables, kind, claim.token)
            _expect(not deferred, f"rows {sorted(deferred)} deferred, none expected")
            x.insert([later])
            again = queue.claim(conn, x.tables, kind, 10, x.lease)
        if kind == "event":
            _expect(again.rows == 1, f"a later event was claimed {again.rows} times, not once")
            return (
                "3 rows claimed, renewed and loaded in id order, text intact; events go in "
                "any order"
            )
        _expect(
            again.rows == 0,
            "a later row of the same key was claimed while an earlier one was in flight",
        )
        return (
            "3 rows claimed, renewed and loaded in id order, text intact; a later row of the "
            "same key waits while an earlier one is in flight"
        )

    return check


def _claim_race(x: _Scratch) -> str:
    ids = x.insert([_event(f"race-{n:04d}", n) for n in range(RACE_ROWS)])
    start = threading.Barrier(2)

    def claim_one() -> list[int]:
        with x.engine.connect() as conn:
            start.wait(30)
            claim = queue.claim(conn, x.tables, "event", RACE_LIMIT, x.lease)
            return [r.id for r in queue.load(conn, x.tables, claim.token)]

    with ThreadPoolExecutor(2) as pool:
        first, second = [f.result() for f in [pool.submit(claim_one), pool.submit(claim_one)]]
    twice = set(first) & set(second)
    _expect(not twice, f"{len(twice)} rows claimed by both connections, e.g. {sorted(twice)[:5]}")
    _expect(
        set(first) | set(second) == set(ids),
        f"{len(set(ids) - set(first) - set(second))} due rows claimed by neither",
    )
    return f"{RACE_ROWS} rows: {len(first)} and {len(second)}, none twice"


def _claim_skips_held_rows(x: _Scratch) -> str:
    if x.dialect == "sqlite":
        raise Skip("SQLite runs one writer at a time; there are no row locks to skip")
    ids = x.insert([_event(f"held-{n:04d}", n) for n in range(200)])
    pick, _ = queue.claim_statement(x.tables, "event", 50, x.lease, "0" * 32)
    holder = x.engine.connect()
    transaction = holder.begin()
    try:
        held = list(holder.execute(pick).scalars())  # locked as a claim in progress locks them
        _expect(len(held) == 50, f"the holding connection locked {len(held)} rows, not 50")
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(_claim_and_load, x, 400)
            try:
                got = future.result(timeout=SKIP_TIMEOUT_SECONDS)
            except TimeoutError:
                transaction.rollback()
                future.result()
                raise CheckFailed(
                    f"a claim waited over {SKIP_TIMEOUT_SECONDS:g} s on rows another claim "
                    "holds instead of skipping them"
                ) from None
    finally:
        if transaction.is_active:
            transaction.rollback()
        holder.close()
    _expect(not set(got) & set(held), "a claim took rows another claim holds")
    free = len(ids) - len(held)
    if len(got) < free:  # fewer is safe; the next claim takes them (MariaDB skips more)
        return (
            f"another connection holds 50 of 200 rows; the claim did not wait and took {len(got)} "
            f"of the other {free}"
        )
    return f"another connection holds 50 of 200 rows; the claim took the other {free} at once"


def _claim_and_load(x: _Scratch, limit: int) -> list[int]:
    with x.engine.connect() as conn:
        claim = queue.claim(conn, x.tables, "event", limit, x.lease)
        return [r.id for r in queue.load(conn, x.tables, claim.token)]


def _renew_and_rerun(x: _Scratch) -> str:
    x.insert([_event(_USER, n) for n in range(5)])
    with x.engine.connect() as conn:
        claim = queue.claim(conn, x.tables, "event", 10, x.lease)
        renewed = queue.renew(conn, x.tables, claim.token, x.lease)
        _expect(renewed == 5, f"renew changed {renewed} rows, not 5")
        other = queue.renew(conn, x.tables, "f" * 32, x.lease)
        _expect(other == 0, f"renewing another token changed {other} rows")
        failed = queue.count_rerun(conn, x.tables, claim.token, x.settings.max_attempts)
        _expect(failed == 0, f"counting a re-run failed {failed} rows")
    attempts = sorted({r["attempts"] for r in x.rows().values()})
    _expect(attempts == [2], f"attempts after a counted re-run: {attempts}, expected [2]")
    return "lease renewed (another token's renewal changes nothing), a re-run counted"


def _history(x: _Scratch, token: str, sent: int, finished: Any = None) -> dict[str, Any]:
    with x.engine.connect() as conn:
        now = reports.db_now(conn)
    row: dict[str, Any] = {
        "run_id": "check",
        "task": history.BATCH,
        "kind": "event",
        "claim_token": token,
        "started_at": now,
        "rows_claimed": sent,
        "rows_sent": sent,
        "answers": '{"200": 1}',
    }
    if finished is not None:
        row["finished_at"] = finished
    return row


def _ack_all_sent(x: _Scratch) -> str:
    ids = x.insert([_event(_USER, n) for n in range(5)])
    with x.engine.connect() as conn:
        claim = queue.claim(conn, x.tables, "event", 10, x.lease)
        ack = queue.Acknowledgement(sent=ids, failed={}, retry={}, all_sent=True)
        changed = queue.acknowledge(
            conn, x.tables, claim.token, ack, history=_history(x, claim.token, 5)
        )
    _expect(changed == 5, f"the acknowledgement changed {changed} rows, not 5")
    _expect(x.statuses() == {"sent": 5}, f"rows after it: {x.statuses()}")
    return "5 rows sent by claim token, with the run-history row, in one transaction"


def _ack_mixed(x: _Scratch) -> str:
    ids = x.insert([_event(_USER, n) for n in range(6)])
    long_reason = f"{REJECTED} event_type 'Order ✓' is invalid " + "x" * 2500
    with x.engine.connect() as conn:
        claim = queue.claim(conn, x.tables, "event", 10, x.lease)
        ack = queue.Acknowledgement(
            sent=ids[:2],
            failed={ids[2]: long_reason, ids[3]: f"{INVALID} user_id 'null' is a placeholder"},
            retry={
                (60.0, False, f"{RETRYING} HTTP 503"): [ids[4]],
                (30.0, True, f"{RETRYING} throttled (429)"): [ids[5]],
            },
        )
        changed = queue.acknowledge(conn, x.tables, claim.token, ack)
        due = queue.has_due_rows(conn, x.tables, "event")
    _expect(changed == 6, f"the acknowledgement changed {changed} rows, not 6")
    rows = x.rows(ids)
    statuses = [rows[i]["status"] for i in ids]
    _expect(
        statuses == ["sent", "sent", "failed", "failed", "pending", "pending"],
        f"statuses after it: {statuses}",
    )
    _expect(
        rows[ids[2]]["last_error"] == long_reason[:2000],
        "a failed row's reason was not kept (its first 2000 characters)",
    )
    _expect(
        [rows[i]["attempts"] for i in ids[4:]] == [1, 0],
        f"attempts of the retried rows: {[rows[i]['attempts'] for i in ids[4:]]}, "
        "expected 1 and 0 (refunded)",
    )
    _expect(not due, "a row waiting on backoff counts as due")
    return "2 sent, 2 failed with their reasons, 2 back to pending on backoff (1 refunded)"


def _retry_failed_chunked(x: _Scratch) -> str:
    ids = x.insert([_event(f"many-{n:05d}", n) for n in range(CHUNKED_ROWS)])

    def fail_all() -> None:
        with x.engine.connect() as conn:
            claim = queue.claim(conn, x.tables, "event", CHUNKED_ROWS, x.lease)
            _expect(claim.rows == CHUNKED_ROWS, f"claimed {claim.rows} of {CHUNKED_ROWS}")
            reasons = {i: f"{REJECTED} row {i} ✓" for i in ids}
            ack = queue.Acknowledgement(sent=[], failed=reasons, retry={})
            changed = queue.acknowledge(conn, x.tables, claim.token, ack)
            _expect(changed == CHUNKED_ROWS, f"failing them changed {changed} rows")

    fail_all()
    with x.engine.connect() as conn:
        old = queue.failed_first_tried_before(
            conn, x.tables, DEDUP_WINDOW_SECONDS, kind="event", failure_class="rejected"
        )
        _expect(old == 0, f"{old} rows counted as first tried over 7 days ago")
        by_ids = queue.retry_failed(conn, x.tables, kind="event", ids=ids, failure_class="rejected")
    _expect(by_ids == CHUNKED_ROWS, f"retry-failed --ids put back {by_ids} rows")
    fail_all()
    with x.engine.connect() as conn:
        by_class = queue.retry_failed(conn, x.tables, kind="event", failure_class="rejected")
    _expect(by_class == CHUNKED_ROWS, f"retry-failed --class put back {by_class} rows")
    _expect(x.statuses() == {"pending": CHUNKED_ROWS}, f"rows after it: {x.statuses()}")
    return (
        f"{CHUNKED_ROWS} rows failed by one acknowledgement and put back by id list and by "
        "class (more than one 1,000-row chunk)"
    )


def _sweep(x: _Scratch) -> str:
    s = x.settings
    ids = x.insert([_event(_USER, n) for n in range(4)])
    unknown = x.insert([{"kind": "no_such_kind", "user_id": _USER}])
    with x.engine.connect() as conn:
        claim = queue.claim(conn, x.tables, "event", 10, -60.0)  # a lease that already expired
        _expect(claim.rows == 4, f"claimed {claim.rows} of 4")
    old: list[int] = []
    if s.max_age_seconds:
        old = x.insert([_event(_USER, 99)])
        x.set_times(old, first_attempt_at=LONG_AGO)
    with x.engine.connect() as conn:
        failed, released = queue.sweep(conn, x.tables, s.max_attempts, s.max_age_seconds)
    _expect(
        (failed, released) == (1 + len(old), 4),
        f"the sweep failed {failed} and released {released} rows; expected "
        f"{1 + len(old)} (an unknown kind{', a row past the maximum age' if old else ''}) and 4",
    )
    rows = x.rows()
    _expect(rows[unknown[0]]["last_error"].startswith(INVALID), "the unknown kind's reason")
    _expect({rows[i]["status"] for i in ids} == {"pending"}, "released rows are not pending")
    with x.engine.connect() as conn:
        queue.claim(conn, x.tables, "event", 10, -60.0)
        failed, released = queue.sweep(conn, x.tables, 1, s.max_age_seconds)
    _expect((failed, released) == (4, 0), f"out of attempts: failed {failed}, released {released}")
    rows = x.rows(ids)
    _expect(
        all(r["last_error"].startswith(GAVE_UP) for r in rows.values()),
        "rows out of attempts do not say they gave up",
    )
    age = f", maximum age {s.max_age_seconds} s" if s.max_age_seconds else ""
    return f"expired leases released, then failed when out of attempts; unknown kind failed{age}"


def _prune(x: _Scratch) -> str:
    s = x.settings
    # 0 keeps forever and sends no statement: the check uses the defaults then.
    sent_days = s.sent_retention_days or 30.0
    history_days = s.history_retention_days or 30.0
    ids = x.insert([_event(_USER, n) for n in range(3)])
    with x.engine.connect() as conn:
        claim = queue.claim(conn, x.tables, "event", 10, x.lease)
        ack = queue.Acknowledgement(sent=ids, failed={}, retry={}, all_sent=True)
        queue.acknowledge(conn, x.tables, claim.token, ack, history=_history(x, claim.token, 3))
        history.record_run(conn, x.tables, _history(x, claim.token, 3, finished=LONG_AGO))
    x.set_times(ids[:2], sent_at=LONG_AGO)
    with x.engine.connect() as conn:
        deleted = queue.prune(conn, x.tables, sent_days, history_days)
    _expect(
        deleted == (2, 1),
        f"prune deleted {deleted[0]} sent rows and {deleted[1]} runs; expected 2 and 1",
    )
    _expect(list(x.rows()) == [ids[2]], "prune deleted a row it should have kept")
    return (
        f"sent rows older than {sent_days:g} days and run history older than "
        f"{history_days:g} days deleted"
    )


@dataclass(frozen=True)
class _ProbeFeed:
    """An event feed in rowversion mode over a query that yields one known rowversion."""

    name: str = "ampsync-check"
    kind: str = "event"
    query: str | None = (
        f"SELECT CAST(CAST({BIG_ROWVERSION + 1} AS BIGINT) AS BINARY(8)) AS rv, 1 AS n"
    )
    procedure: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    cursor: str | None = "rv"
    cursor_mode: str | None = "rowversion"


def _rowversion(x: _Scratch) -> str:
    if x.dialect != "mssql":
        raise Skip(f"SQL Server only ({x.dialect} has no rowversion)")
    feed = _ProbeFeed()
    with x.engine.connect() as conn, conn.begin():
        db_feeds.read_bound(conn, feed.cursor_mode)
        statement = db_feeds.source_statement(feed, conn.dialect)
        rows = conn.execute(
            statement, {"after": BIG_ROWVERSION, "before": BIG_ROWVERSION + 2}
        ).all()
    _expect(
        len(rows) == 1,
        f"bounds {BIG_ROWVERSION} < rv < {BIG_ROWVERSION + 2} read {len(rows)} of the 1 row "
        "between them: an event feed would skip rows past 2^31 while its cursor advances",
    )
    return f"bounds above 2^31 ({BIG_ROWVERSION}) select the row between them"


def _feed_statements(x: _Scratch) -> str:
    ft = db_feeds.FeedTables.of(x.tables)
    name = "ampsync-check"
    with x.engine.connect() as conn:
        with conn.begin():
            _expect(db_feeds.feed_row(conn, ft, name) is None, "a new feed already has a row")
        row = db_feeds.add_feed_row(conn, ft, name)
        with conn.begin():
            _expect(db_feeds.take_turn(conn, ft, name, row.version), "the feed's turn was refused")
            ids = db_feeds.enqueue(conn, ft, [_identify(_USER, 1), _identify(_USER, 2)])
            db_feeds.mark_invalid(conn, ft, ids[1], "properties is not valid JSON")
            statuses = db_feeds.queue_statuses(conn, ft, ids)
            db_feeds.record_run(conn, ft, name, '{"rows_read": 2}', ('{"value": 1}', None))
        with conn.begin():
            stale = db_feeds.take_turn(conn, ft, name, row.version)
    _expect(len(ids) == 2 and ids == sorted(ids), f"enqueue returned ids {ids}")
    _expect(
        statuses == {ids[0]: "pending", ids[1]: "failed"},
        f"queue statuses read back as {statuses}",
    )
    _expect(not stale, "a second run with the same version also got the feed's turn")
    return (
        "first run's row, its turn (a stale one refused), enqueue with ids, an invalid row, "
        "the cursor"
    )


def _feed_state_case(x: _Scratch) -> str:
    ft = db_feeds.FeedTables.of(x.tables)
    name = "ampsync-check"
    first = [
        db_feeds.StateRow("Alice", '{"plan": "gold"}', None),
        db_feeds.StateRow("alice", '{"plan": "free"}', None),
    ]
    with x.engine.connect() as conn:
        try:
            with conn.begin():
                db_feeds.write_state(conn, ft, name, [], first)
        except SQLAlchemyError as exc:
            raise CheckFailed(
                f"storing ids 'Alice' and 'alice' (two users in Amplitude): {server_error(exc)}"
            ) from None
        with conn.begin():
            db_feeds.write_state(
                conn, ft, name, [db_feeds.StateRow("alice", '{"plan": "pro"}', None)], []
            )
        with conn.begin():
            state = {r.entity: r.accepted for r in db_feeds.read_state(conn, ft, name)}
    expected = {"Alice": '{"plan": "gold"}', "alice": '{"plan": "pro"}'}
    _expect(
        state == expected,
        f"the state of 'Alice' and 'alice' read back as {state}: an update of one changed "
        "the other",
    )
    return "'Alice' and 'alice' are two ids, each updated alone"


def _endpoint_pause(x: _Scratch) -> str:
    with x.engine.connect() as conn:
        pause = endpoints.record_failure(
            conn, x.tables, "batch", 3, "HTTP 503 ✓", lambda failures: 60.0
        )
        state = endpoints.read(conn, x.tables, "batch")
        _expect(pause == 60.0 and state.paused, f"the endpoint reads {state} after a pause")
        _expect(len(endpoints.read_all(conn, x.tables)) == 1, "read_all does not list it")
        endpoints.clear_failures(conn, x.tables, "batch")
        cleared = endpoints.read(conn, x.tables, "batch")
    _expect(cleared.failures == 0 and not cleared.paused, f"after clearing: {cleared}")
    return "an endpoint paused, read, cleared"


def _status_report(x: _Scratch) -> str:
    x.insert([_event(_USER, 1), _identify(_USER, 2)])
    with x.engine.connect() as conn:
        claim = queue.claim(conn, x.tables, "event", 10, x.lease)
        failed = {r.id: f"{INVALID} check" for r in queue.load(conn, x.tables, claim.token)}
        ack = queue.Acknowledgement(sent=[], failed=failed, retry={})
        queue.acknowledge(conn, x.tables, claim.token, ack)
        history.record_run(conn, x.tables, {**_history(x, "", 0), "task": history.SYNC})
        counts = reports.row_counts(conn, x.tables)
        reports.pending_overview(conn, x.tables)
        failures = reports.failures(conn, x.tables)
        reports.max_id(conn, x.tables)
        history.last_runs(conn, x.tables)
        if conn.in_transaction():  # it may read in the connection's own transaction
            conn.rollback()
    _expect(
        counts == {"event": {"failed": 1}, "identify": {"pending": 1}},
        f"rows by kind and status read back as {counts}",
    )
    _expect(len(failures["common"]) == 1, f"common errors read back as {failures['common']}")
    return "rows by kind and status, oldest pending row, common errors, last runs"


STATEMENT_CHECKS: tuple[tuple[str, Callable[[_Scratch], str]], ...] = (
    ("claim identify, renew and load", _claim_kind("identify")),
    ("claim event, renew and load", _claim_kind("event")),
    ("claim group_identify, renew and load", _claim_kind("group_identify")),
    ("claims from two connections at once", _claim_race),
    ("a claim skips rows another claim holds", _claim_skips_held_rows),
    ("renew a lease, count a re-run", _renew_and_rerun),
    ("acknowledge all sent", _ack_all_sent),
    ("acknowledge sent, failed and retried rows", _ack_mixed),
    ("retry-failed over more rows than one chunk", _retry_failed_chunked),
    ("sweep of an expired lease", _sweep),
    ("prune at the default retention", _prune),
    ("rowversion bound above 2^31", _rowversion),
    ("feed run statements", _feed_statements),
    ("feed state of two ids that differ only by case", _feed_state_case),
    ("endpoint pause", _endpoint_pause),
    ("status report", _status_report),
)


def statements(engine: Engine, settings: Settings, scratch_name: str) -> list[Result]:
    """Create the scratch tables, run every check in them, drop them (also after a failure)."""
    tables = define_tables(scratch_name)
    x = _Scratch(engine, settings, tables)
    results: list[Result] = []
    try:
        try:
            done = setup.init_db(engine, tables)
        except SQLAlchemyError as exc:
            results.append(
                Result(
                    STATEMENTS,
                    f"scratch table {tables.queue.fullname}",
                    FAILED,
                    f"{server_error(exc)} (the statement checks need a table of their own: "
                    "run `ampsync check` with a login that may create tables)",
                )
            )
            results += [
                Result(STATEMENTS, name, SKIPPED, "no scratch table")
                for name, _ in STATEMENT_CHECKS
            ]
            return results
        results.append(
            Result(
                STATEMENTS,
                f"scratch table {tables.queue.fullname}",
                OK,
                f"created by init-db ({len(done)} statements)",
            )
        )
        for name, check in STATEMENT_CHECKS:
            results.append(_attempt(x, name, check))
    finally:
        results.append(_drop(engine, tables))
    return results


def _attempt(x: _Scratch, name: str, check: Callable[[_Scratch], str]) -> Result:
    try:
        x.clear()
        return Result(STATEMENTS, name, OK, check(x))
    except Skip as exc:
        return Result(STATEMENTS, name, SKIPPED, str(exc))
    except Exception as exc:  # the server's error or the check's finding, on one line
        return Result(STATEMENTS, name, FAILED, server_error(exc))


def _drop(engine: Engine, tables: QueueTables) -> Result:
    name = f"drop scratch table {tables.queue.fullname}"
    try:
        with engine.begin() as conn:
            for table in reversed(tables.metadata.sorted_tables):
                table.drop(conn, checkfirst=True)
        with engine.connect() as conn:
            left = [t.fullname for t in tables.metadata.sorted_tables if _has_table(conn, t)]
    except SQLAlchemyError as exc:
        left, error = [t.fullname for t in tables.metadata.sorted_tables], server_error(exc)
    else:
        error = ""
    if left:
        return Result(
            STATEMENTS, name, FAILED, f"{error} drop these by hand: {', '.join(left)}".strip()
        )
    return Result(STATEMENTS, name, OK, "dropped with its tables")
