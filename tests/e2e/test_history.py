"""Run history in the user's own database, and retention of sent rows."""

from __future__ import annotations

from sqlalchemy import func, select, text, update
from support import event, identify

from tasks.db import queue, sql


def test_each_sync_and_batch_leaves_a_row_that_adds_up_to_what_happened(pg):
    # given valid and invalid rows
    pg.insert(
        [identify(f"user-{n:05d}", {"CRM_Level": n}) for n in range(5)]
        + [event("user-00001", "Viewed", insert_id="v-1"), event("null", "Viewed")]
    )
    # when the queue drains
    pg.drain()
    # then the history says how many rows each sync claimed and what its batches did
    r = pg.tables.runs
    with pg.engine.connect() as conn:
        batches = conn.execute(
            select(func.sum(r.c.rows_sent), func.sum(r.c.rows_failed)).where(r.c.task == "batch")
        ).one()
        claimed = conn.execute(
            select(func.sum(r.c.rows_claimed)).where(r.c.task == "sync")
        ).scalar()
        answers = conn.execute(select(r.c.answers).where(r.c.task == "batch")).scalars().all()
    assert tuple(batches) == (6, 1) and claimed == 7
    assert any('"200"' in a for a in answers)
    last = pg.status()["last_runs"][0]
    assert last["rows_sent"] + last["rows_failed"] == last["rows_claimed"]


def test_what_happened_last_night_is_one_sql_query(pg):
    pg.insert([identify("user-00001", {"CRM_Segment": "gold"})])
    pg.drain()
    table = pg.tables.runs.name
    # the query from the README's "Run history" section, in portable SQL
    sql = text(f"""
        SELECT kind, SUM(rows_sent) AS sent, SUM(rows_failed) AS failed, COUNT(*) AS batches
        FROM {table} WHERE task = 'batch' GROUP BY kind
    """)
    with pg.engine.connect() as conn:
        assert [tuple(row) for row in conn.execute(sql)] == [("identify", 1, 0, 1)]


def test_retention_deletes_old_sent_rows_in_chunks_and_keeps_everything_else(pg):
    ids = pg.insert([event(f"user-{n:05d}", "Viewed", insert_id=f"v-{n}") for n in range(25)])
    pg.drain()
    pending = pg.insert([event("user-00099", "Viewed")])
    q = pg.tables.queue
    with pg.engine.begin() as conn:  # given 20 rows sent ten days ago
        conn.execute(update(q).where(q.c.id.in_(ids[:20])).values(sent_at=sql.utcnow_plus(-864000)))
    with pg.engine.connect() as conn:
        deleted = queue.prune(conn, pg.tables, sent_days=7, history_days=0, chunk=6)
    assert deleted == (20, 0)
    assert set(pg.rows()) == set(ids[20:]) | set(pending)
