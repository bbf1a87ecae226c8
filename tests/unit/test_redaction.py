"""No secret in any output (tasks/redact.py): URL passwords, password-like parameters and known
secrets are masked wherever a URL or a message is shown, and a message is redacted before it
is cut. Also what uses it: settings errors, `repr()` of the settings and of a feed, the plain
http:// rule for AMPLITUDE_SERVER_URL."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks import redact, settings
from tasks.feeds.config import Feed
from tasks.settings import Settings

KEY = "amp-key-9f8e7d6c5b4a39281706"

URLS = [
    # (given, shown)
    ("postgresql://u:Secr3tPw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://postgres@127.0.0.1/test", "postgresql://postgres@127.0.0.1/test"),
    ("mssql+pymssql://sa:p@ss/w0rd#1@dwh:1433/crm", "mssql+pymssql://sa:***@dwh:1433/crm"),
    ("postgresql://u:pa ss word@h/db", "postgresql://u:***@h/db"),
    ("redis://:BrokerPw99@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://default:BrokerPw99@redis:6379/0", "redis://default:***@redis:6379/0"),
    (
        "redis://127.0.0.1:6379/0?password=BrokerPw99&db=1",
        "redis://127.0.0.1:6379/0?password=***&db=1",
    ),
    (
        "postgresql://h/db?user=u&PWD=Pw123456&sslmode=require",
        "postgresql://h/db?user=u&PWD=***&sslmode=require",
    ),
    ("https://proxyuser:ProxyPw1@proxy.example", "https://proxyuser:***@proxy.example"),
    ("https://tok3nTOKEN@proxy.example", "https://***@proxy.example"),
    ("http://127.0.0.1:8087?api_key=" + KEY, "http://127.0.0.1:8087?api_key=***"),
    ("mysql+pymysql://root@h/test?charset=utf8mb4", "mysql+pymysql://root@h/test?charset=utf8mb4"),
    ("sqlite:///ampsync.db", "sqlite:///ampsync.db"),
    ("redis+socket:///tmp/x/redis.socket", "redis+socket:///tmp/x/redis.socket"),
    ("not a url", "not a url"),
]


@pytest.mark.parametrize(("given", "shown"), URLS, ids=[u[0][:40] for u in URLS])
def test_given_a_url_when_redacted_then_only_its_secrets_are_masked(given, shown):
    assert redact.url(given) == shown


def test_given_an_odbc_connection_string_in_a_url_when_redacted_then_its_password_is_masked():
    given = "mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BODBC%7D%3BSERVER%3Ddwh%3BPWD%3DOdbcPw77"
    shown = redact.url(given)
    assert "OdbcPw77" not in shown
    assert "SERVER=dwh" in shown  # still says which server


def test_given_an_at_sign_in_the_query_when_redacted_then_more_is_masked_never_less():
    shown = redact.url("postgresql://u:Secr3tPw@h/db?application_name=a@b")
    assert "Secr3tPw" not in shown


MESSAGES = [
    # (message, known secrets, must not appear, must appear)
    (
        "cannot reach http://u:ProxyPw1@10.0.0.9:8080/batch: ConnectionError",
        [],
        "ProxyPw1",
        "http://u:***@10.0.0.9:8080/batch",
    ),
    (f"Invalid API key: {KEY}", [KEY], KEY, "Invalid API key: ***"),
    (
        "login failed: Server=dwh;Uid=sa;Pwd=SaPw12345;Database=crm",
        [],
        "SaPw12345",
        "Pwd=***",
    ),
    ("the broker said 'NOAUTH' for BrokerPw99 twice", ["BrokerPw99"], "BrokerPw99", "***"),
    (
        "two URLs: redis://:BrokerPw99@r:6379/0 and 'postgresql://u:Secr3tPw@h/db'",
        [],
        "Pw99",
        "'postgresql://u:***@h/db'",
    ),
]


@pytest.mark.parametrize(("message", "secrets", "absent", "present"), MESSAGES)
def test_given_a_message_when_redacted_then_no_secret_is_left_and_the_rest_is(
    message, secrets, absent, present
):
    shown = redact.text(message, secrets)
    assert absent not in shown
    assert present in shown


def test_given_a_short_known_secret_when_a_message_is_redacted_then_the_message_is_not_mangled():
    """Replacing a 2-letter password everywhere would garble the line; URLs still hide it."""
    shown = redact.text("upload failed at postgresql://u:pw@h/db", ["pw"])
    assert shown == "upload failed at postgresql://u:***@h/db"


@pytest.mark.parametrize("offset", range(-len(KEY) + 1, 1))
def test_given_a_key_spanning_the_cut_when_a_message_is_cut_then_no_part_of_it_is_left(offset):
    """Cut first, then redact, would leave the key's first characters at the end."""
    limit = 200
    message = "x" * (limit + offset) + KEY + " tail"
    shown = redact.cut(message, limit, [KEY])
    assert len(shown) <= limit
    assert KEY[:6] not in shown


def test_given_a_url_when_its_secrets_are_listed_then_password_and_secret_parameters_raw_and_decoded():
    found = redact.secrets_of("redis://default:Pw%40123456@r:6379/0?token=Tok987654&db=1")
    assert set(found) == {"Pw%40123456", "Pw@123456", "Tok987654"}
    assert redact.secrets_of("sqlite:///ampsync.db") == []
    assert redact.secrets_of(None) == []


# --- settings ------------------------------------------------------------------------------

BAD_URLS = [
    # (variable, a malformed value carrying a password, the password)
    ("AMPSYNC_DATABASE_URL", "postgresql://u:DbPw12345@h:notaport/db", "DbPw12345"),
    ("AMPSYNC_DATABASE_URL", "mssql+pyodbc://sa:DbPw12345@dwh/crm?driver=x", "DbPw12345"),
    ("AMPSYNC_DATABASE_URL", "not-a-url://u:DbPw12345@h", "DbPw12345"),
    ("CELERY_BROKER_URL", "amqp://guest:BrokerPw99@rabbit:5672//", "BrokerPw99"),
    ("CELERY_BROKER_URL", "rabbit://h/0?password=BrokerPw99", "BrokerPw99"),
    ("AMPLITUDE_SERVER_URL", "https://u:ServerPw77@proxy.example/amplitude", "ServerPw77"),
    ("AMPLITUDE_SERVER_URL", "ftp://u:ServerPw77@proxy.example", "ServerPw77"),
    ("AMPLITUDE_SERVER_URL", "http://u:ServerPw77@amplitude.example.com", "ServerPw77"),
]


@pytest.mark.parametrize(("variable", "value", "password"), BAD_URLS)
def test_given_a_wrong_url_with_a_password_when_settings_load_then_the_line_names_it_without_the_password(
    variable, value, password, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv(variable, value)
    with pytest.raises(settings.SettingsError) as error:
        settings.load()
    line = str(error.value)
    assert variable in line
    assert password not in line
    assert "\n" not in line


def test_given_settings_with_secrets_when_shown_with_repr_or_str_then_no_secret_appears():
    s = Settings(
        _env_file=None,
        AMPLITUDE_API_KEY=KEY,
        AMPSYNC_DATABASE_URL="postgresql://u:DbPw12345@h/db?sslpassword=SslPw555",
        CELERY_BROKER_URL="redis://default:BrokerPw99@127.0.0.1:6379/6",
        AMPLITUDE_SERVER_URL="http://u:ServerPw77@127.0.0.1:8087",
    )
    for shown in (repr(s), str(s), f"{s!r}"):
        for secret in (KEY, "DbPw12345", "SslPw555", "BrokerPw99", "ServerPw77"):
            assert secret not in shown
        assert "u:***@h/db" in shown  # still says which database
    assert set(s.secrets()) >= {KEY, "DbPw12345", "SslPw555", "BrokerPw99", "ServerPw77"}


def test_given_a_feed_with_a_source_password_when_shown_with_repr_then_the_password_is_masked():
    feed = Feed(name="crm", kind="identify", source_url="mssql+pymssql://ro:SrcPw4321@crm/db")
    shown = repr(feed)
    assert "SrcPw4321" not in shown
    assert "mssql+pymssql://ro:***@crm/db" in shown and "name='crm'" in shown


@pytest.mark.parametrize(
    "url",
    ["http://api2.amplitude.com", "http://10.0.0.5:8087", "http://emulator:8087"],
    ids=["Amplitude", "a private address", "a service name"],
)
def test_given_plain_http_to_another_host_when_validated_then_it_is_refused(url):
    with pytest.raises(ValidationError) as error:
        Settings(_env_file=None, AMPLITUDE_SERVER_URL=url)
    (err,) = error.value.errors()
    assert err["loc"] == ("AMPLITUDE_SERVER_URL",)
    assert "plain http:// is refused" in err["msg"] and "https://" in err["msg"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8087",
        "http://127.0.0.9:8087",
        "http://[::1]:8087",
        "http://localhost:8087",
        "https://api2.amplitude.com",
        "https://10.0.0.5:8443",
    ],
)
def test_given_plain_http_to_this_machine_or_https_anywhere_when_validated_then_it_is_accepted(url):
    assert Settings(_env_file=None, AMPLITUDE_SERVER_URL=url).server_url == url


def test_given_a_host_named_for_plain_http_when_validated_then_http_to_it_is_accepted():
    s = Settings(
        _env_file=None,
        AMPSYNC_PLAIN_HTTP_HOSTS="emulator, other",
        AMPLITUDE_SERVER_URL="http://emulator:8087",
    )
    assert s.server_url == "http://emulator:8087"
