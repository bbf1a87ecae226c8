"""A claim's byte budget and the guarded load (issue 15, point 7 and 6) on PostgreSQL, MariaDB
and SQLite: sizes measured by the database in bytes, rows too large for a request left in the
database, times that are not times handed over as stored."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from support import BACKENDS, event

from tasks.db import engine as db_engine
from tasks.db import queue, schema, setup


def insert(engine, tables, rows: list[dict]) -> list[int]:
    with engine.begin() as conn:
        queue.insert_rows(conn, tables, rows)
        return list(conn.execute(select(tables.queue.c.id).order_by(tables.queue.c.id)).scalars())


def sized(n: int, text: str = "x") -> dict:
    """An event whose properties are `n` characters of `text` as stored."""
    return {**event(f"user-{uuid.uuid4().hex[:8]}", "Viewed"), "properties": text * n}


def claimed(engine, tables, budget: int, limit: int = 100) -> list[int]:
    with engine.connect() as conn:
        claim = queue.claim(conn, tables, "event", limit, 60, budget_bytes=budget)
        return [r.id for r in queue.load(conn, tables, claim.token)]


def test_a_claim_takes_rows_in_id_order_until_their_stored_json_reaches_the_budget(db):
    engine, tables = db
    # given four rows of 400 bytes
    ids = insert(engine, tables, [sized(400) for _ in range(4)])
    # when claims with a budget of 1,000 bytes run
    first = claimed(engine, tables, budget=1000)
    second = claimed(engine, tables, budget=1000)
    # then the first takes rows while the bytes before each are under the budget (0, 400,
    # 800), the next takes the rest
    assert first == ids[:3]
    assert second == ids[3:]


def test_a_row_larger_than_the_budget_is_claimed_alone_and_first(db):
    engine, tables = db
    ids = insert(engine, tables, [sized(5000), sized(10), sized(10)])
    assert claimed(engine, tables, budget=1000) == ids[:1]
    assert claimed(engine, tables, budget=1000) == ids[1:]


def test_the_budget_counts_bytes_not_characters(db):
    engine, tables = db
    # given two rows of 300 two-byte characters: 600 bytes each
    ids = insert(engine, tables, [sized(300, "é"), sized(300, "é")])
    # when a claim may take 500 bytes, then the second row waits (by characters it would go)
    assert claimed(engine, tables, budget=500) == ids[:1]


def test_the_count_still_bounds_a_claim_within_the_budget(db):
    engine, tables = db
    ids = insert(engine, tables, [sized(10) for _ in range(5)])
    assert claimed(engine, tables, budget=10**9, limit=2) == ids[:2]


def test_a_row_stored_over_the_request_size_is_loaded_without_its_json(db):
    engine, tables = db
    # given a row whose properties and extra together are over 1,000 bytes, between two that
    # are not
    big = {**sized(700), "extra": '{"note": "' + "y" * 400 + '"}'}
    ids = insert(engine, tables, [sized(10), big, sized(10)])
    with engine.connect() as conn:
        claim = queue.claim(conn, tables, "event", 10, 60)
        # when the claim's rows are loaded with a row limit of 1,000 bytes
        rows = {r.id: r for r in queue.load(conn, tables, claim.token, max_row_bytes=1000)}
    # then the large row's JSON stayed in the database and its size came instead
    assert (rows[ids[1]].properties, rows[ids[1]].extra) == (None, None)
    assert rows[ids[1]].oversized == 700 + len(big["extra"])
    # and the others came whole
    assert [rows[i].properties for i in (ids[0], ids[2])] == ["x" * 10] * 2
    assert [rows[i].oversized for i in (ids[0], ids[2])] == [None, None]


def test_a_time_sqlite_cannot_parse_is_loaded_as_stored_and_the_other_rows_as_times(tmp_path):
    tables = schema.define_tables(f"tq_{uuid.uuid4().hex[:8]}")
    engine = db_engine.make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    setup.init_db(engine, tables)
    ids = insert(engine, tables, [sized(10) for _ in range(3)])
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE {tables.queue.name} SET event_time = 'soon' WHERE id = {ids[1]}"
        )
    with engine.connect() as conn:
        claim = queue.claim(conn, tables, "event", 10, 60)
        rows = {r.id: r for r in queue.load(conn, tables, claim.token)}
    assert rows[ids[1]].event_time == "soon"
    assert {type(r.created_at).__name__ for r in rows.values()} == {"datetime"}
    engine.dispose()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_concurrent_claims_cut_by_the_budget_still_take_each_row_once(backend, tmp_path):
    url = BACKENDS[backend] or f"sqlite:///{tmp_path / 'queue.db'}"
    tables = schema.define_tables(f"tq_{uuid.uuid4().hex[:8]}")
    engine = db_engine.make_engine(url, pool_size=8)
    setup.init_db(engine, tables)
    try:
        # given 600 rows of 100 bytes, claimed 50 at a time but at most 1,000 bytes a claim:
        # each claim locks 50 rows and keeps 10, the others stay pending
        insert(engine, tables, [sized(100) for _ in range(600)])
        barrier = threading.Barrier(4)

        def claimer(_):
            barrier.wait()
            claims = []
            with engine.connect() as conn:
                while (claim := queue.claim(conn, tables, "event", 50, 60, budget_bytes=1000)).rows:
                    claims.append(claim)
            return claims

        with ThreadPoolExecutor(4) as pool:
            claims = [c for cs in pool.map(claimer, range(4)) for c in cs]
        q = tables.queue
        with engine.connect() as conn:
            attempts = dict(conn.execute(select(q.c.id, q.c.attempts)).all())
        assert sum(c.rows for c in claims) == 600
        assert max(c.rows for c in claims) == 10  # the budget, not the count, bounded them
        assert set(attempts.values()) == {1}, Counter(attempts.values())
    finally:
        with engine.begin() as conn:
            for table in reversed(tables.metadata.sorted_tables):
                table.drop(conn)
        engine.dispose()
