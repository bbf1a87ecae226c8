"""An operator's day, through the commands a person types (subprocesses, a real worker on the
real test Redis): `sync` with no worker says so at once, `--timeout` bounds every wait,
`ampsync run` leaves its embedded broker where other commands find it, `status` tells live
workers, beat and the last sync from a dead system, a missing queue table says "run
`ampsync init-db`" everywhere, `retry-failed` names what it left, a broken feeds file stops
`run`, a feeds file added while beat runs is scheduled, and the demo cleans up after SIGTERM.

A hang is caught by each command's subprocess timeout (generous: it bounds a hang, it does not
measure speed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import update
from support import (
    API_KEY,
    CLEAN_ENV,
    PG_URL,
    ROOT,
    Stack,
    event,
    identify,
    poll_until,
    run_cli,
    start_ampsync_run,
    stop_process,
)
from support.feeds import USERS, Crm, crm_config

# Seconds a command may take before it counts as hanging (machines here are shared and slow).
HANG = 60


def ampsync(stack: Stack, *args: str, timeout: float = HANG, **env: str):
    """`ampsync ARGS` with the stack's settings, as an operator types it."""
    return run_cli(*args, env={**os.environ, **stack.env, **env}, cwd=ROOT, timeout=timeout)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    return lines[0]


# --- sync without a worker ------------------------------------------------------------------------


@pytest.mark.parametrize("wait", [[], ["--wait", "--timeout", "600"]], ids=["sync", "sync-wait"])
def test_sync_with_no_worker_says_so_in_one_line_and_enqueues_nothing(make_stack, wait):
    # given a queue table with a pending row, a reachable broker and no worker at all
    stack = make_stack(PG_URL)
    stack.insert([identify("user-00001", {"CRM_Segment": "gold"})])
    # when the operator asks for a sync (waiting or not)
    done = ampsync(stack, "sync", *wait)
    # then it stops at once (not after a long silent wait) with one line naming the queue
    assert done.returncode == 1, done.stdout + done.stderr
    line = one_line(done.stderr)
    assert "no worker consumes the ampsync.sync queue" in line and "ampsync run" in line
    assert "Traceback" not in done.stderr and done.stdout == ""
    # and nothing was left in the broker for a worker started later to run unasked
    from tasks.broker import redis_client

    client = redis_client(stack.env["CELERY_BROKER_URL"])
    assert client.llen("ampsync.sync") == 0
    client.close()


def test_sync_timeout_bounds_the_wait_for_a_worker_that_never_answers(make_stack):
    # given a worker that consumes the sync queue, then freezes (SIGSTOP) with its heartbeat
    # still fresh
    stack = make_stack(PG_URL)
    worker = stack.start_worker(concurrency=1)
    os.killpg(worker.pid, signal.SIGSTOP)
    try:
        # when the operator asks for a sync with --timeout 3
        done = ampsync(stack, "sync", "--timeout", "3")
    finally:
        os.killpg(worker.pid, signal.SIGCONT)
    # then the timeout bounds the wait for the summary: one line, exit 1, no traceback
    assert done.returncode == 1, done.stdout + done.stderr
    line = one_line(done.stderr)
    assert "not done within 3 s" in line and "ampsync status" in line


# --- ampsync run and its embedded broker ---------------------------------------------------------


def test_ampsync_run_leaves_its_embedded_broker_for_the_other_commands_and_removes_it(
    emulator, tmp_path
):
    # given no broker configured: `ampsync run` starts its embedded Redis
    emu, base_url = emulator
    emu.reset()
    env = {
        **CLEAN_ENV,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "AMPSYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'queue.db'}",
        "AMPLITUDE_API_KEY": API_KEY,
        "AMPLITUDE_SERVER_URL": base_url,
        "AMPSYNC_SYNC_INTERVAL": "600",  # only the manual sync below sends
    }
    run = start_ampsync_run(tmp_path, env, concurrency=1)
    try:
        ready = poll_until(lambda: " ready." in (tmp_path / "run.log").read_text(), timeout=60)
        assert ready, (tmp_path / "run.log").read_text()[-3000:]
        from tasks.db import engine as db_engine
        from tasks.db import queue, schema

        tables = schema.define_tables("amplitude_queue")
        engine = db_engine.make_engine(env["AMPSYNC_DATABASE_URL"])
        with engine.begin() as conn:
            queue.insert_rows(conn, tables, [event("user-00001", "Order Picked Up")])
        engine.dispose()
        # when another shell, with CELERY_BROKER_URL still unset, syncs and waits
        done = run_cli("sync", "--wait", "--timeout", "60", env=env, cwd=tmp_path, timeout=HANG)
        # then it found the embedded broker and the row was delivered
        assert done.returncode == 0, done.stdout + done.stderr
        assert "sent 1" in done.stderr
        assert [e["event_type"] for e in emu.snapshot()["events"]] == ["Order Picked Up"]
    finally:
        stop_process(run)
    # and once run stopped, the address is gone: the next command says no broker is set
    assert run.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert not list((tmp_path / "state" / "ampsync").iterdir())
    after = run_cli("sync", env=env, cwd=tmp_path, timeout=HANG)
    assert after.returncode == 2 and "CELERY_BROKER_URL is not set" in after.stderr


def test_ampsync_run_refuses_a_broken_feeds_file_as_beat_does(tmp_path):
    # given a feeds file with a mistake
    feeds = tmp_path / "ampsync-feeds.toml"
    feeds.write_text('[feeds.crm]\nkind = "identfy"\nquery = "SELECT 1"\nuser_id = "ID"\n')
    env = {
        **CLEAN_ENV,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "AMPSYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'queue.db'}",
        "AMPLITUDE_API_KEY": API_KEY,
        "AMPSYNC_FEEDS_FILE": str(feeds),
    }
    # when the operator starts `ampsync run`
    done = run_cli("run", env=env, cwd=tmp_path, timeout=HANG)
    # then it does not start: exit 2, the file's problem named, no worker banner
    assert done.returncode == 2, done.stdout + done.stderr
    assert "feeds file is invalid" in done.stderr and "ampsync-feeds.toml" in done.stderr
    assert "celery@" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


# --- status: live workers, beat, last sync ------------------------------------------------------


def test_status_tells_live_workers_beat_and_the_last_sync_from_a_dead_system(make_stack):
    # given a worker with beat that syncs every second
    stack = make_stack(PG_URL, AMPSYNC_SYNC_INTERVAL="1")
    worker = stack.start_worker(concurrency=1, beat=True)

    def report() -> dict:
        done = ampsync(stack, "status", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    # when beat has ticked and a sync ran
    alive = poll_until(lambda: (r := report())["beat"] and r["last_sync"] and r, timeout=30)
    # then status names the worker with its heartbeat and queues, beat's tick, the last sync
    assert alive, stack.log_tail()
    [w] = alive["workers"]
    assert w["name"].startswith("w") and {"ampsync.sync", "ampsync.send"} <= set(w["queues"])
    assert w["last_heartbeat_seconds_ago"] < 30
    assert alive["beat"]["last_entry"] == "ampsync-sync" and alive["beat"]["late"] is False
    assert alive["last_sync"]["run_id"]
    text = ampsync(stack, "status").stdout
    assert f"  {w['name']}  heartbeat" in text and "beat       last tick" in text
    assert "last sync  " in text
    # when the worker dies without a goodbye (SIGKILL to worker, pool and beat)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(10)
    # then its heartbeat expires and beat shows as late: a dead system, not an idle one
    dead = poll_until(lambda: (r := report())["workers"] == [] and r["beat"]["late"] and r, 60)
    assert dead, report()
    text = ampsync(stack, "status").stdout
    assert "workers    NONE" in text and "LATE" in text


# --- a missing queue table ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["status"], ["status", "--json"], ["retry-failed"], ["sync"], ["sync", "--wait"]],
    ids=" ".join,
)
def test_every_command_on_a_missing_queue_table_says_run_init_db(make_stack, args):
    # given settings that name a queue table nobody created
    stack = make_stack(PG_URL)
    # when the operator runs the command
    done = ampsync(stack, *args, AMPSYNC_QUEUE_TABLE="never_created_queue")
    # then one line says what to do, exit 2, no traceback
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_line(done.stderr)
    assert "never_created_queue does not exist: run `ampsync init-db`" in line


# --- retry-failed ---------------------------------------------------------------------------------


def _fail(stack: Stack, errors: dict[int, str]) -> None:
    """Given rows that already failed with these errors (as earlier sends left them)."""
    q = stack.tables.queue
    with stack.engine.begin() as conn:
        for row_id, error in errors.items():
            conn.execute(
                update(q).where(q.c.id == row_id).values(status="failed", last_error=error)
            )


def test_retry_failed_says_which_failure_classes_it_left_and_how_to_take_them(make_stack):
    stack = make_stack(PG_URL)
    ids = stack.insert([identify(f"user-0000{n}", {"n": n}) for n in range(1, 5)])
    _fail(
        stack,
        {
            ids[0]: "gave up after 12 attempts: HTTP 503",
            ids[1]: "rejected by Amplitude: user_id too short",
            ids[2]: "rejected by Amplitude: device_id too short",
            ids[3]: "invalid row: properties is not JSON",
        },
    )
    # when the operator retries with the default class (gave-up)
    done = ampsync(stack, "retry-failed")
    # then the gave-up row is back, and a note names the classes left and their --class
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 failed rows put back to pending")
    note = one_line(done.stderr)
    assert "3 failed rows" in note and "rejected 2" in note and "invalid 1" in note
    assert "--class rejected" in note and "--class invalid" in note
    assert stack.counts() == {"pending": 1, "failed": 3}


def test_retry_failed_refuses_since_later_than_until_and_changes_nothing(make_stack):
    stack = make_stack(PG_URL)
    [row] = stack.insert([identify("user-00001", {"n": 1})])
    _fail(stack, {row: "gave up after 12 attempts: HTTP 503"})
    # when --since is later than --until
    done = ampsync(
        stack, "retry-failed", "--since", "2026-11-28T10:00", "--until", "2026-11-28T09:00"
    )
    # then one line says so, exit 2, and the failed row stays failed
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--since 2026-11-28T10:00:00 is not before --until" in one_line(done.stderr)
    assert stack.counts() == {"failed": 1}


# --- feeds added while beat runs ------------------------------------------------------------------


def test_a_feeds_file_added_while_beat_runs_is_scheduled(make_stack, tmp_path):
    # given a worker with beat and no feeds file yet
    stack = make_stack(PG_URL)
    crm = Crm(stack.engine)
    crm.put(USERS)
    path = tmp_path / "ampsync-feeds.toml"
    try:
        stack.start_worker(beat=True, extra_env={"AMPSYNC_FEEDS_FILE": str(path)})
        # when the operator adds a scheduled feed to the file
        path.write_text(crm_config(crm.name, more="schedule = 1"))
        # then beat picks it up and its rows are delivered, without a restart
        sent = poll_until(lambda: stack.counts() == {"sent": 3}, timeout=60)
        assert sent, f"{stack.counts()}\n{stack.log_tail()}"
        # and `feed list` says it is scheduled, with its last run
        listed = ampsync(stack, "feed", "list", AMPSYNC_FEEDS_FILE=str(path))
        assert "every 1 s" in listed.stdout and "last run" in listed.stdout
    finally:
        stack.stop_workers()
        crm.drop()


# --- the demo ------------------------------------------------------------------------------------


def test_demo_counts_identifies_apart_from_events_and_shows_a_delivered_event(tmp_path):
    done = run_cli("demo", "--users", "12", env=CLEAN_ENV, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # 12 identify rows, 4 event rows and 1 group row were sent (the demo's two broken rows fail)
    assert (
        "received 4 events, 12 identifies ($identify) and 1 group identifies ($groupidentify)"
        in done.stdout
    )
    shown = done.stdout.split("An event as Amplitude received it:\n", 1)[1].splitlines()[0]
    delivered = json.loads(shown)
    assert delivered["event_type"] == "Order Picked Up" and delivered["insert_id"]


def _redis_servers_under(folder: Path) -> list[int]:
    """Pids of redis-server processes whose command line or cwd is inside `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if "redis-server" in cmdline and (str(folder) in cmdline or cwd.startswith(str(folder))):
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_an_interrupted_demo_leaves_no_folder_and_no_redis_server_behind(tmp_path, how):
    temp = tmp_path / "tmp"
    temp.mkdir()
    out = (tmp_path / "demo.out").open("w")
    demo = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "demo", "--users", "2000"],
        env={**CLEAN_ENV, "TMPDIR": str(temp)},
        cwd=tmp_path,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # given a demo that has started its worker (its rows are being sent)
        started = poll_until(lambda: "demo:  [" in (tmp_path / "demo.out").read_text(), 90)
        assert started, (tmp_path / "demo.out").read_text()[-3000:]
        assert _redis_servers_under(temp), "the demo's embedded redis-server is running"
        # when it is interrupted
        os.kill(demo.pid, how)
        demo.wait(60)
    finally:
        stop_process(demo)
        out.close()
    # then it exits 130 having removed its folder and stopped its redis-server
    assert demo.returncode == 130, (tmp_path / "demo.out").read_text()[-3000:]
    assert not list(temp.iterdir()), list(temp.iterdir())
    assert poll_until(lambda: not _redis_servers_under(temp), timeout=10)
