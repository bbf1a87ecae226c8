"""Connections: one engine per process and database URL, tuned per dialect, and the one-line
message a person reads when the database cannot be reached."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event

from ..settings import mask_url

if TYPE_CHECKING:
    import sqlite3

    from sqlalchemy.pool import ConnectionPoolEntry


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine that survives dropped connections and, on SQLite, several writer processes."""
    options: dict[str, Any] = {"pool_pre_ping": True, "future": True}
    if url.startswith("sqlite"):
        options["connect_args"] = {"timeout": 30}
    elif url.startswith("mssql"):
        # The claim's READPAST is refused under SNAPSHOT/SERIALIZABLE (docs/sqlserver.md).
        options["isolation_level"] = "READ COMMITTED"
    else:
        options["pool_recycle"] = 1800
        if url.startswith(("mysql", "mariadb")):
            # Under InnoDB's default REPEATABLE READ the claim's UPDATE of the ids it picked
            # locks every row its scan passes and waits on rows another claim holds (found by
            # `ampsync check`); READ COMMITTED reads those rows' committed version and skips
            # them, as PostgreSQL does by default.
            options["isolation_level"] = "READ COMMITTED"
    options.update(kwargs)
    engine = create_engine(url, **options)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
            # Several processes write: WAL lets readers go on, busy_timeout waits for the lock.
            # Text that is not UTF-8 is kept (surrogate-escaped) so the row can be failed with
            # a reason instead of breaking the whole fetch.
            dbapi_conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
            dbapi_conn.isolation_level = None  # SQLAlchemy's begin() issues BEGIN itself

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def describe_db_error(exc: BaseException, url: str) -> str:
    first = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0][:300]
    return f"cannot reach the database at {mask_url(url)}: {first}"
