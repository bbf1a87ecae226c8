"""Flower, really started, watching a real worker deliver a sync: the tasks carry ampsync's
names and each one's result summary, and the API is closed without basic auth."""

from __future__ import annotations

import ast
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from support import ROOT, event, free_port, identify, stop_process

AUTH = ("ops", "flower-test-pw")


def wait_for(check: Callable[[], object], what: str, timeout: float = 30, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except requests.RequestException:
            found = None
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(
        f"{what} not seen within {timeout} s\n"
        + (log.read_text(errors="replace")[-3000:] if log else "")
    )


@contextlib.contextmanager
def running_flower(env: dict[str, str]) -> Iterator[str]:
    """`celery -A tasks flower` with basic auth on a free port; yields its URL once it is up."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="ampsync-flower-", suffix=".log")[1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
            f"--basic-auth={AUTH[0]}:{AUTH[1]}",
        ],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # /healthcheck stays open with basic auth: it says Flower is up
        wait_for(lambda: requests.get(f"{url}/healthcheck", timeout=2).ok, "Flower", log=log)
        yield url
    finally:
        stop_process(proc)
        log.unlink(missing_ok=True)


@pytest.fixture
def flower(make_stack) -> Iterator[tuple[object, str]]:
    """A stack with a running worker, and Flower started before any task ran (it keeps only
    the task events it saw)."""
    stack = make_stack()
    stack.start_worker(concurrency=2)
    with running_flower(stack.env) as url:
        wait_for(
            lambda: requests.get(
                f"{url}/api/workers", params={"refresh": 1}, auth=AUTH, timeout=10
            ).json(),
            "the worker in Flower",
        )
        yield stack, url


def test_flower_shows_the_sync_and_each_batch_with_its_result_summary(flower):
    stack, url = flower
    # given rows of two kinds, one of them invalid
    stack.insert(
        [
            identify("user-00001", {"CRM_Segment": "gold"}),
            identify("user-00002", {"CRM_Segment": "silver"}),
            # a user with no identify row before it: the event need not wait for one
            event("user-00003", "Order Picked Up", {"order_id": 1}, insert_id="order-1"),
            event("null", "Order Picked Up"),
        ]
    )
    # when a sync runs and the rows are delivered
    summary = stack.sync()
    assert stack.drain() == {"sent": 3, "failed": 1}

    # then Flower lists the sync task with the summary it returned
    def finished() -> dict | None:
        tasks = requests.get(f"{url}/api/tasks", auth=AUTH, timeout=5).json()
        done = [t for t in tasks.values() if t["state"] == "SUCCESS"]
        sends = [t for t in done if t["name"] == "ampsync.send_batch"]
        return tasks if len(sends) >= 2 and any(t["name"] == "ampsync.sync" for t in done) else None

    tasks = wait_for(finished, "the finished tasks in Flower")
    syncs = [t for t in tasks.values() if t["name"] == "ampsync.sync"]
    first = next(t for t in syncs if ast.literal_eval(t["result"])["run_id"] == summary["run_id"])
    assert ast.literal_eval(first["result"])["rows_claimed"] == 4
    assert first["worker"].startswith("w")
    # and one send_batch per kind, each with its rows sent / failed / retried
    results = {
        r["kind"]: r
        for t in tasks.values()
        if t["name"] == "ampsync.send_batch"
        if (r := ast.literal_eval(t["result"]))["claimed"]
    }
    assert {k: (r["sent"], r["failed"], r["retried"]) for k, r in results.items()} == {
        "identify": (2, 0, 0),
        "event": (1, 1, 0),
    }
    assert set(ast.literal_eval(first["kwargs"])) <= {"kind"}
    # and the worker that ran them
    workers = requests.get(f"{url}/api/workers", auth=AUTH, timeout=10).json()
    assert first["worker"] in workers


def test_flower_answers_401_without_basic_auth_or_with_a_wrong_password(make_stack):
    with running_flower(make_stack().env) as url:
        for path in ("/api/tasks", "/api/workers", "/"):
            assert requests.get(url + path, timeout=5).status_code == 401, path
            assert requests.get(url + path, auth=("ops", "wrong"), timeout=5).status_code == 401
        assert requests.get(url + "/api/tasks", auth=AUTH, timeout=5).status_code == 200
