"""Secrets out of every text ampsync shows: settings errors, logs, `status`, `last_error`.

A URL keeps its scheme, user, host, port, path and harmless parameters, so a person can still
tell which server is meant; its password and password-like query parameters become `***`.
Known secrets (the API key, the passwords of the configured URLs) are replaced wherever they
appear. A message is redacted before it is cut to a column's size: cut first, a secret that
spans the cut would leave its first characters behind. Pure: no settings, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote

MASK = "***"

# Query parameters (and `key=value` pairs of connection strings) whose value is a secret: the
# names drivers and services use for passwords, keys, tokens and signatures.
_SECRET_NAME = re.compile(
    r"pass|pwd|secret|token|key|auth|credential|signature|^sig$|^sas$", re.IGNORECASE
)

# A URL inside free text ends at whitespace or a quote; the scheme makes it a URL.
_URL_IN_TEXT = re.compile(r"""\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'"<>`]+""")

# `Password=...;` / `PWD=...` in an ODBC-style connection string inside a message.
_PAIR_IN_TEXT = re.compile(
    r"""(?P<name>\b[A-Za-z_][A-Za-z0-9_\-]*)=(?P<value>[^;&\s'"]+)""", re.IGNORECASE
)

# Schemes whose bare user-info (no colon) is a token rather than a login name.
_TOKEN_USERINFO_SCHEMES = ("http", "https")

# Known secrets shorter than this are left to the structural rules: replacing a two-letter
# password everywhere would mangle the rest of the message.
MIN_SECRET_LENGTH = 4

_HOST_AND_REST = re.compile(r"^[^/?#@\s]*(?:[/?#]|$)")


def is_secret_name(name: str) -> bool:
    """Whether a query parameter or connection-string key holds a secret."""
    return bool(_SECRET_NAME.search(name))


def url(value: str) -> str:
    """One URL with its password and secret query parameters masked; malformed URLs too.

    The user-info ends at the last `@` that is followed by a host (an unencoded `@` or `/` in
    a password is a common mistake): everything between `://` and it but the user name is
    masked. Text that is not a URL is returned unchanged, apart from secret `name=value`
    pairs.
    """
    scheme, sep, rest = value.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        return _pairs(value)
    at = _userinfo_end(rest)
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, colon, _password = userinfo.partition(":")
        if colon:
            shown = f"{user}:{MASK}"
        elif scheme.lower() in _TOKEN_USERINFO_SCHEMES:
            shown = MASK
        else:
            shown = user  # a login name alone (postgresql://postgres@host)
        rest = f"{shown}@{rest}"
    return f"{scheme}://{_query(rest)}"


def _userinfo_end(rest: str) -> int:
    """Index of the `@` that closes the user-info, or -1 when there is none."""
    for index in range(len(rest) - 1, -1, -1):
        if rest[index] == "@" and _HOST_AND_REST.match(rest[index + 1 :]):
            return index
    return -1


def _query(rest: str) -> str:
    """`rest` with the values of its secret query parameters masked."""
    before, mark, query = rest.partition("?")
    if not mark:
        return rest
    query, hash_mark, fragment = query.partition("#")
    parts = []
    for part in query.split("&"):
        name, eq, _value = part.partition("=")
        secret = eq and is_secret_name(unquote(name))
        parts.append(f"{name}={MASK}" if secret else _pairs(part) if eq else part)
    return f"{before}?{'&'.join(parts)}{hash_mark}{fragment}"


def _pairs(text: str) -> str:
    """Secret `name=value` pairs (ODBC connection strings, encoded or not) masked."""
    decoded = unquote(text) if "%3D" in text.upper() else text
    if decoded is not text and any(is_secret_name(n) for n, _ in _pairs_of(decoded)):
        return _PAIR_IN_TEXT.sub(_mask_pair, decoded)
    return _PAIR_IN_TEXT.sub(_mask_pair, text)


def _pairs_of(text: str) -> list[tuple[str, str]]:
    return [(m["name"], m["value"]) for m in _PAIR_IN_TEXT.finditer(text)]


def _mask_pair(match: re.Match[str]) -> str:
    return f"{match['name']}={MASK}" if is_secret_name(match["name"]) else match[0]


def text(message: str, secrets: Iterable[str] = ()) -> str:
    """A message with known secrets, URL passwords and secret parameters masked."""
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len)[::-1]:
        message = message.replace(secret, MASK)
    message = _URL_IN_TEXT.sub(lambda m: url(m[0]), message)
    return _PAIR_IN_TEXT.sub(_mask_pair, message)


def cut(message: str, limit: int, secrets: Iterable[str] = ()) -> str:
    """A message redacted, then cut to `limit` characters (in that order)."""
    return text(message, secrets)[:limit]


def secrets_of(value: str | None) -> list[str]:
    """The secrets a URL carries (its password, its secret parameters), raw and decoded,
    so that they can be masked where they appear without the URL around them."""
    if not value or "://" not in value:
        return []
    scheme, _, rest = value.partition("://")
    found: list[str] = []
    at = _userinfo_end(rest)
    if at >= 0:
        user, colon, password = rest[:at].partition(":")
        if colon:
            found.append(password)
        elif scheme.lower() in _TOKEN_USERINFO_SCHEMES:
            found.append(user)
        rest = rest[at + 1 :]
    _, _, query = rest.partition("?")
    found += [v for n, v in parse_qsl(query.partition("#")[0]) if is_secret_name(n)]
    found += [unquote(s) for s in found]
    return [s for s in dict.fromkeys(found) if s]
