"""Sending domains repository."""

from __future__ import annotations

from typing import Any

import pytest

from postlane.errors import AlreadyExists, InvalidInput, NotFound
from postlane.store import (
    Account,
    Database,
    SendingDomain,
    add_domain,
    create_account,
    domains_for_account,
    get_domain,
    list_domains,
)

RSA_KEY = {
    "dkim_selector": "pl202411",
    "dkim_private_key_enc": b"encrypted-rsa-private-key",
    "dkim_public_key": "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA",
}


def _add(db: Database, account_id: int, name: str, **extra: Any) -> SendingDomain:
    with db.begin() as conn:
        return add_domain(conn, account_id, name, **{**RSA_KEY, **extra})


def test_add_domain_lower_cases_and_starts_unverified(db: Database, account: Account) -> None:
    domain = _add(db, account.id, "Mail.Example.COM")
    assert domain.name == "mail.example.com"
    assert domain.account_id == account.id
    assert domain.dkim_selector == "pl202411"
    assert domain.dkim_algorithm == "rsa-sha256"
    assert domain.dkim_private_key_enc == b"encrypted-rsa-private-key"
    assert domain.dkim_public_key == RSA_KEY["dkim_public_key"]
    assert domain.ed25519_selector is None
    assert domain.ed25519_private_key_enc is None
    assert domain.ed25519_public_key is None
    assert domain.return_path_subdomain == "bounce"
    verified = (
        domain.spf_verified,
        domain.dkim_verified,
        domain.dmarc_verified,
        domain.return_path_verified,
    )
    assert verified == (False, False, False, False)
    assert domain.verified_at is None


def test_add_domain_with_ed25519_key(db: Database, account: Account) -> None:
    domain = _add(
        db,
        account.id,
        "example.org",
        ed25519_selector="pl202411e",
        ed25519_private_key_enc=b"encrypted-ed25519",
        ed25519_public_key="MCowBQYDK2VwAyEA",
        return_path_subdomain="rp",
    )
    assert domain.ed25519_selector == "pl202411e"
    assert domain.ed25519_private_key_enc == b"encrypted-ed25519"
    assert domain.ed25519_public_key == "MCowBQYDK2VwAyEA"
    assert domain.return_path_subdomain == "rp"


def test_partial_ed25519_key_is_invalid(db: Database, account: Account) -> None:
    with pytest.raises(InvalidInput, match="Ed25519"):
        _add(db, account.id, "example.org", ed25519_selector="e")


def test_private_keys_are_not_in_repr(db: Database, account: Account) -> None:
    domain = _add(
        db,
        account.id,
        "example.org",
        ed25519_selector="e",
        ed25519_private_key_enc=b"ed-secret",
        ed25519_public_key="pub",
    )
    assert "encrypted-rsa-private-key" not in repr(domain)
    assert "ed-secret" not in repr(domain)


def test_domain_names_are_unique_across_accounts_whatever_the_case(
    db: Database, account: Account
) -> None:
    _add(db, account.id, "example.com")
    with db.begin() as conn:
        other = create_account(conn, "other")
    with pytest.raises(AlreadyExists, match=r"domain 'example\.com' exists"):
        _add(db, other.id, "EXAMPLE.com")


def test_get_domain_ignores_case(db: Database, account: Account) -> None:
    domain = _add(db, account.id, "example.com")
    with db.connect() as conn:
        assert get_domain(conn, "Example.COM") == domain


def test_missing_domain_is_not_found(db: Database) -> None:
    with (
        pytest.raises(NotFound, match=r"domain 'nowhere\.example' not found"),
        db.connect() as conn,
    ):
        get_domain(conn, "nowhere.example")


def test_domain_of_a_missing_account_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound, match="account 5150 not found"):
        _add(db, 5150, "example.com")


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("", {}, "domain name"),
        ("exa mple.com", {}, "domain name"),
        ("example.com", {"dkim_private_key_enc": b""}, "dkim_private_key_enc"),
        ("example.com", {"dkim_selector": ""}, "dkim_selector"),
    ],
)
def test_malformed_domain_values_are_invalid(
    db: Database, account: Account, name: str, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        _add(db, account.id, name, **extra)


def test_list_domains_all_or_per_account(db: Database, account: Account) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
    b = _add(db, account.id, "b.example")
    a = _add(db, account.id, "a.example")
    c = _add(db, other.id, "c.example")
    with db.connect() as conn:
        assert list_domains(conn) == [a, b, c]
        assert list_domains(conn, account.id) == [a, b]
        assert domains_for_account(conn, account.id) == [a, b]
        assert domains_for_account(conn, other.id) == [c]
