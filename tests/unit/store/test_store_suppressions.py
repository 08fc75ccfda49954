"""Suppression lists: idempotent adds, case-insensitive lookups, removal, listing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from postlane.errors import InvalidInput, NotFound
from postlane.store import Account, Database, create_account
from postlane.store.suppressions import (
    Suppression,
    add_suppression,
    is_suppressed,
    list_suppressions,
    remove_suppression,
)

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def test_add_is_idempotent_and_keeps_the_first_reason(db: Database, account: Account) -> None:
    with db.begin() as conn:
        assert add_suppression(
            conn, account.id, "Bob@Example.ORG", "hard_bounce", "550 5.1.1", now=T0
        )
        assert not add_suppression(
            conn, account.id, "bob@example.org", "unsubscribe", now=T0 + timedelta(hours=1)
        )
        assert not add_suppression(conn, account.id, "BOB@EXAMPLE.ORG", "complaint", now=T0)
    with db.connect() as conn:
        (only,) = list_suppressions(conn, account.id)
    assert only == Suppression(
        id=only.id,
        account_id=account.id,
        address="bob@example.org",
        reason="hard_bounce",
        detail="550 5.1.1",
        created_at=T0,
    )


def test_lookups_ignore_case_of_local_part_and_domain(db: Database, account: Account) -> None:
    with db.begin() as conn:
        add_suppression(conn, account.id, "Bob@Example.org", "hard_bounce", now=T0)
        add_suppression(conn, account.id, "ÉLODIE@Exemple.FR", "complaint", now=T0)
        other = create_account(conn, "other")
        add_suppression(conn, other.id, "carol@example.org", "manual", now=T0)
    given = [
        "bob@example.org",
        "BOB@EXAMPLE.ORG",
        "élodie@exemple.fr",
        "carol@example.org",
        "x@y.z",
    ]
    with db.connect() as conn:
        found = is_suppressed(conn, account.id, given)
        assert is_suppressed(conn, account.id, []) == set()
        assert is_suppressed(conn, other.id, given) == {"carol@example.org"}
    assert found == {"bob@example.org", "BOB@EXAMPLE.ORG", "élodie@exemple.fr"}


def test_lookup_of_many_addresses(db: Database, account: Account) -> None:
    with db.begin() as conn:
        for i in range(0, 1200, 100):
            add_suppression(conn, account.id, f"user{i}@example.org", "manual", now=T0)
    with db.connect() as conn:
        found = is_suppressed(conn, account.id, [f"USER{i}@example.org" for i in range(1200)])
        with pytest.raises(InvalidInput, match="not one string"):
            is_suppressed(conn, account.id, "user0@example.org")
    assert found == {f"USER{i}@example.org" for i in range(0, 1200, 100)}


def test_remove_suppression(db: Database, account: Account) -> None:
    with db.begin() as conn:
        add_suppression(conn, account.id, "bob@example.org", "hard_bounce", now=T0)
    with db.begin() as conn:
        assert remove_suppression(conn, account.id, "BOB@example.org")
        assert not remove_suppression(conn, account.id, "bob@example.org")
    with db.connect() as conn:
        assert is_suppressed(conn, account.id, ["bob@example.org"]) == set()
    with db.begin() as conn:  # removed, it can be added again with a new reason
        assert add_suppression(conn, account.id, "bob@example.org", "manual", now=T0)


def test_list_newest_first_with_a_limit(db: Database, account: Account) -> None:
    with db.begin() as conn:
        for i in range(5):
            add_suppression(conn, account.id, f"u{i}@x.org", "manual", now=T0 + timedelta(i))
        other = create_account(conn, "other")
        add_suppression(conn, other.id, "z@x.org", "manual", now=T0)
    with db.connect() as conn:
        assert [s.address for s in list_suppressions(conn, account.id, 3)] == [
            "u4@x.org",
            "u3@x.org",
            "u2@x.org",
        ]
        assert len(list_suppressions(conn, account.id)) == 5
        assert list_suppressions(conn, 999) == []
        with pytest.raises(InvalidInput, match="limit"):
            list_suppressions(conn, account.id, -1)


def test_bad_input_is_refused(db: Database, account: Account) -> None:
    with pytest.raises(NotFound, match="account 999 not found"), db.begin() as conn:
        add_suppression(conn, 999, "bob@example.org", "manual", now=T0)
    for address in ("", "bob", "@example.org", "bob@", " bob@example.org", "bob@ex\r\nample"):
        with pytest.raises(InvalidInput, match="address"), db.begin() as conn:
            add_suppression(conn, account.id, address, "manual", now=T0)
    with pytest.raises(InvalidInput, match="reason"), db.begin() as conn:
        add_suppression(conn, account.id, "bob@example.org", "", now=T0)
    with pytest.raises(InvalidInput, match="aware"), db.begin() as conn:
        add_suppression(conn, account.id, "bob@example.org", "manual", now=datetime(2024, 5, 1))
    with db.connect() as conn:
        assert list_suppressions(conn, account.id) == []


def test_a_failed_add_leaves_the_transaction_usable(db: Database, account: Account) -> None:
    with db.begin() as conn:
        with pytest.raises(NotFound):
            add_suppression(conn, 999, "bob@example.org", "manual", now=T0)
        assert add_suppression(conn, account.id, "bob@example.org", "manual", now=T0)
    with db.connect() as conn:
        assert is_suppressed(conn, account.id, ["bob@example.org"]) == {"bob@example.org"}
