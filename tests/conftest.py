"""Fixtures shared by the whole suite.

Every test that touches storage asks for ``database_url`` and so runs twice:
once on a fresh SQLite file and once on a fresh PostgreSQL schema (the server
named by ``POSTLANE_TEST_DATABASE_URL``; skipped with that reason when unset).
``module_database_url`` is the same for tests that share one database per
module (the integration tests, which start a server for each module).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_ENV = "POSTLANE_TEST_DATABASE_URL"
DATABASE_KINDS = ("sqlite", "postgresql")


def _pg_base_url() -> str | None:
    return os.environ.get(PG_ENV) or None


@contextmanager
def fresh_database_url(kind: str, directory: Path) -> Iterator[str]:
    """A URL naming an empty database of ``kind``, removed again on exit.

    SQLite: a new file in ``directory``. PostgreSQL: a new schema on the
    server named by ``POSTLANE_TEST_DATABASE_URL``, selected through the
    ``search_path`` connection option; the calling test is skipped, with that
    reason, when the variable is unset.
    """
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'postlane.db'}"
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


@pytest.fixture(params=DATABASE_KINDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL naming an empty database of the parametrised kind."""
    with fresh_database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="module", params=DATABASE_KINDS)
def module_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Like ``database_url``, but one database for all the tests of a module."""
    with fresh_database_url(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url
