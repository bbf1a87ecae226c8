"""Fixtures of the integration tier: a fresh queue table (and ampsync's tables) on each
database a statement test runs on."""

from __future__ import annotations

import uuid

import pytest
from support import BACKENDS

from tasks.db import engine as db_engine
from tasks.db import schema, setup


@pytest.fixture(params=list(BACKENDS))
def db(request, tmp_path):
    """(engine, tables) of a new queue table on PostgreSQL, MariaDB or SQLite; dropped after."""
    url = BACKENDS[request.param] or f"sqlite:///{tmp_path / 'queue.db'}"
    tables = schema.define_tables(f"t_{uuid.uuid4().hex[:8]}")
    engine = db_engine.make_engine(url)
    setup.init_db(engine, tables)
    yield engine, tables
    with engine.begin() as conn:
        for table in reversed(tables.metadata.sorted_tables):
            table.drop(conn)
    engine.dispose()
