"""Fixtures for the tenant tests that read the store: a migrated database of each kind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from postlane.store import Account, Database, create_account, upgrade


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A freshly migrated database (SQLite file or PostgreSQL schema)."""
    database = Database.from_url(database_url)
    upgrade(database)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def account(db: Database) -> Account:
    with db.begin() as conn:
        return create_account(conn, "acme")
