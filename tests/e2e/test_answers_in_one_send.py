"""Answers that shape the rest of one send: a 429 for a user holds that user's later rows of
the same batch, and a request too large in bytes is split until it fits."""

from __future__ import annotations

import time

from support import event, identify
from support.reliability import in_flight, wait_for

HOT = "user-hot01"


def _batch_answers(stack) -> dict[str, int]:
    return stack.state()["counts"]["requests"].get("/batch", {})


def test_a_429_holds_the_throttled_users_later_rows_of_the_same_send_in_order_and_sends_the_rest(
    make_stack,
):
    # given one batch in which a throttled user's four rows alternate with other users' rows,
    # and an Amplitude that takes two events a request (the batch goes out in several
    # requests of one send, each after a 413 split) and throttles that user for 2 s
    stack = make_stack(AMPSYNC_BATCH_SIZE="100", AMPSYNC_THROTTLE_WAIT_BATCH="3")
    rows = []
    for n in range(4):
        rows.append(identify(HOT, {"$append": {"seen": n}}))
        rows.append(identify(f"user-cold{n}", {"n": n}))
    ids = stack.insert(rows)
    hot, cold = ids[0::2], ids[1::2]
    stack.start_worker(concurrency=1)
    stack.emulator.set_faults(max_events_per_request=2, throttled_users={HOT: time.time() + 2})
    # when one sync claims the batch and its one send is over
    assert stack.sync()["batches_enqueued"] == 1
    wait_for(lambda: not in_flight(stack), 20, "the send to finish")
    # then the other users' rows were sent, and only the first of the user's rows met the
    # 429: the later ones were held back without being sent, all waiting, attempts refunded
    after_send = stack.rows()
    assert [after_send[i]["status"] for i in cold] == ["sent"] * 4
    assert [(after_send[i]["status"], after_send[i]["attempts"]) for i in hot] == [
        ("pending", 0)
    ] * 4
    assert all("429" in after_send[i]["last_error"] for i in hot)
    assert _batch_answers(stack).get("429") == 1
    assert HOT not in stack.state()["users"]
    # and once the throttle is over, the user's rows arrive in their order
    assert stack.drain(timeout=30) == {"sent": 8}
    assert stack.state()["users"][HOT]["user_properties"]["seen"] == [0, 1, 2, 3]


def test_a_request_too_large_in_bytes_is_split_until_it_fits_and_every_row_is_delivered(
    make_stack,
):
    # given 40 events of about 1.1 kB each, and an Amplitude (or a proxy before it) that takes
    # at most 20 kB a request: far fewer rows than any count limit
    stack = make_stack(AMPSYNC_BATCH_SIZE="40")
    stack.insert(
        [
            event(f"user-{n:05d}", "Profile Synced", {"bio": "x" * 1000, "n": n}, insert_id=f"b{n}")
            for n in range(40)
        ]
    )
    stack.start_worker(concurrency=1)
    stack.emulator.set_faults(max_bytes_per_request=20_000)
    # when the batch is sent
    assert stack.drain(timeout=30) == {"sent": 40}
    # then Amplitude refused requests for their bytes, and the halves it took carried every
    # row exactly once
    state = stack.state()
    too_large = [r for r in state["rejected"] if r["status"] == 413]
    assert too_large and all("bytes >" in r["error"] for r in too_large)
    assert state["counts"]["events_unique"] == 40 and state["counts"]["duplicates"] == 0
    assert sorted(e["event_properties"]["n"] for e in state["events"]) == list(range(40))
    assert _batch_answers(stack)["200"] >= 3  # 44 kB in requests of at most 20 kB
