"""The emulator's page at `/`, opened in headless Chromium, shows what the real pipeline sent:
the users with their properties, events by type, and the requests it rejected."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from support import event, group, identify

CHROMIUM = next(
    (
        path
        for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
        if (path := shutil.which(name))
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH to open the emulator's page (apt-get install -y chromium)",
)


def browse(url: str, profile: Path) -> str:
    """The page's DOM as headless Chromium renders it (loopback only, no background traffic)."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0 and "<table" in done.stdout, done.stderr[-2000:]
    return done.stdout


class Rows(HTMLParser):
    """Every table row of the page: (table id, the row's attributes, {cell class: text})."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self._table = ""
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._table = a.get("id", "")
        elif tag == "tr":
            self.rows.append((self._table, a, {}))
        elif tag == "td" and self.rows:
            self._cell = a.get("class", "")
            self.rows[-1][2][self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self.rows[-1][2][self._cell] += data

    def table(self, table_id: str, key: str) -> dict[str, dict[str, str]]:
        return {
            attrs[key]: cells for t, attrs, cells in self.rows if t == table_id and key in attrs
        }


def test_the_page_shows_the_users_events_and_rejections_the_pipeline_produced(pg, tmp_path):
    # given CRM identifies (a later row of a user wins, $unset clears), offline events (one
    # order inserted twice with the same insert_id), a group, and Amplitude failing once
    pg.insert(
        [
            identify("user-00001", {"CRM_Segment": "gold", "CRM_Level": 1}),
            identify("user-00002", {"CRM_Segment": "gold", "CRM_Group": "b2b"}),
            identify("user-00001", {"CRM_Segment": "silver", "CRM_Level": 2}),
            identify("user-00002", {"$unset": {"CRM_Group": "-"}}),
            event("user-00001", "Order Picked Up", {"order_id": 1}, insert_id="order-1"),
            event("user-00001", "Order Picked Up", {"order_id": 1}, insert_id="order-1"),
            event("user-00003", "Order Picked Up", {"order_id": 2}, insert_id="order-2"),
            event("user-00003", "Store Visit", {"store": "A"}),
            group("company", "Acme Ltd", {"plan": "enterprise"}),
        ]
    )
    pg.emulator.set_faults(fail_next=[{"path": "/batch", "code": 503}])
    # when the pipeline delivers them
    assert pg.drain() == {"sent": 9}
    # and the page is opened in a browser
    page = Rows()
    page.feed(browse(pg.base_url + "/", tmp_path / "chromium-profile"))

    # then each user shows the properties the rows set, in row order
    users = page.table("users", "data-user-id")
    assert {uid: json.loads(cells["props"]) for uid, cells in users.items()} == {
        "user-00001": {"CRM_Segment": "silver", "CRM_Level": 2},
        "user-00002": {"CRM_Segment": "gold"},
        "user-00003": {},
    }
    assert {uid: (c["active"], c["events"]) for uid, c in users.items()} == {
        "user-00001": ("yes", "1"),
        "user-00002": ("no", "0"),
        "user-00003": ("yes", "2"),
    }
    # and events by type count each order once; user 1's two `$set` rows went as one update,
    # the group row as a $groupidentify event
    types = page.table("event-types", "data-event-type")
    assert {t: int(c["count"]) for t, c in types.items()} == {
        "$identify": 3,
        "$groupidentify": 1,
        "Order Picked Up": 2,
        "Store Visit": 1,
    }
    # and the group
    groups = [
        (a["data-group-type"], a["data-group-value"], json.loads(c["props"]))
        for t, a, c in page.rows
        if t == "groups" and "data-group-type" in a
    ]
    assert groups == [("company", "Acme Ltd", {"plan": "enterprise"})]
    # and the one request Amplitude refused, which the pipeline then re-sent
    rejected = [cells for t, attrs, cells in page.rows if t == "rejected" and cells]
    assert [(r["path"], r["status"]) for r in rejected] == [("/batch", "503")]
    assert "not ingested" in rejected[0]["error"]
    # and the page agrees with the emulator's own state
    state = pg.state()
    assert {uid: u["user_properties"] for uid, u in state["users"].items()} == {
        uid: json.loads(c["props"]) for uid, c in users.items()
    }
    counts = next(cells for t, _, cells in page.rows if t == "counts" and cells)
    assert int(counts["events-unique"]) == state["counts"]["events_unique"] == 7
    assert int(counts["duplicates"]) == state["counts"]["duplicates"] == 1
