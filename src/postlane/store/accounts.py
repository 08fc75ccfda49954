"""Accounts: the customers, and the settings that apply to all they send."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.errors import NotFound
from postlane.store import _values
from postlane.store._constraints import explained
from postlane.store.schema import accounts, utc_now
from postlane.store.tenant_changes import change_stamp

_MAX_ID = 2**63 - 1

_CHANGEABLE: dict[str, _values.Converter] = {
    "name": _values.name,
    "smtp_enabled": _values.flag,
    "allow_email_login": _values.flag,
    "unauthorised_sender_policy": _values.text,
    "attachment_policy": _values.text,
    "attachment_archive_name": _values.name,
    "attachment_password_enc": _values.optional_bytes,
    "track_opens": _values.flag,
    "track_clicks": _values.flag,
    "timezone": _values.name,
    "trusted_networks": _values.text_list,
    "default_options": _values.json_object,
}


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    name: str
    smtp_enabled: bool
    allow_email_login: bool
    unauthorised_sender_policy: str
    attachment_policy: str
    attachment_archive_name: str
    #: Encrypted by the caller; kept out of repr all the same.
    attachment_password_enc: bytes | None = field(repr=False)
    track_opens: bool
    track_clicks: bool
    timezone: str
    trusted_networks: tuple[str, ...]
    default_options: dict[str, Any]
    created_at: datetime
    updated_at: datetime


def create_account(conn: Connection, name: str) -> Account:
    """A new account with default settings; :class:`AlreadyExists` if the name is taken."""
    name = _values.name("account name", name)
    now = utc_now()
    statement = (
        sa.insert(accounts).values(name=name, created_at=now, updated_at=now).returning(*accounts.c)
    )
    with explained(conn, duplicate=f"account '{name}' exists"):
        row = conn.execute(statement).one()
    return _account(row)


def get_account(conn: Connection, name_or_id: str | int) -> Account:
    """The account with that id or name.

    A string of digits that names no account is tried as an id, so the
    command line can take either.
    """
    if isinstance(name_or_id, int):
        row = _select_one(conn, accounts.c.id == name_or_id)
    else:
        row = _select_one(conn, accounts.c.name == name_or_id)
        as_id = _as_id(name_or_id)
        if row is None and as_id is not None:
            row = _select_one(conn, accounts.c.id == as_id)
    if row is None:
        raise NotFound(f"account {name_or_id!r} not found")
    return _account(row)


def list_accounts(conn: Connection) -> list[Account]:
    rows = conn.execute(sa.select(accounts).order_by(accounts.c.name))
    return [_account(row) for row in rows]


def update_account(conn: Connection, account_id: int, **changes: Any) -> Account:
    """Change the named settings; an unknown setting is :class:`InvalidInput`."""
    values = _values.changes("account", changes, _CHANGEABLE)
    if not values:
        return get_account(conn, account_id)
    statement = (
        sa.update(accounts)
        .where(accounts.c.id == account_id)
        .values(**values, updated_at=change_stamp(conn, accounts))
        .returning(*accounts.c)
    )
    with explained(conn, duplicate=f"account '{values.get('name')}' exists", values=values):
        row = conn.execute(statement).one_or_none()
    if row is None:
        raise NotFound(f"account {account_id} not found")
    return _account(row)


def _select_one(conn: Connection, condition: sa.ColumnElement[bool]) -> sa.Row[Any] | None:
    return conn.execute(sa.select(accounts).where(condition)).one_or_none()


def _as_id(text: str) -> int | None:
    if text.isascii() and text.isdigit() and int(text) <= _MAX_ID:
        return int(text)
    return None


def _account(row: sa.Row[Any]) -> Account:
    columns = dict(row._mapping)
    columns["trusted_networks"] = tuple(columns["trusted_networks"])
    return Account(**columns)
