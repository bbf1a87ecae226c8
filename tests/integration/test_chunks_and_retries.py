"""What the SQL Server review changed, run on real PostgreSQL and MariaDB (and SQLite), where
the logic is shared with SQL Server: statements that can touch many rows go 1,000 rows at a
time; a deadlock victim or a lock timeout runs its transaction again; feed entities that
differ only by case are two; init-db warns before indexing a large table
(docs/sqlserver.md)."""

from __future__ import annotations

import uuid

import pymysql
import pytest
from psycopg import errors as pg_errors
from sqlalchemy import event, func, select, update
from support import BACKENDS

from tasks.db import engine as db_engine
from tasks.db import feeds, queue, schema, setup, sql

ROWS = 2500


def changes_of(engine, table_name: str) -> list[int]:
    """Record the rows each UPDATE or DELETE of the table changed, as the driver counts."""
    seen: list[int] = []

    @event.listens_for(engine, "after_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):
        verb = statement.lstrip().split(" ", 1)[0].upper()
        if verb in ("UPDATE", "DELETE") and table_name in statement:
            seen.append(cursor.rowcount)

    return seen


def fill(engine, tables, **values) -> None:
    q = tables.queue
    with engine.begin() as conn:
        queue.insert_rows(
            conn, tables, [{"kind": "event", "user_id": f"user-{n:05}"} for n in range(ROWS)]
        )
        conn.execute(update(q).values(**values))


def statuses(engine, tables) -> dict[str, int]:
    q = tables.queue
    with engine.connect() as conn:
        return dict(conn.execute(select(q.c.status, func.count()).group_by(q.c.status)).all())


def test_the_sweep_releases_2500_expired_leases_1000_rows_a_statement(db):
    engine, tables = db
    fill(
        engine,
        tables,
        status="in_flight",
        claim_token="0" * 32,
        attempts=1,
        locked_until=sql.utcnow_plus(-60),
    )
    seen = changes_of(engine, tables.queue.name)
    with engine.connect() as conn:
        assert queue.sweep(conn, tables, max_attempts=12) == (0, ROWS)
    assert statuses(engine, tables) == {"pending": ROWS}
    assert max(seen) <= 1000 and sum(seen) == ROWS and len([n for n in seen if n]) == 3


def test_retry_failed_puts_2500_rows_back_1000_a_statement(db):
    engine, tables = db
    fill(engine, tables, status="failed", attempts=12, last_error="gave up after 12 attempts: x")
    seen = changes_of(engine, tables.queue.name)
    with engine.connect() as conn:
        assert queue.retry_failed(conn, tables, failure_class="gave-up") == ROWS
    assert statuses(engine, tables) == {"pending": ROWS}
    assert max(seen) <= 1000 and sum(seen) == ROWS and len([n for n in seen if n]) == 3


def test_prune_deletes_2500_old_sent_rows_1000_a_statement(db):
    engine, tables = db
    fill(engine, tables, status="sent", sent_at=sql.utcnow_plus(-10 * 86400))
    seen = changes_of(engine, tables.queue.name)
    with engine.connect() as conn:
        assert queue.prune(conn, tables, sent_days=7, history_days=30) == (ROWS, 0)
    assert statuses(engine, tables) == {}
    assert max(seen) <= 1000 and sum(seen) == ROWS


def test_a_sweep_of_few_rows_leaves_rows_it_must_not_touch(db):
    engine, tables = db
    fill(engine, tables, status="in_flight", claim_token="0" * 32, attempts=1)
    q = tables.queue
    with engine.begin() as conn:  # 10 expired, the rest still leased
        ids = list(conn.execute(select(q.c.id).order_by(q.c.id).limit(10)).scalars())
        conn.execute(update(q).values(locked_until=sql.utcnow_plus(600)))
        conn.execute(update(q).where(q.c.id.in_(ids)).values(locked_until=sql.utcnow_plus(-60)))
    with engine.connect() as conn:
        assert queue.sweep(conn, tables, max_attempts=12) == (0, 10)
    assert statuses(engine, tables) == {"pending": 10, "in_flight": ROWS - 10}


# --- deadlocks and lock timeouts -----------------------------------------------------------------


def deadlock(url_backend: str) -> BaseException:
    """The error the driver raises when the server picks this transaction as a victim."""
    if url_backend == "postgresql":
        return pg_errors.DeadlockDetected("deadlock detected")
    if url_backend == "mariadb":
        return pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock")
    return pymysql.err.OperationalError(1205, "Lock wait timeout exceeded")  # any driver


def inject_once(engine, error: BaseException, verb: str) -> list[str]:
    """Fail the first statement starting with `verb`, as the server would."""
    failed: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def fail(conn, cursor, statement, parameters, context, executemany):
        if not failed and statement.lstrip().upper().startswith(verb):
            failed.append(statement)
            raise error

    return failed


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_an_acknowledgement_that_loses_a_deadlock_runs_again_whole(backend):
    engine = db_engine.make_engine(BACKENDS[backend])
    tables = schema.define_tables(f"td_{uuid.uuid4().hex[:8]}")
    setup.init_db(engine, tables)
    try:
        with engine.begin() as conn:
            queue.insert_rows(
                conn, tables, [{"kind": "event", "user_id": f"u{n:04}"} for n in range(3)]
            )
        with engine.connect() as conn:
            claim = queue.claim(conn, tables, "event", 10, 60)
            ids = [r.id for r in queue.load(conn, tables, claim.token)]
        failed = inject_once(engine, deadlock(backend), "UPDATE")
        run = {"run_id": "r1", "task": "batch", "started_at": sql.utcnow(), "kind": "event"}
        ack = queue.Acknowledgement(sent=ids, failed={}, retry={}, all_sent=True)
        with engine.connect() as conn:
            assert queue.acknowledge(conn, tables, claim.token, ack, history=run) == 3
        assert failed, "the injected deadlock never fired"
        assert statuses(engine, tables) == {"sent": 3}
        with engine.connect() as conn:  # the run's history row was written once, not twice
            assert conn.execute(select(func.count()).select_from(tables.runs)).scalar_one() == 1
    finally:
        with engine.begin() as conn:
            for table in reversed(tables.metadata.sorted_tables):
                table.drop(conn)
        engine.dispose()


def test_a_claim_that_times_out_on_a_lock_runs_again(db):
    engine, tables = db
    with engine.begin() as conn:
        queue.insert_rows(conn, tables, [{"kind": "event", "user_id": "user-00001"}])
    verb = "SELECT" if engine.dialect.name in ("mysql", "mariadb") else "UPDATE"
    failed = inject_once(engine, pymysql.err.OperationalError(1205, "Lock wait timeout"), verb)
    with engine.connect() as conn:
        claim = queue.claim(conn, tables, "event", 10, 60)
    assert failed and claim.rows == 1


def test_an_error_that_is_not_a_deadlock_is_not_retried(db):
    engine, tables = db
    failed = inject_once(engine, pymysql.err.OperationalError(2013, "Lost connection"), "UPDATE")
    with engine.connect() as conn, pytest.raises(Exception, match="Lost connection"):
        queue.renew(conn, tables, "0" * 32, 60)
    assert len(failed) == 1


# --- feed entities that differ only by case ------------------------------------------------------


def test_two_feed_entities_that_differ_only_by_case_are_two(db):
    # MariaDB's default collation is case-insensitive, like SQL Server's
    engine, tables = db
    ft = feeds.FeedTables.of(tables)
    alice = feeds.StateRow("Alice", '{"plan": "gold"}', None)
    lower = feeds.StateRow("alice", '{"plan": "free"}', None)
    with engine.begin() as conn:
        feeds.write_state(conn, ft, "crm", [], [alice, lower])
    with engine.begin() as conn:
        feeds.write_state(conn, ft, "crm", [feeds.StateRow("alice", '{"plan": "pro"}', None)], [])
    with engine.connect() as conn:
        state = {r.entity: r.accepted for r in feeds.read_state(conn, ft, "crm")}
    assert state == {"Alice": '{"plan": "gold"}', "alice": '{"plan": "pro"}'}


# --- init-db on a large table --------------------------------------------------------------------


def test_init_db_warns_before_building_an_index_on_a_large_existing_table(db):
    engine, tables = db
    with engine.begin() as conn:
        queue.insert_rows(
            conn, tables, [{"kind": "event", "user_id": f"u{n:04}"} for n in range(20)]
        )
    index_drop(engine, tables, "_user")
    quiet: list[str] = []
    setup.init_db(engine, tables, warn=quiet.append, large_rows=100)
    assert quiet == []
    index_drop(engine, tables, "_user")
    warned: list[str] = []
    done = setup.init_db(engine, tables, warn=warned.append, large_rows=10)
    assert len(done) == 1 and len(warned) == 1
    assert f"ix_{tables.queue.name}_user" in warned[0] and "over 10 rows" in warned[0]
    assert "--print-sql" in warned[0]


def index_drop(engine, tables, suffix: str) -> None:
    with engine.begin() as conn:
        next(ix for ix in tables.queue.indexes if ix.name.endswith(suffix)).drop(conn)
