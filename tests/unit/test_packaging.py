"""What `pip install ampsync` promises, read from pyproject.toml, constraints.txt and the files
that install it (Dockerfile, scripts/test): metadata an index shows, database drivers as
extras, lower bounds past known fixes, and one set of pinned versions for the image and CI.
The install itself, in a fresh virtual environment as the README types it, is in
tests/e2e/test_cli.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]


def requirements(*groups: str) -> list[Requirement]:
    """The base dependencies and those of the named extras (self-references left out)."""
    found = [Requirement(r) for r in PROJECT["dependencies"]]
    for group in groups:
        found += [Requirement(r) for r in EXTRAS[group]]
    return [r for r in found if canonicalize_name(r.name) != "ampsync"]


def constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = Version(pinned)
    return pins


def lowest_allowed(req: Requirement) -> Version | None:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


def test_the_package_carries_a_license_classifiers_and_project_urls():
    # given the metadata an index and `pip show` display
    # then a license with its file, classifiers that name the Pythons and the audience, URLs
    assert PROJECT["license"] and (ROOT / PROJECT["license-files"][0]).is_file()
    classifiers = PROJECT["classifiers"]
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert any(c.startswith("Intended Audience ::") for c in classifiers)
    assert any(c.startswith("Topic :: Database") for c in classifiers)
    assert {"Homepage", "Source", "Issues"} <= set(PROJECT["urls"])


def test_postgresql_and_mysql_drivers_are_extras_and_sql_server_is_always_installed():
    # given the base install and the extras
    base = {canonicalize_name(r.name) for r in requirements()}
    # then a plain install carries the SQL Server driver only
    assert "pymssql" in base
    assert not base & {"psycopg", "psycopg-binary", "pymysql"}
    # and `ampsync[postgresql]` / `ampsync[mysql]` bring the drivers a bare URL scheme means
    assert [Requirement(r).name for r in EXTRAS["postgresql"]] == ["psycopg"]
    assert "binary" in Requirement(EXTRAS["postgresql"][0]).extras  # no libpq to install
    assert [Requirement(r).name for r in EXTRAS["mysql"]] == ["PyMySQL"]
    # and the test tools pull both, since the suite runs on PostgreSQL and MariaDB
    selves = [Requirement(r) for r in EXTRAS["test"] if Requirement(r).name == "ampsync"]
    assert selves and {"postgresql", "mysql"} <= selves[0].extras


def test_the_cli_library_is_a_direct_dependency():
    # tasks/cli imports click itself: it must not rely on Celery happening to bring it
    assert "click" in {canonicalize_name(r.name) for r in requirements()}


# First releases with fixes for known vulnerabilities (docs/dependencies.md).
KNOWN_FIXES = {
    "orjson": "3.9.15",  # CVE-2024-27454: unbounded recursion on deeply nested JSON
    "requests": "2.32.4",  # CVE-2024-47081: .netrc credentials leaked to other hosts
    "pymysql": "1.1.1",  # CVE-2024-36039: SQL injection through dict keys
    "urllib3": "2.5.0",  # CVE-2025-50181: redirects not disabled when asked to
    "tornado": "6.5",  # CVE-2025-47287: multipart form data log flooding (Flower's server)
}


@pytest.mark.parametrize("name", sorted(KNOWN_FIXES))
def test_lower_bounds_exclude_releases_without_known_fixes(name):
    # given every requirement ampsync declares, extras included
    declared = {canonicalize_name(r.name): r for r in requirements(*EXTRAS)}
    # then the oldest version it allows already has the fix
    req = declared[name]
    floor = lowest_allowed(req)
    assert floor is not None and floor >= Version(KNOWN_FIXES[name]), str(req)


def test_every_declared_dependency_is_pinned_in_constraints_within_its_bounds():
    # given constraints.txt, the versions the image and CI install
    pins = constraints()
    # then each dependency of the package, its drivers and its test tools is pinned there, at a
    # version the declared range allows (the file and pyproject.toml never drift apart)
    for req in requirements("postgresql", "mysql", "test"):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs {pins[name]}"
    # and the tree under them too (a floating transitive dependency is how a fix goes missing)
    for transitive in ("kombu", "billiard", "tornado", "urllib3", "psycopg-binary"):
        assert transitive in pins, transitive


def test_the_image_and_ci_install_with_the_constraints_file():
    # given the two places that install ampsync unattended
    dockerfile = (ROOT / "Dockerfile").read_text()
    script = (ROOT / "scripts" / "test").read_text().replace("\\\n", " ")
    # then both pass constraints.txt to pip, and the image copies it in before installing
    assert re.search(r"^RUN pip install .*-c constraints\.txt", dockerfile, re.M)
    assert re.search(r"^COPY .*constraints\.txt", dockerfile, re.M)
    assert re.search(r"pip install .*-c constraints\.txt .*\.\[test\]", script)
