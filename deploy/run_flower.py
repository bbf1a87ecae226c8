"""Flower as docker-compose.yml runs it: `python deploy/run_flower.py [FLOWER OPTIONS]` (not
named flower.py: the script's folder comes first on sys.path and would hide Flower itself).

Before Flower starts, its login is checked: FLOWER_BASIC_AUTH (read by Flower from the
environment, so the password is on no command line) must be `user:password` pairs, with a
password of at least 12 characters that is not .env.example's. A bad value stops the
container with one line. Flower leaves its Prometheus endpoint `/metrics` open even with basic
auth; here it needs the same login as every other page.
"""

from __future__ import annotations

import os
import sys

# .env.example's value: a copied example must not become a real login.
EXAMPLE_PASSWORD = "change-me-too"
MIN_PASSWORD = 12


def problem(value: str | None) -> str | None:
    """What is wrong with a FLOWER_BASIC_AUTH value, in one line; None when it will do."""
    if not value:
        return "FLOWER_BASIC_AUTH is not set: set it to user:password in .env"
    for pair in value.split(","):
        user, colon, password = pair.partition(":")
        if not (user and colon and password):
            return "FLOWER_BASIC_AUTH must be user:password (several joined by commas)"
        if password == EXAMPLE_PASSWORD:
            return (
                f"FLOWER_BASIC_AUTH for {user!r} still has the example password from "
                ".env.example: choose your own"
            )
        if len(password) < MIN_PASSWORD:
            return f"FLOWER_BASIC_AUTH for {user!r}: use a password of {MIN_PASSWORD}+ characters"
    return None


def main(argv: list[str]) -> int:
    found = problem(os.environ.get("FLOWER_BASIC_AUTH"))
    if found:
        print(f"flower: {found}", file=sys.stderr)
        return 2
    if any(a.startswith(("--basic-auth", "--basic_auth")) for a in argv):
        print(
            "flower: pass the login in FLOWER_BASIC_AUTH, not on the command line", file=sys.stderr
        )
        return 2
    from celery.bin.celery import main as celery
    from flower.views import monitor
    from tornado import web

    # Flower's /metrics skips the login its other pages ask for: it asks for it too.
    monitor.Metrics.get = web.authenticated(monitor.Metrics.get)
    sys.argv = ["celery", "-A", "tasks", "flower", *argv]
    return celery()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
