"""Flower as docker-compose.yml starts it (`python deploy/run_flower.py`), really started on a real
Redis: its login comes from FLOWER_BASIC_AUTH, the example password and a missing login stop
it with one line, and /metrics asks for the login like every other page."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from support import REDIS_URL, ROOT, free_port, poll_until, stop_process

LAUNCHER = [sys.executable, str(ROOT / "deploy" / "run_flower.py")]
LOGIN = ("ops", "a-long-flower-test-password")


def env(auth: str | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    base["CELERY_BROKER_URL"] = REDIS_URL
    return base if auth is None else {**base, "FLOWER_BASIC_AUTH": auth}


def test_flower_answers_metrics_and_its_api_only_with_the_login():
    # given Flower started the compose way, its login in the environment only
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="ampsync-flower-", suffix=".log")[1])
    proc = subprocess.Popen(
        [*LAUNCHER, "--address=127.0.0.1", f"--port={port}"],
        env=env(":".join(LOGIN)),
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")
        with contextlib.suppress(requests.ConnectionError):
            return requests.get(f"{url}/healthcheck", timeout=2).ok
        return False

    try:
        assert poll_until(up, timeout=40), log.read_text(errors="replace")
        # when /metrics and the API are asked for without the login, then both refuse
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 401
        assert requests.get(f"{url}/api/workers", timeout=10).status_code == 401
        assert requests.get(f"{url}/metrics", auth=("ops", "wrong"), timeout=10).status_code == 401
        # and with it, both answer
        metrics = requests.get(f"{url}/metrics", auth=LOGIN, timeout=10)
        assert metrics.status_code == 200 and "flower_" in metrics.text
        assert requests.get(f"{url}/api/workers", auth=LOGIN, timeout=10).status_code == 200
    finally:
        stop_process(proc)
        log.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("auth", "said"),
    [
        (None, "FLOWER_BASIC_AUTH is not set"),
        ("admin:change-me-too", "example password"),
        ("admin", "must be user:password"),
        ("admin:short", "12+ characters"),
    ],
)
def test_flower_refuses_to_start_without_a_real_login_in_one_line(auth, said):
    # given FLOWER_BASIC_AUTH missing, still the example's, malformed or too short
    # when Flower is started the compose way
    done = subprocess.run(
        [*LAUNCHER, "--address=127.0.0.1", f"--port={free_port()}"],
        env=env(auth),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # then it stops at once with one line saying what to change
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert said in done.stderr


def test_the_example_password_is_the_one_env_example_ships():
    # the refusal is worth something only if it names the value users copy
    example = (ROOT / ".env.example").read_text()
    assert "FLOWER_BASIC_AUTH=admin:change-me-too\n" in example
