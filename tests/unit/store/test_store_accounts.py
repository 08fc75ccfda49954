"""Accounts repository."""

from __future__ import annotations

from datetime import UTC

import pytest

from postlane.errors import AlreadyExists, InvalidInput, NotFound
from postlane.store import (
    Account,
    Database,
    create_account,
    get_account,
    list_accounts,
    update_account,
)


def test_create_account_has_safe_defaults(db: Database) -> None:
    with db.begin() as conn:
        account = create_account(conn, "acme")
    assert account.name == "acme"
    assert account.smtp_enabled is True
    assert account.allow_email_login is False
    assert account.unauthorised_sender_policy == "block"
    assert account.attachment_policy == "off"
    assert account.attachment_archive_name == "attachments.zip"
    assert account.attachment_password_enc is None
    assert (account.track_opens, account.track_clicks) == (False, False)
    assert account.timezone == "UTC"
    assert account.trusted_networks == ()
    assert account.default_options == {}
    assert account.created_at.tzinfo is UTC
    assert account.updated_at == account.created_at


def test_duplicate_account_name_is_already_exists(db: Database, account: Account) -> None:
    with pytest.raises(AlreadyExists, match="account 'acme' exists"), db.begin() as conn:
        create_account(conn, "acme")


@pytest.mark.parametrize("name", ["", " acme", "acme ", 42])
def test_blank_or_padded_account_name_is_invalid(db: Database, name: object) -> None:
    with pytest.raises(InvalidInput, match="account name"), db.begin() as conn:
        create_account(conn, name)  # type: ignore[arg-type]


def test_get_account_by_name_id_or_digit_string(db: Database, account: Account) -> None:
    with db.connect() as conn:
        assert get_account(conn, "acme") == account
        assert get_account(conn, account.id) == account
        assert get_account(conn, str(account.id)) == account


def test_a_name_made_of_digits_wins_over_an_id(db: Database, account: Account) -> None:
    with db.begin() as conn:
        numeric = create_account(conn, str(account.id))
    with db.connect() as conn:
        assert get_account(conn, str(account.id)) == numeric
        assert get_account(conn, account.id) == account


@pytest.mark.parametrize("key", ["nope", 999_999, "999999", "9" * 30])
def test_missing_account_is_not_found(db: Database, key: str | int) -> None:
    with pytest.raises(NotFound, match=f"account {key!r} not found"), db.connect() as conn:
        get_account(conn, key)


def test_list_accounts_by_name(db: Database) -> None:
    with db.begin() as conn:
        for name in ("zeta", "alpha", "mid"):
            create_account(conn, name)
    with db.connect() as conn:
        assert [a.name for a in list_accounts(conn)] == ["alpha", "mid", "zeta"]


def test_update_account_changes_every_setting(db: Database, account: Account) -> None:
    changes = {
        "name": "acme-renamed",
        "smtp_enabled": False,
        "allow_email_login": True,
        "unauthorised_sender_policy": "alert",
        "attachment_policy": "zip",
        "attachment_archive_name": "files.zip",
        "attachment_password_enc": b"\x00ciphertext",
        "track_opens": True,
        "track_clicks": True,
        "timezone": "Europe/Rome",
        "trusted_networks": ["10.0.0.0/8", "2001:db8::/32"],
        "default_options": {"tags": ["news"], "tracking": {"opens": True}},
    }
    with db.begin() as conn:
        updated = update_account(conn, account.id, **changes)
    with db.connect() as conn:
        assert get_account(conn, "acme-renamed") == updated
    assert updated.trusted_networks == ("10.0.0.0/8", "2001:db8::/32")
    for key, value in changes.items():
        if key != "trusted_networks":
            assert getattr(updated, key) == value
    assert updated.updated_at >= account.updated_at
    assert updated.created_at == account.created_at


def test_update_account_without_changes_returns_it(db: Database, account: Account) -> None:
    with db.begin() as conn:
        assert update_account(conn, account.id) == account


def test_update_account_refuses_unknown_fields(db: Database, account: Account) -> None:
    with (
        pytest.raises(InvalidInput, match=r"cannot change account field.*colour"),
        db.begin() as conn,
    ):
        update_account(conn, account.id, colour="blue")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"smtp_enabled": "yes"}, "smtp_enabled must be true or false"),
        ({"trusted_networks": "10.0.0.0/8"}, "trusted_networks must be a list"),
        ({"trusted_networks": [10]}, "trusted_networks item must be text"),
        ({"default_options": ["x"]}, "default_options must be a mapping"),
        ({"default_options": {"when": object()}}, "default_options is not JSON"),
        ({"attachment_password_enc": "plain"}, "attachment_password_enc must be bytes"),
    ],
)
def test_update_account_refuses_wrong_types(
    db: Database, account: Account, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message), db.begin() as conn:
        update_account(conn, account.id, **changes)


@pytest.mark.parametrize(
    ("column", "value", "allowed"),
    [
        ("attachment_policy", "rar", "'off', 'zip', 'unzip'"),
        ("unauthorised_sender_policy", "ignore", "'alert', 'block'"),
    ],
)
def test_check_constraint_violation_is_a_clear_invalid_input(
    db: Database, account: Account, column: str, value: str, allowed: str
) -> None:
    with pytest.raises(InvalidInput) as info, db.begin() as conn:
        update_account(conn, account.id, **{column: value})
    assert str(info.value) == f"{column} {value!r} is invalid: must be one of {allowed}"
    with db.connect() as conn:
        assert getattr(get_account(conn, account.id), column) == getattr(account, column)


def test_renaming_onto_a_taken_name_is_already_exists(db: Database, account: Account) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
    with pytest.raises(AlreadyExists, match="account 'acme' exists"), db.begin() as conn:
        update_account(conn, other.id, name="acme")


def test_update_missing_account_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound, match="account 424242 not found"), db.begin() as conn:
        update_account(conn, 424242, track_opens=True)


def test_account_repr_hides_the_attachment_password(db: Database, account: Account) -> None:
    with db.begin() as conn:
        updated = update_account(conn, account.id, attachment_password_enc=b"SECRETBYTES")
    assert "SECRETBYTES" not in repr(updated)
