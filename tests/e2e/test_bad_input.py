"""Bad rows in the queue table: each ends `failed` alone, with a reason a person can act on,
and never takes the valid rows of its batch down with it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from support import PG_URL, event, group, identify

pytestmark = pytest.mark.reliability


def nested(depth: int) -> dict:
    """A property object `depth` levels deep (the object itself is level 1)."""
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"level": value}
    return value


def raw(kind: str, **columns) -> dict:
    """A row as a user's SQL might write it, properties and extra taken as written."""
    return {"kind": kind, **columns}


IN_TWO_DAYS = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=2)

# (case, row, expected last_error — None: the row is valid and must be sent)
CASES = [
    (
        "invalid JSON",
        raw("identify", user_id="user-00001", properties='{"plan": '),
        "invalid row: properties is not valid JSON",
    ),
    (
        "JSON that is not an object",
        raw("identify", user_id="user-00002", properties="[1, 2]"),
        'invalid row: properties must be a JSON object like {"CRM_Segment": "gold"}, not a JSON list',
    ),
    (
        "extra that is not an object",
        event("user-00003", "Order Picked Up", {}, extra='"gold"'),
        "invalid row: extra must be a JSON object",
    ),
    (
        "NULL user_id and device_id",
        identify(None, {"plan": "gold"}),
        "invalid row: user_id and device_id are both empty: set at least one",
    ),
    (
        "too-short user_id",
        identify("abc", {"plan": "gold"}),
        "invalid row: user_id 'abc' is shorter than Amplitude's minimum of 5 characters "
        "(AMPSYNC_MIN_ID_LENGTH)",
    ),
    (
        "user_id 'null'",
        identify("null", {"plan": "gold"}),
        "invalid row: user_id 'null' is a placeholder Amplitude rejects",
    ),
    (
        "user_id 'anonymous'",
        event("anonymous", "Order Picked Up", {}),
        "invalid row: user_id 'anonymous' is a placeholder Amplitude rejects",
    ),
    (
        "zero device_id",
        event(None, "Order Picked Up", {}, device_id="00000000-0000-0000-0000-000000000000"),
        "invalid row: device_id '00000000-0000-0000-0000-000000000000' is a placeholder",
    ),
    (
        "missing event_type",
        event("user-00004", None, {}),
        "invalid row: event_type is empty: an event row needs an event_type",
    ),
    (
        "reserved event_type",
        event("user-00005", "$identify", {}),
        "invalid row: event_type '$identify' is reserved by Amplitude",
    ),
    (
        "1025 property keys",
        event("user-00006", "Order Picked Up", {f"k{i}": i for i in range(1025)}),
        "invalid row: properties has 1,025 keys; Amplitude accepts at most 1,024",
    ),
    (
        "1024 property keys (the limit)",
        event("user-00007", "Order Picked Up", {f"k{i}": i for i in range(1024)}),
        None,
    ),
    (
        "event properties nested 41 deep",
        event("user-00008", "Order Picked Up", nested(41)),
        "invalid row: properties.level.level",
    ),
    (
        "event properties nested 40 deep (the limit)",
        event("user-00009", "Order Picked Up", nested(40)),
        None,
    ),
    (
        "identify plain keys that reach 41 levels under $set",
        identify("user-00019", {"deep": nested(39)}),
        "nests deeper than Amplitude's 40 levels",
    ),
    (
        "identify under $set 40 deep (the limit)",
        identify("user-00020", {"$set": {"deep": nested(38)}}),
        None,
    ),
    (
        "a 5000-character value (cut, as Amplitude would)",
        event("user-00010", "Order Picked Up", {"note": "x" * 5000}),
        None,
    ),
    (
        "unknown kind",
        raw("purchase", user_id="user-00011", properties="{}"),
        "invalid row: kind 'purchase' is not one of identify, event, group_identify",
    ),
    (
        "non-UTF-8 text",
        identify("user-00012", {"plan": "PLACEHOLDER"}),
        "invalid row: properties is not valid UTF-8 text",
    ),
    (
        "event_time two days ahead",
        event("user-00013", "Order Picked Up", {}, event_time=IN_TWO_DAYS),
        "beyond AMPSYNC_MAX_FUTURE_SECONDS: write times in UTC (SYSUTCDATETIME())",
    ),
    (
        "extra that sets a column's field",
        event("user-00014", "Order Picked Up", {}, extra=json.dumps({"user_id": "someone-else"})),
        "invalid row: extra sets user_id, which the row's columns fill: move the value to its "
        "column",
    ),
    (
        "unsupported operation",
        identify("user-00015", {"$increment": {"visits": 1}}),
        "invalid row: properties uses $increment, which identify does not support",
    ),
    (
        "operation on a non-object",
        identify("user-00016", {"$add": 5}),
        "invalid row: properties.$add must be a JSON object of property names",
    ),
    (
        "identify with nothing to set",
        identify("user-00017", {}),
        "invalid row: properties is empty: an identify row needs properties to set",
    ),
    (
        "group_identify without group_value",
        group("company", None, {"plan": "gold"}),
        "invalid row: group_value is empty: a group_identify row needs it",
    ),
    (
        "a field Amplitude rejects (its 400 names the event)",
        event("user-00018", "Order Picked Up", {}, extra=json.dumps({"price": "twelve"})),
        "rejected by Amplitude: price: invalid fields",
    ),
]

# The non-UTF-8 bytes: {"plan": "<0xff>"} — only SQLite stores text that is not UTF-8.
NOT_UTF8 = "CAST(X'7b22706c616e223a2022ff227d' AS TEXT)"


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_each_bad_row_fails_alone_with_a_reason_and_every_valid_row_around_it_is_sent(
    make_stack, tmp_path, database
):
    url = f"sqlite:///{tmp_path / 'queue.db'}" if database == "sqlite" else PG_URL
    cases = [c for c in CASES if database == "sqlite" or c[0] != "non-UTF-8 text"]
    stack = make_stack(url)
    # given every bad row between two valid rows of its kind, all in one batch per kind
    rows, bad_at = [], {}

    def valid_row(kind: str) -> dict:
        n = len(rows)
        return {
            "identify": identify(f"good-{n:05d}", {"$add": {"visits": 1}}),
            "event": event(f"good-{n:05d}", "Order Picked Up", {"seq": n}),
            "group_identify": group("company", f"good-{n:05d}", {"plan": "gold"}),
        }.get(kind) or event(f"good-{n:05d}", "Order Picked Up", {"seq": n})

    for name, row, _ in cases:
        rows.append(valid_row(row["kind"]))
        bad_at[name] = len(rows)
        rows.append(row)
        rows.append(valid_row(row["kind"]))
    ids = stack.insert(rows)
    by_case = {name: ids[index] for name, index in bad_at.items()}
    if "non-UTF-8 text" in by_case:
        with stack.engine.begin() as conn:
            conn.exec_driver_sql(
                f"UPDATE {stack.table} SET properties = {NOT_UTF8} "
                f"WHERE id = {by_case['non-UTF-8 text']}"
            )
    # when a worker delivers the queue
    stack.start_worker(concurrency=2)
    stack.drain(timeout=60)
    # then each bad row failed with its reason, and each valid one was sent
    final = stack.rows()
    outcome = {
        name: (final[by_case[name]]["status"], final[by_case[name]]["last_error"])
        for name in by_case
    }
    for name, _, reason in cases:
        status, error = outcome[name]
        if reason is None:
            assert (status, error) == ("sent", None), name
        else:
            failure_class = (
                "rejected by Amplitude:" if reason.startswith("rejected") else ("invalid row:")
            )
            assert status == "failed" and error.startswith(failure_class), (name, error)
            assert reason.removeprefix(failure_class).strip() in error, (name, error)
    valid = [i for i in ids if i not in set(by_case.values())]
    assert {final[i]["status"] for i in valid} == {"sent"}
    # and at Amplitude: every valid event and identification arrived, and no bad row sank a
    # batch — one 400 (the row Amplitude rejects), answered by re-sending the rest at once
    state = stack.state()
    sent = [r for r in final.values() if r["status"] == "sent"]
    # every kind goes as events through Batch: identify rows as $identify (several `$set`s of
    # one user as one), group rows as $groupidentify
    types = [e["event_type"] for e in state["events"]]
    n_identify_users = len(
        {r["user_id"] or r["device_id"] for r in sent if r["kind"] == "identify"}
    )
    assert types.count("$groupidentify") == sum(1 for r in sent if r["kind"] == "group_identify")
    assert types.count("$identify") <= sum(1 for r in sent if r["kind"] == "identify")
    assert types.count("$identify") >= n_identify_users
    assert len(types) - types.count("$identify") - types.count("$groupidentify") == sum(
        1 for r in sent if r["kind"] == "event"
    )
    assert state["counts"]["identifications"] == types.count("$identify") + types.count(
        "$groupidentify"
    )
    assert state["counts"]["requests"]["/batch"].get("400") == 1
