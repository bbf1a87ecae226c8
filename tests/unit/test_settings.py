"""Settings (tasks/settings.py) that decide where rows go and how: the server URL, the group
identify API, the order of events after identify rows."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks import settings
from tasks.settings import Settings

NO_PATH = (
    "must be the server's address without a path (ampsync appends /2/httpapi, /batch, "
    "/identify, /groupidentify), such as https://api2.amplitude.com"
)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/x",
        "https://api2.amplitude.com/2/httpapi",
        "http://127.0.0.1:8087/batch/",
        "http://127.0.0.1:8087/proxy/amplitude",
        "http://127.0.0.1:8087?key=1",
        "http://127.0.0.1:8087/?key=1",
    ],
    ids=["short path", "an API's path", "path with a slash", "proxy prefix", "query", "/?query"],
)
def test_given_a_server_url_with_a_path_or_query_when_validated_then_it_is_refused(url):
    """A path makes every request miss the API (`Invalid request path`): refused at start."""
    with pytest.raises(ValidationError) as error:
        Settings(_env_file=None, AMPLITUDE_SERVER_URL=url)
    (err,) = error.value.errors()
    assert err["loc"] == ("AMPLITUDE_SERVER_URL",)
    assert err["msg"] == f"Value error, {NO_PATH}"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8087", "http://127.0.0.1:8087"),
        ("http://127.0.0.1:8087/", "http://127.0.0.1:8087"),
        ("https://api.eu.amplitude.com//", "https://api.eu.amplitude.com"),
        ("", "https://api2.amplitude.com"),
    ],
    ids=["address", "trailing slash", "trailing slashes", "empty: the region's"],
)
def test_given_a_server_address_without_a_path_when_validated_then_it_is_the_server_url(
    url, expected
):
    s = Settings(_env_file=None, AMPLITUDE_SERVER_URL=url, AMPLITUDE_REGION="us")
    assert s.server_url == expected


def test_given_a_server_url_with_a_path_when_loaded_then_the_process_stops_with_one_line(
    monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("AMPLITUDE_SERVER_URL", "http://127.0.0.1:1/x")
    with pytest.raises(settings.SettingsError) as error:
        settings.load()
    message = str(error.value)
    assert message == f"ampsync: AMPLITUDE_SERVER_URL='http://127.0.0.1:1/x': {NO_PATH}"
    assert "\n" not in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "batch"),
        ("batch", "batch"),
        ("http_v2", "http_v2"),
        ("groupidentify", "groupidentify"),
    ],
    ids=["default: batch", "batch", "http_v2", "the form API"],
)
def test_given_the_group_identify_api_when_validated_then_it_is_an_event_api_or_the_form_api(
    value, expected, monkeypatch
):
    monkeypatch.delenv("AMPSYNC_GROUP_IDENTIFY_API", raising=False)  # the default is the code's
    given = {} if value is None else {"AMPSYNC_GROUP_IDENTIFY_API": value}
    assert Settings(_env_file=None, **given).group_identify_api == expected


@pytest.mark.parametrize("value", ["identify", "form", ""], ids=["identify", "form", "empty"])
def test_given_an_unknown_group_identify_api_when_validated_then_it_is_refused(value):
    with pytest.raises(ValidationError) as error:
        Settings(_env_file=None, AMPSYNC_GROUP_IDENTIFY_API=value)
    assert error.value.errors()[0]["loc"] == ("AMPSYNC_GROUP_IDENTIFY_API",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, True), ("false", False), ("0", False), ("true", True)],
    ids=["default: on", "false", "0", "true"],
)
def test_given_events_after_identify_when_validated_then_it_is_a_switch_on_by_default(
    value, expected, monkeypatch
):
    monkeypatch.delenv("AMPSYNC_EVENTS_AFTER_IDENTIFY", raising=False)  # the default is the code's
    given = {} if value is None else {"AMPSYNC_EVENTS_AFTER_IDENTIFY": value}
    assert Settings(_env_file=None, **given).events_after_identify is expected


def test_given_no_setting_when_loaded_then_there_is_no_events_per_second_cap(monkeypatch):
    """Full speed by default: a fixed cap held paying projects at the Starter plan's 1000/s."""
    monkeypatch.delenv("AMPSYNC_EVENTS_PER_SECOND", raising=False)  # conftest sets it
    assert Settings(_env_file=None).events_per_second == 0
