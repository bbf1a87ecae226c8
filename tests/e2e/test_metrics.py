"""`ampsync metrics`, run as an operator runs it (a subprocess), scraped over HTTP while a real
worker delivers rows from a real PostgreSQL queue table to the emulator. The exposition is
read with prometheus_client's own parser, written apart from ours, so a format mistake fails
here as it would fail in Prometheus."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families
from support import (
    ROOT,
    Stack,
    free_port,
    poll_until,
    run_cli,
    settle_a_day_of_outcomes,
    stop_process,
)

from tasks.db import feeds, history, reports

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextlib.contextmanager
def metrics_server(stack: Stack) -> Iterator[str]:
    """`ampsync metrics --port P` with the stack's settings; yields its /metrics URL once up."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="ampsync-metrics-", suffix=".log")[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "metrics", "--port", str(port)],
        env={**os.environ, **stack.env},
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"

    def up() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")
        with contextlib.suppress(requests.ConnectionError):
            return requests.get(url, timeout=5).ok
        return False

    try:
        assert poll_until(up, timeout=30), log.read_text(errors="replace")
        yield url
    finally:
        stop_process(proc)
        log.unlink(missing_ok=True)


def scrape(url: str) -> Samples:
    """Every sample of one scrape: (name, sorted labels) → value."""
    answer = requests.get(url, timeout=30)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for (n, k), v in samples.items() if n == name}


def test_a_scrape_reports_rows_by_kind_and_status_ages_counters_answers_pauses_and_feeds(
    make_stack,
):
    # given a PostgreSQL queue table, a worker, and slow backoff and pauses so that what the
    # scrape reads stays put while it is read
    stack = make_stack(
        AMPSYNC_BACKOFF_BASE="300",
        AMPSYNC_BACKOFF_MAX="600",
        AMPSYNC_PAUSE_BASE="300",
        AMPSYNC_PAUSE_MAX="600",
        AMPSYNC_GROUP_IDENTIFY_API="groupidentify",
    )
    stack.start_worker()
    # and `ampsync metrics` started before anything was sent
    with metrics_server(stack) as url:
        before = scrape(url)
        # then every kind is reported from the start, at 0
        assert value(before, "ampsync_database_up") == 1
        for kind in ("identify", "event", "group_identify"):
            assert value(before, "ampsync_rows_sent_total", kind=kind) == 0
            for status in ("pending", "in_flight", "sent", "failed"):
                assert value(before, "ampsync_rows", kind=kind, status=status) == 0

        # when rows are delivered or fail, and Amplitude answers 500 to events and an HTML
        # 400 to group identify (that endpoint pauses)
        settle_a_day_of_outcomes(stack)
        # and two feeds have run, one of them into an error
        ft = feeds.FeedTables.of(stack.tables)
        with stack.engine.connect() as conn:
            for name in ("crm_segments", "pickups"):
                feeds.add_feed_row(conn, ft, name)
            with conn.begin():
                feeds.record_run(conn, ft, "crm_segments", '{"enqueued": 3}', None)
                feeds.record_error(conn, ft, "pickups", "source: relation does not exist")
        after, scraped_at = scrape(url), time.time()

    # then the rows are counted by kind and status, with the labels `kind` and `status`
    rows = {
        (dict(k)["kind"], dict(k)["status"]): v
        for (n, k), v in after.items()
        if n == "ampsync_rows" and v
    }
    assert rows == {
        ("identify", "sent"): 3,
        ("identify", "failed"): 2,
        ("event", "failed"): 1,
        ("event", "pending"): 2,
        ("group_identify", "pending"): 1,
    }
    # and the oldest pending row's age per kind (0 where nothing is pending)
    ages = by_label(after, "ampsync_oldest_pending_age_seconds", "kind")
    assert 0 < ages["event"] < 120 and 0 < ages["group_identify"] < 120
    assert ages["identify"] == 0
    # and the rows sent, failed and retried by the batches since the exporter started
    assert by_label(after, "ampsync_rows_sent_total", "kind") == {
        "identify": 3,
        "event": 0,
        "group_identify": 0,
    }
    assert by_label(after, "ampsync_rows_failed_total", "kind") == {
        "identify": 2,
        "event": 1,
        "group_identify": 0,
    }
    assert by_label(after, "ampsync_rows_retried_total", "kind") == {
        "identify": 0,
        "event": 2,
        "group_identify": 1,
    }
    # and Amplitude's answers by endpoint and code
    assert value(after, "ampsync_amplitude_answers_total", endpoint="batch", code="500") == 1
    assert (
        value(after, "ampsync_amplitude_answers_total", endpoint="groupidentify", code="400") == 1
    )
    assert value(after, "ampsync_amplitude_answers_total", endpoint="batch", code="200") >= 1
    # and the paused endpoint, with the failures counted against the other
    assert by_label(after, "ampsync_endpoint_paused", "endpoint") == {
        "batch": 0,
        "groupidentify": 1,
        "http_v2": 0,
        "identify": 0,
    }
    assert value(after, "ampsync_endpoint_failures", endpoint="batch") == 1
    assert value(after, "ampsync_endpoint_pause_remaining_seconds", endpoint="groupidentify") > 0
    # and each feed's last run, and whether it failed
    ran = by_label(after, "ampsync_feed_last_run_timestamp_seconds", "feed")
    assert set(ran) == {"crm_segments", "pickups"}
    # (Unix time: the database and this test share the machine's clock)
    assert all(abs(t - scraped_at) < 120 for t in ran.values()), (ran, scraped_at)
    assert by_label(after, "ampsync_feed_last_run_failed", "feed") == {
        "crm_segments": 0,
        "pickups": 1,
    }


def test_counters_count_each_batch_once_late_commits_included_and_none_from_before_start(
    make_stack,
):
    # given a batch finished (in the run history) before the exporter started
    stack = make_stack()

    def now() -> datetime:
        with stack.engine.connect() as conn:
            return reports.db_now(conn)

    def batch(kind: str, sent: int, at: datetime, answers: str) -> None:
        with stack.engine.connect() as conn:
            history.record_run(
                conn,
                stack.tables,
                {
                    "run_id": "r1",
                    "task": history.BATCH,
                    "kind": kind,
                    "started_at": at,
                    "finished_at": at,
                    "rows_sent": sent,
                    "answers": answers,
                },
            )

    batch("identify", 100, now() - timedelta(seconds=5), '{"200": 1}')
    with metrics_server(stack) as url:
        # then the exporter does not count it: its counters start with the process
        assert value(scrape(url), "ampsync_rows_sent_total", kind="identify") == 0
        after_start = now()
        # when a batch finishes, it is counted once, however often the exporter is scraped
        batch("event", 7, now(), '{"200": 2}')
        first, second = scrape(url), scrape(url)
        for samples in (first, second):
            assert value(samples, "ampsync_rows_sent_total", kind="event") == 7
            assert (
                value(samples, "ampsync_amplitude_answers_total", endpoint="batch", code="200") == 2
            )
        # and a batch whose history row became visible only after those scrapes, stamped
        # before them (its transaction committed late), is still counted, once
        batch("event", 5, after_start, '{"200": 1, "no answer": 1}')
        for _ in range(2):
            samples = scrape(url)
            assert value(samples, "ampsync_rows_sent_total", kind="event") == 12
            assert (
                value(samples, "ampsync_amplitude_answers_total", endpoint="batch", code="200") == 3
            )
            assert (
                value(samples, "ampsync_amplitude_answers_total", endpoint="batch", code="none")
                == 1
            )
        assert value(samples, "ampsync_rows_sent_total", kind="identify") == 0


def test_a_missing_queue_table_or_a_port_in_use_is_one_line_and_exit_2(make_stack):
    stack = make_stack()
    # given a queue table that does not exist
    env = {**os.environ, **stack.env, "AMPSYNC_QUEUE_TABLE": "no_such_queue"}
    # when the exporter starts, then it says what to run, in one line
    done = run_cli("metrics", "--port", str(free_port()), env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "ampsync init-db" in done.stderr
    # given a port another process holds
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(
            "metrics", "--port", str(port), env={**os.environ, **stack.env}, cwd=ROOT, timeout=60
        )
    # then it names the port, in one line
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"--port {port}" in done.stderr
