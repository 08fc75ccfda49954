"""Fixtures shared by the whole suite.

Every test that touches storage asks for ``database_url`` and so runs twice:
once on a fresh SQLite file and once on a fresh PostgreSQL schema (the server
named by ``POSTLANE_TEST_DATABASE_URL``; skipped with that reason when unset).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ENV = "POSTLANE_TEST_DATABASE_URL"


def _pg_base_url() -> str | None:
    return os.environ.get(PG_ENV) or None


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL naming an empty database of the parametrised kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'postlane.db'}"
        return
    base = _pg_base_url()
    if base is None:
        pytest.skip(
            f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)"
        )
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
