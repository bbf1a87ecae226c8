"""The emulator is one per test session: a test that sets faults or leaves data behind must
not change the next test. `make_stack` and `pg` reset it as they hand it over.

Each pair below is a test that leaves the emulator dirty and the test after it (pytest runs a
file's tests in order), which finds it clean. The second skips when the first did not run
in this process (selected alone, or on another xdist worker): there is nothing to prove.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import asdict, fields

import pytest
from support import API_KEY

from ampsync_emulator import Faults

# A value other than the default for every fault the emulator has.
DIRTY = {
    "latency_ms": 5000,
    "fail_before_rate": 1.0,
    "fail_codes": [502],
    "fail_after_rate": 1.0,
    "html_error_rate": 1.0,
    "reset_rate": 1.0,
    "slow_rate": 1.0,
    "slow_seconds": 9,
    "throttled_users": {"user-left-behind": time.time() + 3600},
    "daily_quota_users": ["user-left-behind"],
    "max_events_per_request": 1,
    "max_bytes_per_request": 10,
    "fail_next": [{"code": 500}],
    "down": True,
    "seed": 1,
    "per_user_eps_limit": False,
    "gateway_html_400_rate": 1.0,
    "firewall_block": ["Leftover"],
    "firewall_block_all": True,
    "user_updates_per_hour": 0,
}

left_behind: dict[str, bool] = {}


@pytest.fixture(scope="module", autouse=True)
def _clean_emulator_after_this_file(emulator):
    """Whatever the last test here left, tests of other files using the emulator directly
    start clean."""
    yield
    emulator[0].reset()
    emulator[0].set_faults(**asdict(Faults()))


def leave_the_emulator_dirty(stack) -> None:
    """Received data, then every fault set to something else than its default."""
    body = json.dumps(
        {"api_key": API_KEY, "events": [{"user_id": "user-left-behind", "event_type": "Leftover"}]}
    ).encode()
    request = urllib.request.Request(
        f"{stack.base_url}/batch", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200
    assert set(DIRTY) == {f.name for f in fields(Faults)}, "give the new fault a DIRTY value"
    stack.emulator.set_faults(**DIRTY)
    faults = asdict(stack.emulator.faults)
    assert all(faults[name] != default for name, default in asdict(Faults()).items())
    assert stack.state()["counts"]["events_received"] == 1


def assert_clean(stack) -> None:
    assert asdict(stack.emulator.faults) == asdict(Faults())
    state = stack.state()
    assert state["users"] == {} and state["events"] == [] and state["rejected"] == []
    assert state["counts"]["events_received"] == 0 and state["counts"]["requests"] == {}


def test_a_test_may_leave_every_fault_set_and_data_in_the_emulator(make_stack):
    leave_the_emulator_dirty(make_stack())
    left_behind["make_stack"] = True


def test_the_next_test_gets_the_emulator_from_make_stack_without_faults_or_data(make_stack):
    if not left_behind.get("make_stack"):
        pytest.skip("runs after the test that leaves the emulator dirty")
    assert_clean(make_stack())


def test_a_test_on_the_shared_pg_stack_may_leave_every_fault_set_and_data_behind(pg):
    leave_the_emulator_dirty(pg)
    left_behind["pg"] = True


def test_the_next_test_gets_the_emulator_from_pg_without_faults_or_data(pg):
    if not left_behind.get("pg"):
        pytest.skip("runs after the test that leaves the emulator dirty")
    assert_clean(pg)
