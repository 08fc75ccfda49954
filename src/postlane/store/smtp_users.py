"""SMTP users: the credentials clients authenticate with on submission.

A username identifies one user across all accounts (AUTH carries no account)
and compares case-insensitively, through a unique index on ``lower(username)``
that lookups use too. SQLite's ``lower()`` folds ASCII letters only, so on
SQLite two names differing only in the case of non-ASCII letters are distinct.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.errors import NotFound
from postlane.store import _values
from postlane.store._constraints import explained
from postlane.store.schema import PRIORITY_NORMAL, smtp_users, utc_now
from postlane.store.tenant_changes import change_stamp

_CHANGEABLE: dict[str, _values.Converter] = {
    "username": _values.name,
    "active": _values.flag,
    "priority": _values.integer,
    "note": _values.text,
    "authorised_domains": _values.domain_list,
    "authorised_senders": _values.text_list,
    "default_options": _values.json_object,
}


@dataclass(frozen=True, slots=True)
class SmtpUser:
    id: int
    account_id: int
    username: str
    #: An Argon2 hash; still a secret worth guessing at, so never printed.
    password_hash: str = field(repr=False)
    active: bool
    priority: int
    note: str
    #: Empty means every domain of the account may be used.
    authorised_domains: tuple[str, ...]
    #: Empty means every sender address may be used.
    authorised_senders: tuple[str, ...]
    default_options: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    password_changed_at: datetime


def create_smtp_user(
    conn: Connection,
    account_id: int,
    username: str,
    password_hash: str,
    *,
    priority: int = PRIORITY_NORMAL,
    note: str = "",
    authorised_domains: Iterable[str] = (),
    authorised_senders: Iterable[str] = (),
    default_options: Mapping[str, Any] | None = None,
) -> SmtpUser:
    """A new active user of the account.

    :class:`AlreadyExists` if the username is taken in any case,
    :class:`NotFound` if the account does not exist, :class:`InvalidInput` if
    the priority is outside 1..5.
    """
    values = {
        "account_id": _values.integer("account_id", account_id),
        "username": _values.name("username", username),
        "password_hash": _values.name("password_hash", password_hash),
        "priority": _values.integer("priority", priority),
        "note": _values.text("note", note),
        "authorised_domains": _values.domain_list("authorised_domains", authorised_domains),
        "authorised_senders": _values.text_list("authorised_senders", authorised_senders),
        "default_options": _values.json_object("default_options", default_options or {}),
    }
    now = utc_now()
    statement = (
        sa.insert(smtp_users)
        .values(**values, created_at=now, updated_at=now, password_changed_at=now)
        .returning(*smtp_users.c)
    )
    with explained(
        conn,
        duplicate=f"SMTP user '{username}' exists",
        missing_parent=f"account {account_id} not found",
        values=values,
    ):
        row = conn.execute(statement).one()
    return _smtp_user(row)


def get_smtp_user(conn: Connection, username: str) -> SmtpUser:
    user = find_smtp_user_by_username(conn, username)
    if user is None:
        raise NotFound(f"SMTP user '{username}' not found")
    return user


def find_smtp_user_by_username(conn: Connection, username: str) -> SmtpUser | None:
    """The user for an AUTH attempt, or None: a miss is normal there, not an error."""
    statement = sa.select(smtp_users).where(
        sa.func.lower(smtp_users.c.username) == sa.func.lower(username)
    )
    row = conn.execute(statement).one_or_none()
    return None if row is None else _smtp_user(row)


def list_smtp_users(conn: Connection, account_id: int | None = None) -> list[SmtpUser]:
    """Every user, or the users of one account, by username."""
    statement = sa.select(smtp_users).order_by(
        sa.func.lower(smtp_users.c.username), smtp_users.c.id
    )
    if account_id is not None:
        statement = statement.where(smtp_users.c.account_id == account_id)
    return [_smtp_user(row) for row in conn.execute(statement)]


def update_smtp_user(conn: Connection, user_id: int, **changes: Any) -> SmtpUser:
    """Change the named fields; the password goes through :func:`set_password_hash`."""
    values = _values.changes("SMTP user", changes, _CHANGEABLE)
    return _update(conn, user_id, values)


def set_password_hash(conn: Connection, user_id: int, password_hash: str) -> SmtpUser:
    """Replace the password hash and record when, for rotation policies and audits."""
    values = {"password_hash": _values.name("password_hash", password_hash)}
    return _update(conn, user_id, {**values, "password_changed_at": utc_now()})


def _update(conn: Connection, user_id: int, values: dict[str, Any]) -> SmtpUser:
    if values:
        statement = (
            sa.update(smtp_users)
            .where(smtp_users.c.id == user_id)
            .values(**values, updated_at=change_stamp(conn, smtp_users))
            .returning(*smtp_users.c)
        )
        with explained(
            conn, duplicate=f"SMTP user '{values.get('username')}' exists", values=values
        ):
            row = conn.execute(statement).one_or_none()
    else:
        row = conn.execute(sa.select(smtp_users).where(smtp_users.c.id == user_id)).one_or_none()
    if row is None:
        raise NotFound(f"SMTP user {user_id} not found")
    return _smtp_user(row)


def _smtp_user(row: sa.Row[Any]) -> SmtpUser:
    columns = dict(row._mapping)
    columns["authorised_domains"] = tuple(columns["authorised_domains"])
    columns["authorised_senders"] = tuple(columns["authorised_senders"])
    return SmtpUser(**columns)
