"""Real parts, really started: a Celery worker subprocess on a real Redis, real PostgreSQL /
MariaDB / SQLite queue tables, and the emulator as Amplitude.

The test process itself only publishes tasks (`sync.delay()`) and reads the database.

The tiers: tests/unit (pure rules, no services), tests/integration (real databases and the
emulator, no worker), tests/e2e (real workers, `ampsync` commands, Flower, Chromium). Test
files import their helpers from tests/support, never from here; this file holds the fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# First: importing support prepares the test process's environment (broker URL, no API key)
# before anything imports `tasks`. It connects to nothing.
from support import (
    API_KEY,
    DEFAULT_FAULTS,
    PG_URL,
    RUNNING,
    Emulator,
    Stack,
    drop_stack,
    flush_redis,
    new_stack,
    run_alone,
    stop_running_workers,
)

TESTS = Path(__file__).resolve().parent
TIERS = ("integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test of tests/integration and tests/e2e with its tier, so that one tier can be
    left out by marker (`-m "not e2e"`); the default run runs every tier."""
    for item in items:
        path = Path(item.path).resolve()
        if path.is_relative_to(TESTS) and path.relative_to(TESTS).parts[0] in TIERS:
            item.add_marker(path.relative_to(TESTS).parts[0])


@pytest.fixture(scope="session")
def emulator() -> Iterator[tuple[Emulator, str]]:
    emu = Emulator(api_keys={API_KEY})
    url = emu.start()
    yield emu, url
    emu.stop()


@pytest.fixture
def make_stack(emulator, tmp_path):
    """Factory: a fresh table and configuration; workers are started by the test."""
    made: list[Stack] = []

    def factory(url: str | None = None, **env: str) -> Stack:
        stop_running_workers()
        flush_redis()
        emulator[0].reset()
        emulator[0].set_faults(**DEFAULT_FAULTS)
        stack = new_stack(emulator, url or PG_URL, env)
        RUNNING.append(stack)
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        if stack in RUNNING:
            RUNNING.remove(stack)
        drop_stack(stack)


@pytest.fixture(scope="module")
def pg_stack(emulator) -> Iterator[Stack]:
    """A PostgreSQL stack with a running worker, shared by a module; cleared per test."""
    stack = new_stack(emulator, PG_URL)
    yield stack
    if stack in RUNNING:
        RUNNING.remove(stack)
    drop_stack(stack)


@pytest.fixture
def pg(pg_stack: Stack) -> Stack:
    run_alone(pg_stack)
    if not any(w.poll() is None for w in pg_stack.workers):
        flush_redis()
        pg_stack.stop_workers()
        pg_stack.start_worker()
    pg_stack.clear()
    return pg_stack
