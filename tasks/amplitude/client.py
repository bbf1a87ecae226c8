"""The Amplitude HTTP client: request bodies and one keep-alive session per process.

The API key goes into request bodies only; every text this module returns is redacted (the
key, the server URL's password) before it is cut. Redirects are never followed: a 3xx is an
answer like any other, so a request body, key included, goes to the configured server only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson
import requests
from requests.adapters import HTTPAdapter

from .. import redact
from .limits import FORM_ENDPOINTS, PATHS
from .payloads import Prepared


@dataclass
class Answer:
    status: int  # HTTP status; 0 when no answer came (timeout, connection error)
    body: dict[str, Any] | None  # the JSON answer, when it was JSON
    text: str  # a short, redacted description for last_error and logs
    seconds: float = 0.0


class Client:
    """One per worker process: a pooled keep-alive session to the Amplitude host."""

    def __init__(
        self, server_url: str, api_key: str, timeout: float, min_id_length: int = 5
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self._key = api_key
        self._secrets = [api_key, *redact.secrets_of(self.server_url)]
        self._timeout = (min(10.0, timeout), timeout)
        self._options = (
            b""
            if min_id_length == 5
            else (b',"options":{"min_id_length":' + str(min_id_length).encode() + b"}")
        )
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def body(self, endpoint: str, items: Sequence[Prepared]) -> tuple[bytes, str]:
        blobs = b",".join(item.blob for item in items)
        if endpoint in FORM_ENDPOINTS:
            form = urlencode({"api_key": self._key, "identification": b"[" + blobs + b"]"})
            return form.encode(), "application/x-www-form-urlencoded"
        envelope = b'{"api_key":' + orjson.dumps(self._key) + b',"events":['
        return envelope + blobs + b"]" + self._options + b"}", "application/json"

    def send(self, endpoint: str, items: Sequence[Prepared]) -> Answer:
        data, content_type = self.body(endpoint, items)
        url = self.server_url + PATHS[endpoint]
        started = time.perf_counter()
        try:
            response = self.session.post(
                url,
                data=data,
                headers={"Content-Type": content_type},
                timeout=self._timeout,
                allow_redirects=False,
            )
        except requests.Timeout:
            return Answer(
                0,
                None,
                self.redact(f"no answer from {url} within {self._timeout[1]:g} s"),
                time.perf_counter() - started,
            )
        except requests.RequestException as exc:
            return Answer(
                0,
                None,
                self.redact(f"cannot reach {url}: {_root_cause(exc)}", 500),
                time.perf_counter() - started,
            )
        seconds = time.perf_counter() - started
        try:
            body = orjson.loads(response.content) if response.content else None
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            body = None
        if response.is_redirect:
            text = (
                "redirected (ampsync follows no redirect: set AMPLITUDE_SERVER_URL to the "
                f"address that answers) to {response.headers.get('Location', '')}"
            )
            return Answer(response.status_code, None, self.redact(text, 500), seconds)
        # Far more than the 200 characters kept, and redacted before that cut: a secret cut
        # here cannot reach the text kept.
        text = " ".join(response.text[:20_000].split())
        if body is None:
            return Answer(response.status_code, None, self.redact(text, 200), seconds)
        return Answer(response.status_code, body, self.redact(str(body.get("error", ""))), seconds)

    def redact(self, text: str, limit: int | None = None) -> str:
        """`text` without the key or the server URL's password, then cut to `limit`."""
        return redact.cut(text, len(text) if limit is None else limit, self._secrets)

    def close(self) -> None:
        self.session.close()


def _root_cause(exc: BaseException) -> str:
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    return f"{type(exc).__name__}: {exc}"
