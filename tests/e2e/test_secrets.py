"""No secret in any output, requests to Amplitude that go where they are configured, and files
kept private — checked through the commands and the worker a user runs, with recognisable fake
secrets searched for in everything they print, log and store."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url
from support import API_KEY, CLEAN_ENV, PG_URL, REDIS_URL, ROOT, identify, poll_until, run_cli

DB_PW = "DbPwFAKE7c1e"
BROKER_PW = "BrokerPwFAKE3b9d"
SERVER_PW = "ServerPwFAKE51a0"


def _pg_with_password_parameter() -> str:
    """The test database, its password given as `?password=` (trust auth ignores it)."""
    return make_url(PG_URL).update_query_dict({"password": DB_PW}).render_as_string(False)


def _broker_with_password() -> str:
    """The test Redis as the `default` user with a password (a nopass user accepts any)."""
    url = make_url(REDIS_URL.replace("redis://", "redis://x@", 1))
    return url.set(username="default", password=BROKER_PW).render_as_string(False)


def assert_no_secret(outputs: dict[str, str], secrets: list[str]) -> None:
    leaks = [
        f"{where}: …{text[max(0, text.find(s) - 60) : text.find(s) + 20]}…"
        for where, text in outputs.items()
        for s in secrets
        if s in text
    ]
    assert not leaks, "secrets shown:\n" + "\n".join(leaks)


# --- a local HTTP server standing in for a proxy or a redirecting host -----------------------


@contextmanager
def http_server(status: int, body: bytes = b"", headers: dict[str, str] | None = None):
    """A server on 127.0.0.1 answering every POST with `status`; yields (url, bodies received)."""
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            received.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def _endpoint_reasons(stack) -> list[str]:
    t = stack.tables.endpoints
    with stack.engine.connect() as conn:
        return [r for r in conn.execute(select(t.c.reason)).scalars() if r]


def _table_dump(stack) -> str:
    return repr(stack.rows()) + repr(_endpoint_reasons(stack))


# --- point 4: no secret in any output ----------------------------------------------------------


def test_a_worker_that_cannot_reach_a_server_url_with_credentials_stores_logs_and_reports_no_secret(
    make_stack,
):
    """Given a database password in `?password=`, a broker password, credentials in
    AMPLITUDE_SERVER_URL (a server that does not answer) and the API key; when a worker fails
    to deliver and `ampsync status` reports it; then no secret is in the worker's log, the
    queue table, the endpoint table, or what status prints — and the URLs are still named."""
    with http_server(200) as (dead, _):
        pass  # the port is free again: nothing answers there
    server_url = dead.replace("http://", f"http://proxyuser:{SERVER_PW}@")
    stack = make_stack(
        _pg_with_password_parameter(),
        AMPLITUDE_SERVER_URL=server_url,
        CELERY_BROKER_URL=_broker_with_password(),
    )
    ids = stack.insert([identify("secret-user-1", {"plan": "gold"})])
    stack.start_worker(concurrency=1)
    stack.sync()
    stored = poll_until(
        lambda: (
            _endpoint_reasons(stack)
            + [r["last_error"] for r in stack.rows(*ids).values() if r["last_error"]]
        )
    )
    assert any("cannot reach http://proxyuser:***@127.0.0.1" in e for e in stored), stored

    # `status` reads the same tables; its own Amplitude line is left out here (see the report)
    status_env = {**CLEAN_ENV, **stack.env}
    status_env.pop("AMPLITUDE_SERVER_URL")
    text = run_cli("status", env=status_env, cwd=ROOT)
    as_json = run_cli("status", "--json", env=status_env, cwd=ROOT)
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    assert "password=***" in text.stdout and "default:***@" in text.stdout
    assert "proxyuser:***@" in as_json.stdout  # the stored reason, masked
    stack.stop_workers()
    assert_no_secret(
        {
            "worker log": "".join(p.read_text(errors="replace") for p in stack.logs),
            "queue and endpoint tables": _table_dump(stack),
            "status": text.stdout + text.stderr,
            "status --json": as_json.stdout + as_json.stderr,
        },
        [DB_PW, BROKER_PW, SERVER_PW, API_KEY],
    )


WRONG_URLS = [
    ("AMPSYNC_DATABASE_URL", f"postgresql://u:{DB_PW}@db:notaport/crm"),
    ("AMPSYNC_DATABASE_URL", f"mssql+pyodbc://sa:{DB_PW}@dwh/crm?driver=x"),
    ("CELERY_BROKER_URL", f"amqp://guest:{BROKER_PW}@rabbit:5672//"),
    ("AMPLITUDE_SERVER_URL", f"https://u:{SERVER_PW}@proxy.example/amplitude"),
    ("AMPLITUDE_SERVER_URL", f"http://u:{SERVER_PW}@amplitude.example.com"),
]


@pytest.mark.parametrize(("variable", "value"), WRONG_URLS)
@pytest.mark.parametrize("command", ["ampsync status", "celery worker"])
def test_a_wrong_url_with_a_password_stops_the_process_with_one_line_without_the_password(
    variable, value, command, tmp_path
):
    env = {
        **CLEAN_ENV,
        "AMPLITUDE_API_KEY": API_KEY,
        "CELERY_BROKER_URL": REDIS_URL,
        "AMPSYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}",
        variable: value,
        "PYTHONPATH": str(ROOT),
    }
    if command == "ampsync status":
        done = run_cli("status", env=env, cwd=tmp_path, timeout=60)
    else:
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel", "INFO"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if variable in line]
    assert len(lines) == 1, done.stderr[-2000:]
    assert_no_secret({"stdout": done.stdout, "stderr": done.stderr}, [DB_PW, BROKER_PW, SERVER_PW])


def test_an_answer_that_echoes_the_key_across_the_cut_leaves_no_part_of_it_in_last_error(
    make_stack,
):
    """Given a server whose error page has the key where the 200-character excerpt ends; when
    a worker stores the excerpt as last_error; then no part of the key is in it (it was cut
    first and redacted after, leaving the key's first characters)."""
    page = ("E" * 190 + API_KEY + "E" * 50).encode()
    with http_server(502, page, {"Content-Type": "text/html"}) as (url, received):
        stack = make_stack(AMPLITUDE_SERVER_URL=url, AMPSYNC_MAX_ATTEMPTS="1")
        ids = stack.insert([identify("cut-user-1", {"plan": "gold"})])
        stack.start_worker(concurrency=1)
        stack.sync()
        rows = poll_until(lambda: [r for r in stack.rows(*ids).values() if r["last_error"]])
        assert received, stack.log_tail()
    assert rows, stack.log_tail()
    assert "EEEE" in rows[0]["last_error"]  # the excerpt is there
    stack.stop_workers()
    assert_no_secret(
        {"queue and endpoint tables": _table_dump(stack), "worker log": stack.log_tail(100_000)},
        [API_KEY[:6]],
    )


# --- point 5: requests to Amplitude --------------------------------------------------------------


def test_a_redirect_from_the_amplitude_url_is_not_followed_and_pauses_the_endpoint(make_stack):
    """Given AMPLITUDE_SERVER_URL answering 307 to another server; when a worker sends; then
    the other server receives nothing (the key is not re-sent), the row is not sent, and the
    endpoint is paused with a reason naming the redirect."""
    with http_server(200, b'{"code": 200}') as (elsewhere, taken):
        redirect = {"Location": elsewhere + "/batch"}
        with http_server(307, b"", redirect) as (url, asked):
            stack = make_stack(AMPLITUDE_SERVER_URL=url)
            ids = stack.insert([identify("redirected-user", {"plan": "gold"})])
            stack.start_worker(concurrency=1)
            stack.sync()
            reasons = poll_until(lambda: _endpoint_reasons(stack))
            stack.stop_workers()
    assert asked, stack.log_tail()  # the configured server got the request
    assert taken == [], "the redirect was followed: the key went to another host"
    assert any("follows no redirect" in r and elsewhere in r for r in reasons), reasons
    assert stack.rows(*ids)[ids[0]]["status"] != "sent"


def test_plain_http_to_another_host_stops_the_command_with_one_line(tmp_path):
    env = {
        **CLEAN_ENV,
        "AMPLITUDE_SERVER_URL": "http://api2.amplitude.com",
        "AMPSYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}",
    }
    done = run_cli("status", env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "AMPLITUDE_SERVER_URL" in done.stderr and "plain http:// is refused" in done.stderr


# --- point 8: files and defaults ---------------------------------------------------------------


def test_a_dotenv_file_in_the_working_directory_is_named_when_a_command_reads_it(tmp_path):
    (tmp_path / ".env").write_text(f"AMPSYNC_DATABASE_URL=sqlite:///{tmp_path / 'q.db'}\n")
    done = run_cli("status", env=dict(CLEAN_ENV), cwd=tmp_path, timeout=60)
    named = [line for line in done.stderr.splitlines() if str(tmp_path / ".env") in line]
    assert len(named) == 1, done.stderr
    (tmp_path / ".env").unlink()
    done = run_cli("status", env=dict(CLEAN_ENV), cwd=tmp_path, timeout=60)
    assert ".env" not in done.stderr


@contextmanager
def ampsync_run(cwd: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "run", "--concurrency", "1"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_ampsync_run_writes_its_files_for_this_user_only_and_removes_the_embedded_redis(
    tmp_path, emulator
):
    """Given `ampsync run` on the defaults (SQLite in the working directory, embedded Redis);
    when it has started and is stopped; then ampsync.db and beat's schedule are 0600 and
    the embedded Redis's folder is gone from the temp directory."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {
        **CLEAN_ENV,
        "TMPDIR": str(temp),
        "AMPLITUDE_API_KEY": API_KEY,
        "AMPLITUDE_SERVER_URL": emulator[1],
    }
    with ampsync_run(tmp_path, env) as proc:
        started = poll_until(
            lambda: list(tmp_path.glob("celerybeat-schedule*")) and any(temp.iterdir()), 60
        )
        assert started, proc.stdout.read() if proc.poll() is not None else "not started"
        assert [p.name for p in temp.iterdir() if p.name.startswith("ampsync-redis-")]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    written = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.is_file()}
    assert "ampsync.db" in written and any(n.startswith("celerybeat-schedule") for n in written)
    assert set(written.values()) == {0o600}, written  # beat's shelve is several files
    assert not [p.name for p in temp.iterdir() if p.name.startswith("ampsync-redis-")]
