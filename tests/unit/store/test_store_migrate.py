"""Migrations: from empty, idempotent, and equal to schema.metadata."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from postlane.errors import StoreError
from postlane.store import Database, create_account, current_revision, list_accounts, upgrade
from postlane.store import migrate as migrate_module
from postlane.store.schema import metadata, suppressions
from postlane.store.suppressions import is_suppressed, list_suppressions, listed


def _differences(db: Database, target: sa.MetaData) -> list[Any]:
    with db.connect() as conn, warnings.catch_warnings():
        # SQLite cannot reflect the expression index on lower(username);
        # alembic warns and skips it (checked separately below).
        warnings.simplefilter("ignore")
        return list(compare_metadata(MigrationContext.configure(conn), target))


def test_upgrade_from_empty(database_url: str) -> None:
    db = Database.from_url(database_url)
    try:
        assert current_revision(db) is None
        upgrade(db)
        assert current_revision(db) == migrate_module.head_revision() == "0004"
        tables = set(sa.inspect(db.engine).get_table_names())
        assert tables == set(metadata.tables) | {"alembic_version"}
    finally:
        db.dispose()


def test_migrated_schema_matches_metadata(db: Database) -> None:
    assert _differences(db, metadata) == []


def test_comparison_would_notice_a_missing_column(db: Database) -> None:
    changed = sa.MetaData()
    for table in metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["accounts"].append_column(sa.Column("extra", sa.Text()))
    assert [diff[0] for diff in _differences(db, changed)] == ["add_column"]


def test_case_insensitive_username_index_exists(db: Database) -> None:
    with db.connect() as conn:
        if db.dialect_name == "sqlite":
            sql = "SELECT sql FROM sqlite_master WHERE name = 'uq_smtp_users_username'"
        else:
            sql = (
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'uq_smtp_users_username' "
                "AND schemaname = current_schema()"
            )
        definition = conn.exec_driver_sql(sql).scalar_one()
    assert "UNIQUE" in definition.upper()
    assert "lower(username)" in definition.lower()


def test_upgrading_twice_changes_nothing(db: Database) -> None:
    with db.begin() as conn:
        create_account(conn, "survivor")
    upgrade(db)
    upgrade(db)
    assert current_revision(db) == migrate_module.head_revision() == "0004"
    with db.connect() as conn:
        assert [a.name for a in list_accounts(conn)] == ["survivor"]
    assert _differences(db, metadata) == []


def test_unknown_revision_is_store_error(db: Database) -> None:
    with pytest.raises(StoreError, match="cannot migrate the database to 'nope'"):
        upgrade(db, "nope")


def test_downgrade_to_base_and_up_again(db: Database) -> None:
    with db.begin() as conn:
        command.downgrade(migrate_module._config(conn), "base")
    assert current_revision(db) is None
    assert set(sa.inspect(db.engine).get_table_names()) == {"alembic_version"}
    upgrade(db)
    assert _differences(db, metadata) == []


def test_migrations_ship_inside_the_package() -> None:
    directory = migrate_module.MIGRATIONS_DIR
    assert (directory / "env.py").is_file()
    assert (directory / "script.py.mako").is_file()
    assert (directory / "versions" / "0001_initial.py").is_file()
    assert directory.parent.name == "store"


def test_later_migrations_upgrade_a_0001_database_with_data(database_url: str) -> None:
    db = Database.from_url(database_url)
    try:
        upgrade(db, "0001")
        with db.begin() as conn:
            create_account(conn, "early")
        upgrade(db)
        assert current_revision(db) == "0004"
        assert _differences(db, metadata) == []
        with db.connect() as conn:
            assert [a.name for a in list_accounts(conn)] == ["early"]
    finally:
        db.dispose()


T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def test_0004_folds_stored_addresses_and_merges_what_becomes_one(database_url: str) -> None:
    """Rows written under the old fold (lower-casing only) are found under the new one."""
    db = Database.from_url(database_url)
    try:
        upgrade(db, "0003")
        with db.begin() as conn:
            acme, other = create_account(conn, "acme"), create_account(conn, "other")
            rows = [
                # one mailbox in three spellings: the always-applied reason wins,
                # although it came last
                (acme.id, "ann@bücher.example", "unsubscribe", "first", 0),
                (acme.id, "ann@xn--bcher-kva.example", "returned", "second", 1),
                (acme.id, "ann@bücher.example.", "hard_bounce", "third", 2),
                # two always-applied reasons: the earlier stays, whatever the ids say
                (acme.id, "bob@example.com.", "manual", "later", 4),
                (acme.id, "bob@example.com", "complaint", "earlier", 3),
                # only the spelling changes
                (acme.id, "cy@bücher.example", "blocklist", None, 5),
                # already in the new form, and untouched
                (acme.id, "dee@example.com", "manual", None, 6),
                # another account's entry is not merged with acme's
                (other.id, "bob@example.com.", "unsubscribe", None, 7),
                # a domain IDNA cannot convert is kept as it was
                (acme.id, "eve@ü..example", "manual", None, 8),
            ]
            conn.execute(
                suppressions.insert(),
                [
                    {
                        "account_id": account_id,
                        "address": address,
                        "reason": reason,
                        "detail": detail,
                        "created_at": T0 + timedelta(hours=hours),
                    }
                    for account_id, address, reason, detail, hours in rows
                ],
            )
        upgrade(db)
        assert current_revision(db) == "0004"
        with db.connect() as conn:
            mine = {
                s.address: (s.reason, s.detail, s.created_at)
                for s in list_suppressions(conn, acme.id)
            }
            theirs = {s.address: s.reason for s in list_suppressions(conn, other.id)}
            found = listed(conn, acme.id, ["ann@bücher.example", "BOB@example.com"])
            assert is_suppressed(conn, acme.id, ["eve@ü..example."]) == {"eve@ü..example."}
        assert mine == {
            "ann@xn--bcher-kva.example": ("hard_bounce", "third", T0 + timedelta(hours=2)),
            "bob@example.com": ("complaint", "earlier", T0 + timedelta(hours=3)),
            "cy@xn--bcher-kva.example": ("blocklist", None, T0 + timedelta(hours=5)),
            "dee@example.com": ("manual", None, T0 + timedelta(hours=6)),
            "eve@ü..example": ("manual", None, T0 + timedelta(hours=8)),
        }
        assert theirs == {"bob@example.com": "unsubscribe"}
        assert found == {"ann@bücher.example": "hard_bounce", "BOB@example.com": "complaint"}
        assert _differences(db, metadata) == []
    finally:
        db.dispose()


def test_0004_keeps_the_earliest_optional_entry(database_url: str) -> None:
    db = Database.from_url(database_url)
    try:
        upgrade(db, "0003")
        with db.begin() as conn:
            acme = create_account(conn, "acme")
            conn.execute(
                suppressions.insert(),
                [
                    {
                        "account_id": acme.id,
                        "address": address,
                        "reason": reason,
                        "created_at": T0 + timedelta(hours=hours),
                    }
                    for address, reason, hours in [
                        ("ann@example.com", "returned", 2),
                        ("ann@example.com.", "unsubscribe", 1),
                        ("ann@example.com..", "blocklist", 1),
                    ]
                ],
            )
        upgrade(db)
        with db.connect() as conn:
            (only,) = list_suppressions(conn, acme.id)
        assert (only.address, only.reason) == ("ann@example.com", "unsubscribe")
    finally:
        db.dispose()
