"""SMTP users repository."""

from __future__ import annotations

import re
from datetime import UTC

import pytest
import sqlalchemy as sa

from postlane.errors import AlreadyExists, InvalidInput, NotFound
from postlane.store import (
    Account,
    Database,
    SmtpUser,
    create_account,
    create_smtp_user,
    find_smtp_user_by_username,
    get_smtp_user,
    list_smtp_users,
    set_password_hash,
    update_smtp_user,
)
from postlane.store.schema import accounts

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"


@pytest.fixture
def user(db: Database, account: Account) -> SmtpUser:
    with db.begin() as conn:
        return create_smtp_user(conn, account.id, "Mailer@Example.com", HASH)


def test_create_smtp_user_defaults(user: SmtpUser, account: Account) -> None:
    assert user.account_id == account.id
    assert user.username == "Mailer@Example.com"
    assert user.password_hash == HASH
    assert user.active is True
    assert user.priority == 3
    assert user.note == ""
    assert user.authorised_domains == ()
    assert user.authorised_senders == ()
    assert user.default_options == {}
    assert user.created_at.tzinfo is UTC
    assert user.password_changed_at == user.created_at


def test_create_smtp_user_with_every_option(db: Database, account: Account) -> None:
    with db.begin() as conn:
        user = create_smtp_user(
            conn,
            account.id,
            "wordpress",
            HASH,
            priority=1,
            note="the shop",
            authorised_domains=["Shop.Example.COM"],
            authorised_senders=("news@shop.example.com",),
            default_options={"tags": ["shop"]},
        )
    assert user.priority == 1
    assert user.note == "the shop"
    assert user.authorised_domains == ("shop.example.com",)
    assert user.authorised_senders == ("news@shop.example.com",)
    assert user.default_options == {"tags": ["shop"]}


def test_password_hash_is_not_in_repr(user: SmtpUser) -> None:
    assert HASH not in repr(user)
    assert "Mailer@Example.com" in repr(user)


def test_username_is_unique_whatever_the_case(
    db: Database, account: Account, user: SmtpUser
) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
    message = re.escape("SMTP user 'mailer@example.com' exists")
    with pytest.raises(AlreadyExists, match=message), db.begin() as conn:
        create_smtp_user(conn, other.id, "mailer@example.com", HASH)


def test_lookups_ignore_case(db: Database, user: SmtpUser) -> None:
    with db.connect() as conn:
        assert get_smtp_user(conn, "MAILER@example.COM") == user
        assert find_smtp_user_by_username(conn, "mailer@example.com") == user


def test_missing_user(db: Database, user: SmtpUser) -> None:
    with db.connect() as conn:
        assert find_smtp_user_by_username(conn, "ghost") is None
        with pytest.raises(NotFound, match="SMTP user 'ghost' not found"):
            get_smtp_user(conn, "ghost")


def test_user_of_a_missing_account_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound, match="account 777 not found"), db.begin() as conn:
        create_smtp_user(conn, 777, "orphan", HASH)


@pytest.mark.parametrize("priority", [0, 6, -1])
def test_priority_outside_1_to_5_is_invalid(db: Database, account: Account, priority: int) -> None:
    expected = f"priority {priority} is invalid: must be between 1 (highest) and 5 (lowest)"
    with pytest.raises(InvalidInput) as info, db.begin() as conn:
        create_smtp_user(conn, account.id, "bad-priority", HASH, priority=priority)
    assert str(info.value) == expected


def test_update_priority_outside_range_is_invalid(db: Database, user: SmtpUser) -> None:
    with pytest.raises(InvalidInput, match="priority 9 is invalid"), db.begin() as conn:
        update_smtp_user(conn, user.id, priority=9)


def test_list_smtp_users_all_or_per_account(db: Database, account: Account, user: SmtpUser) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
        zed = create_smtp_user(conn, other.id, "zed", HASH)
        alpha = create_smtp_user(conn, account.id, "alpha", HASH)
    with db.connect() as conn:
        assert list_smtp_users(conn) == [alpha, user, zed]
        assert list_smtp_users(conn, account.id) == [alpha, user]
        assert list_smtp_users(conn, other.id) == [zed]


def test_update_smtp_user(db: Database, user: SmtpUser) -> None:
    with db.begin() as conn:
        updated = update_smtp_user(
            conn,
            user.id,
            username="mailer2",
            active=False,
            priority=5,
            note="paused",
            authorised_domains=["EXAMPLE.com"],
            authorised_senders=["a@example.com", "b@example.com"],
            default_options={"track": {"clicks": False}},
        )
    assert updated.username == "mailer2"
    assert updated.active is False
    assert updated.priority == 5
    assert updated.note == "paused"
    assert updated.authorised_domains == ("example.com",)
    assert updated.authorised_senders == ("a@example.com", "b@example.com")
    assert updated.default_options == {"track": {"clicks": False}}
    assert updated.password_changed_at == user.password_changed_at
    with db.connect() as conn:
        assert get_smtp_user(conn, "MAILER2") == updated


def test_update_onto_a_taken_username_is_already_exists(
    db: Database, account: Account, user: SmtpUser
) -> None:
    with db.begin() as conn:
        other = create_smtp_user(conn, account.id, "other", HASH)
    message = re.escape("SMTP user 'MAILER@EXAMPLE.COM' exists")
    with pytest.raises(AlreadyExists, match=message), db.begin() as conn:
        update_smtp_user(conn, other.id, username="MAILER@EXAMPLE.COM")


def test_update_smtp_user_refuses_password_and_unknown_fields(db: Database, user: SmtpUser) -> None:
    for field in ("password_hash", "account_id", "shoe_size"):
        message = rf"cannot change SMTP user field.*{field}"
        with pytest.raises(InvalidInput, match=message), db.begin() as conn:
            update_smtp_user(conn, user.id, **{field: "x"})


def test_update_missing_user_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound, match="SMTP user 31337 not found"), db.begin() as conn:
        update_smtp_user(conn, 31337, active=False)


def test_set_password_hash_records_when(db: Database, user: SmtpUser) -> None:
    with db.begin() as conn:
        changed = set_password_hash(conn, user.id, "$argon2id$new")
    assert changed.password_hash == "$argon2id$new"
    assert changed.password_changed_at > user.password_changed_at
    with db.connect() as conn:
        assert get_smtp_user(conn, user.username).password_hash == "$argon2id$new"
    with pytest.raises(NotFound), db.begin() as conn:
        set_password_hash(conn, 31337, "$argon2id$new")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"username": ""}, "username must be non-empty"),
        ({"username": "padded "}, "username must be non-empty"),
        ({"password_hash": ""}, "password_hash must be non-empty"),
        ({"authorised_senders": "a@example.com"}, "authorised_senders must be a list"),
        ({"priority": "2"}, "priority must be a whole number"),
        ({"priority": True}, "priority must be a whole number"),
    ],
)
def test_create_smtp_user_refuses_malformed_values(
    db: Database, account: Account, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"username": "someone", "password_hash": HASH, **kwargs}
    with pytest.raises(InvalidInput, match=message), db.begin() as conn:
        create_smtp_user(conn, account.id, **arguments)  # type: ignore[arg-type]


def test_deleting_an_account_deletes_its_users(
    db: Database, account: Account, user: SmtpUser
) -> None:
    # Relies on foreign keys being enforced, which SQLite does only when asked.
    with db.begin() as conn:
        conn.execute(sa.delete(accounts).where(accounts.c.id == account.id))
    with db.connect() as conn:
        assert find_smtp_user_by_username(conn, user.username) is None
