"""The text `ampsync metrics` serves, read back by prometheus_client's parser (written apart
from ours): label values with quotes, backslashes and newlines, counters, whole and
fractional numbers."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tasks.cli.metrics import Family, exposition


def test_label_values_and_numbers_read_back_as_written():
    # given a gauge whose label values need escaping, and a counter
    feed = Family("ampsync_feed_last_run_failed", "gauge", "1 if the feed's last run failed")
    feed.add(1, feed='crm "gold" \\ segment\nnew')
    feed.add(0.25, feed="plain")
    sent = Family("ampsync_rows_sent_total", "counter", "Rows sent")
    sent.add(3, kind="identify")
    # when they are written and parsed as Prometheus parses them
    families = {f.name: f for f in text_string_to_metric_families(exposition([feed, sent]))}
    # then every label value and number comes back as it was
    gauge = families["ampsync_feed_last_run_failed"]
    assert gauge.type == "gauge"
    assert [(s.labels, s.value) for s in gauge.samples] == [
        ({"feed": 'crm "gold" \\ segment\nnew'}, 1.0),
        ({"feed": "plain"}, 0.25),
    ]
    # and the counter is a counter named without its _total, as Prometheus names the family
    counter = families["ampsync_rows_sent"]
    assert counter.type == "counter"
    assert [(s.name, s.labels, s.value) for s in counter.samples] == [
        ("ampsync_rows_sent_total", {"kind": "identify"}, 3.0)
    ]
