"""The same delivery on every database and broker set-up a user may have."""

from __future__ import annotations

import json
import time

import pytest
import redis
from support import (
    API_KEY,
    CLEAN_ENV,
    FAST,
    MARIADB_URL,
    event,
    group,
    identify,
    run_cli,
    start_ampsync_run,
    stop_process,
)

from tasks.db import engine as db_engine
from tasks.db import queue, reports, schema, setup


def scenario() -> tuple[list[dict], dict]:
    """Rows of every kind, with one invalid row, and what Amplitude must end up holding."""
    rows = [
        identify(f"user-{n:05d}", {"CRM_Segment": "gold", "$add": {"visits": 1}}) for n in range(40)
    ]
    rows += [identify("user-00000", {"CRM_Segment": "silver"})]
    rows += [
        event(f"user-{n:05d}", "Order Picked Up", {"n": n}, insert_id=f"order-{n}")
        for n in range(30)
    ]
    rows += [group("company", "Acme", {"plan": "pro"})]
    rows += [identify("user-bad01", {"x": 1}, extra=json.dumps([1, 2]))]
    expected = {
        "user-00000": {"CRM_Segment": "silver", "visits": 1},
        "user-00039": {"CRM_Segment": "gold", "visits": 1},
    }
    return rows, expected


def check_delivered(counts: dict, state: dict, expected: dict) -> None:
    assert counts == {"sent": 72, "failed": 1}
    for user_id, props in expected.items():
        assert state["users"][user_id]["user_properties"] == props
    orders = [e for e in state["events"] if e["event_type"] == "Order Picked Up"]
    assert len(orders) == 30 and state["counts"]["duplicates"] == 0
    assert state["groups"]["company"]["Acme"] == {"plan": "pro"}


def test_mariadb_queue_table_delivers_every_kind(make_stack):
    stack = make_stack(MARIADB_URL)
    stack.start_worker()
    rows, expected = scenario()
    stack.insert(rows)
    counts = stack.drain()
    check_delivered(counts, stack.state(), expected)
    bad = [r for r in stack.rows().values() if r["status"] == "failed"]
    assert (
        bad[0]["last_error"] == "invalid row: extra must be a JSON object like "
        '{"CRM_Segment": "gold"}, not a JSON list'
    )


def test_sqlite_with_the_embedded_redis_delivers_every_kind_through_ampsync_run(emulator, tmp_path):
    # given a SQLite queue table and no broker configured: `ampsync run` starts its own Redis
    emu, base_url = emulator
    emu.reset()
    url = f"sqlite:///{tmp_path / 'dwh.db'}"
    tables = schema.define_tables("amplitude_queue")
    engine = db_engine.make_engine(url)
    setup.init_db(engine, tables)
    rows, expected = scenario()
    with engine.begin() as conn:
        queue.insert_rows(conn, tables, rows)
    env = {
        **CLEAN_ENV,
        **FAST,
        "AMPSYNC_DATABASE_URL": url,
        "AMPLITUDE_API_KEY": API_KEY,
        "AMPLITUDE_SERVER_URL": base_url,
        "AMPSYNC_SYNC_INTERVAL": "1",
    }
    proc = start_ampsync_run(tmp_path, env, concurrency=2)
    try:
        # when beat's syncs drain the queue
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                counts = reports.by_status(reports.row_counts(conn, tables))
            if not counts.get("pending") and not counts.get("in_flight"):
                break
            time.sleep(0.5)
    finally:
        stop_process(proc)
    output = (tmp_path / "run.log").read_text(errors="replace")
    # then every valid row is sent, through a Redis that ampsync started itself
    assert "embedded Redis at redis+socket://" in output
    check_delivered(counts, emu.snapshot(), expected)
    # and stopping `ampsync run` stopped that Redis too
    socket = output.split("embedded Redis at redis+socket://")[1].split()[0]
    with pytest.raises(redis.ConnectionError):
        redis.Redis(unix_socket_path=socket).ping()
    engine.dispose()


def test_ampsync_demo_exits_0_and_prints_the_delivered_profiles(tmp_path):
    # given a fresh folder and no settings at all; when the README's demo command runs
    result = run_cli("demo", env=CLEAN_ENV, cwd=tmp_path, timeout=240)
    # then it delivers everything but its two broken rows, and shows what Amplitude received
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "403/403 rows" in result.stderr and "sent 401  failed 2" in result.stderr  # progress
    assert "identify        sent        300" in out and "event           sent        100" in out
    assert "invalid row: user_id 'null' is a placeholder Amplitude rejects" in out
    assert '"CRM_Segment":' in out and "crm-00000:" in out
    assert not list(tmp_path.iterdir()), "the demo leaves nothing behind in the working directory"


@pytest.mark.parametrize("api", ["http_v2", "batch"])
def test_events_go_through_the_chosen_event_api(make_stack, api):
    stack = make_stack(AMPSYNC_EVENT_API=api)
    stack.start_worker(concurrency=1)
    stack.insert([event("user-00001", "Viewed", insert_id="v-1")])
    assert stack.drain() == {"sent": 1}
    path = "/2/httpapi" if api == "http_v2" else "/batch"
    assert stack.state()["counts"]["requests"][path] == {"200": 1}


def test_identify_rows_can_go_through_the_form_identify_api(make_stack):
    stack = make_stack(AMPSYNC_IDENTIFY_API="identify")
    stack.start_worker(concurrency=1)
    stack.insert([identify("user-00001", {"CRM_Level": 2})])
    assert stack.drain() == {"sent": 1}
    state = stack.state()
    assert state["counts"]["requests"]["/identify"] == {"200": 1}
    assert state["users"]["user-00001"]["user_properties"] == {"CRM_Level": 2}
