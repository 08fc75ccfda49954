"""Tenant administration: rules that hold across the store's own constraints."""

from __future__ import annotations

import pytest

from postlane.errors import InvalidInput
from postlane.store import Account, Database, create_account
from postlane.tenants import admin


def test_a_username_differing_only_in_non_ascii_case_is_refused(
    db: Database, account: Account
) -> None:
    # The database's unique index folds ASCII only, so both were created, and
    # logins (looked up lower-cased) reached one of them only.
    with db.begin() as conn:
        create_account(conn, "other")
    admin.create_smtp_user(db, "acme", "Émile")
    clash = r"SMTP user 'émile' exists \(as 'Émile'; usernames ignore case\)"
    with pytest.raises(InvalidInput, match=clash):
        admin.create_smtp_user(db, "other", "émile")
    admin.create_smtp_user(db, "other", "emile")  # a different name
