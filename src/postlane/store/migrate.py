"""Bring a database's schema up to the one this code expects.

Alembic runs programmatically, without an ``alembic.ini``: the scripts ship
inside the package (``migrations/``), so an installed wheel can migrate its
own database and nothing depends on the working directory.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection

from postlane.errors import StoreError
from postlane.store.db import Database

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")

#: Key of the PostgreSQL advisory lock held while migrating ("postlane" in
#: ASCII), so nodes starting together against one database migrate in turn.
_PG_MIGRATION_LOCK = 0x706F73746C616E65


def upgrade(db: Database, revision: str = "head") -> None:
    """Apply every migration up to ``revision``, all in one transaction.

    Running it on an up-to-date database changes nothing, so every process
    may call it at start. Concurrent callers are serialised: by the advisory
    lock on PostgreSQL, by ``BEGIN IMMEDIATE`` on SQLite.
    """
    with db.begin() as conn:
        if db.dialect_name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
        try:
            command.upgrade(_config(conn), revision)
        except CommandError as e:
            raise StoreError(f"cannot migrate the database to {revision!r}: {e}") from e


def current_revision(db: Database) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    with db.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The newest revision this version of Postlane ships."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def ensure_current(db: Database) -> None:
    """Refuse to work on a schema other than the one this code was written for."""
    current, head = current_revision(db), head_revision()
    if current != head:
        raise StoreError(
            f"the database schema is at revision {current or 'none (empty database)'}, "
            f"this Postlane needs {head}: run 'postlane db upgrade'"
        )


def _config(conn: Connection) -> Config:
    config = Config()
    # The value goes through ConfigParser interpolation, where "%" is special.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = conn
    return config
