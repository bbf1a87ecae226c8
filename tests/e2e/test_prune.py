"""The `prune` task, as beat runs it hourly on a worker: `sent` rows and run history past
their retention go; everything else stays."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update
from support import BACKENDS, event
from support.reliability import backend_url

from tasks import prune
from tasks.db import sql

DAY = 86400


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_the_prune_task_removes_sent_rows_and_history_past_retention_and_keeps_the_rest(
    make_stack, backend, tmp_path
):
    # given a worker keeping sent rows 7 days and run history 30 days
    stack = make_stack(
        backend_url(backend, tmp_path), AMPSYNC_RETENTION_DAYS="7", AMPSYNC_HISTORY_DAYS="30"
    )
    stack.start_worker(concurrency=1)
    # and rows written 11 days ago: sent 10 days ago, sent yesterday, never sent (pending),
    # given up (failed)
    ids = stack.insert([event(f"user-{n:05d}", "Viewed", insert_id=f"p-{n}") for n in range(9)])
    old_sent, recent_sent, pending, failed = ids[0:3], ids[3:5], ids[5:7], ids[7:9]
    q, runs = stack.tables.queue, stack.tables.runs
    ages = [
        (old_sent, {"status": "sent", "sent_at": sql.utcnow_plus(-10 * DAY)}),
        (recent_sent, {"status": "sent", "sent_at": sql.utcnow_plus(-1 * DAY)}),
        (pending, {"status": "pending", "next_attempt_at": sql.utcnow_plus(DAY)}),
        (failed, {"status": "failed", "last_error": "gave up after 12 attempts: HTTP 500"}),
    ]
    with stack.engine.begin() as conn:
        for chosen, values in ages:
            conn.execute(
                update(q)
                .where(q.c.id.in_(chosen))
                .values(created_at=sql.utcnow_plus(-11 * DAY), **values)
            )
        # and run history from 40 days ago and from yesterday
        for run_id, age in (("old-run", 40), ("new-run", 1)):
            conn.execute(
                runs.insert().values(
                    run_id=run_id,
                    task="batch",
                    started_at=sql.utcnow_plus(-age * DAY),
                    finished_at=sql.utcnow_plus(-age * DAY),
                )
            )
    # when the prune task runs on the worker
    result = prune.delay().get(timeout=30)
    # then the sent rows past 7 days and the run past 30 days are gone, and only they
    assert result == {"sent_rows_deleted": 3, "history_rows_deleted": 1}
    assert sorted(stack.rows()) == sorted(recent_sent + pending + failed)
    with stack.engine.connect() as conn:
        assert list(conn.execute(select(runs.c.run_id)).scalars()) == ["new-run"]
