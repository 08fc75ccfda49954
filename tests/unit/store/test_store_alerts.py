"""Alerts repository."""

from __future__ import annotations

from datetime import UTC

import pytest
import sqlalchemy as sa

from postlane.errors import NotFound
from postlane.store import (
    Account,
    Database,
    add_alert,
    create_account,
    create_smtp_user,
    list_alerts,
)
from postlane.store.schema import smtp_users


def test_add_and_list_alerts_newest_first(db: Database, account: Account) -> None:
    with db.begin() as conn:
        user = create_smtp_user(conn, account.id, "mailer", "$argon2id$x")
        first = add_alert(conn, account.id, "unauthorised_sender", "From x@evil.example")
        second = add_alert(
            conn,
            account.id,
            "unauthorised_sender",
            "From y@evil.example",
            smtp_user_id=user.id,
            message_id="Q123",
        )
        other = create_account(conn, "other")
        add_alert(conn, other.id, "quota", "someone else's")
    with db.connect() as conn:
        alerts = list_alerts(conn, account.id)
    assert [a.id for a in alerts] == [second, first]
    newest = alerts[0]
    assert newest.account_id == account.id
    assert newest.smtp_user_id == user.id
    assert newest.kind == "unauthorised_sender"
    assert newest.message == "From y@evil.example"
    assert newest.message_id == "Q123"
    assert newest.created_at.tzinfo is UTC
    assert newest.acknowledged_at is None
    assert alerts[1].smtp_user_id is None


def test_alert_for_a_missing_account_or_user_is_not_found(db: Database, account: Account) -> None:
    with pytest.raises(NotFound, match="account 999 not found"), db.begin() as conn:
        add_alert(conn, 999, "quota", "x")
    with pytest.raises(NotFound, match="SMTP user 888 not found"), db.begin() as conn:
        add_alert(conn, account.id, "quota", "x", smtp_user_id=888)


def test_alert_outlives_its_smtp_user(db: Database, account: Account) -> None:
    with db.begin() as conn:
        user = create_smtp_user(conn, account.id, "mailer", "$argon2id$x")
        add_alert(conn, account.id, "blocked", "x", smtp_user_id=user.id)
        conn.execute(sa.delete(smtp_users).where(smtp_users.c.id == user.id))
    with db.connect() as conn:
        (alert,) = list_alerts(conn, account.id)
    assert alert.smtp_user_id is None
