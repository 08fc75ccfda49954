"""Suppression lists: addresses an account must not send to any more.

An address is added after a hard bounce, a complaint or an unsubscribe, and
checked by delivery before each send (:func:`is_suppressed`).

Addresses compare case-insensitively, the domain *and* the local part: they
are stored lower-cased (Python's full Unicode ``str.lower``, not SQLite's
ASCII-only ``lower()``) and looked up lower-cased. RFC 5321 lets a server
treat ``Bob@`` and ``bob@`` as different mailboxes, but none of note does,
and for a suppression list the safe mistake is to not send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from postlane.errors import InvalidInput
from postlane.store import _values
from postlane.store._constraints import explained
from postlane.store.schema import suppressions

#: Addresses per ``IN (...)`` lookup; SQLite allows 32,766 bound values.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Suppression:
    id: int
    account_id: int
    #: Lower-cased.
    address: str
    #: Why it was added, e.g. ``hard_bounce``, ``complaint``, ``unsubscribe``, ``manual``.
    reason: str
    detail: str | None
    created_at: datetime


def add_suppression(
    conn: Connection,
    account_id: int,
    address: str,
    reason: str,
    detail: str | None = None,
    *,
    now: datetime,
) -> bool:
    """Suppress ``address`` for the account; True if added, False if it already was.

    Adding an address again changes nothing: the first reason (and detail)
    is kept, so a later unsubscribe does not hide an earlier hard bounce.
    :class:`NotFound` if the account does not exist.
    """
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise InvalidInput(f"now must be an aware UTC datetime, got {now!r}")
    values = {
        "account_id": _values.integer("account_id", account_id),
        "address": normalise(address),
        "reason": _values.name("reason", reason),
        "detail": None if detail is None else _values.text("detail", detail),
        "created_at": now,
    }
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert(suppressions)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["account_id", "address"])
        .returning(suppressions.c.id)
    )
    with explained(conn, missing_parent=f"account {account_id} not found"):
        added = conn.execute(statement).first()
    return added is not None


def is_suppressed(conn: Connection, account_id: int, addresses: Sequence[str]) -> set[str]:
    """Those of ``addresses`` (as given) that the account has suppressed, in any case."""
    _values.integer("account_id", account_id)
    if isinstance(addresses, str):
        raise InvalidInput("addresses must be a sequence of addresses, not one string")
    wanted = sorted({address.lower() for address in addresses})
    found: set[str] = set()
    for start in range(0, len(wanted), _CHUNK):
        query = sa.select(suppressions.c.address).where(
            suppressions.c.account_id == account_id,
            suppressions.c.address.in_(wanted[start : start + _CHUNK]),
        )
        found.update(conn.execute(query).scalars())
    return {address for address in addresses if address.lower() in found}


def remove_suppression(conn: Connection, account_id: int, address: str) -> bool:
    """Allow sending to ``address`` again; True if it was suppressed."""
    statement = sa.delete(suppressions).where(
        suppressions.c.account_id == _values.integer("account_id", account_id),
        suppressions.c.address == normalise(address),
    )
    return conn.execute(statement).rowcount > 0


def list_suppressions(conn: Connection, account_id: int, limit: int = 100) -> list[Suppression]:
    """The account's suppressed addresses, newest first."""
    if _values.integer("limit", limit) < 0:
        raise InvalidInput(f"limit must not be negative, got {limit}")
    query = (
        sa.select(suppressions)
        .where(suppressions.c.account_id == _values.integer("account_id", account_id))
        .order_by(suppressions.c.id.desc())
        .limit(limit)
    )
    return [_suppression(row) for row in conn.execute(query)]


def normalise(address: str) -> str:
    """The form addresses are stored and compared in: lower-cased, whole."""
    text = _values.text("address", address)
    local, at, domain = text.rpartition("@")
    if not (local and at and domain) or text != text.strip() or not text.isprintable():
        raise InvalidInput(f"address must look like local@domain, got {address!r}")
    return text.lower()


def _suppression(row: sa.Row[Any]) -> Suppression:
    return Suppression(**row._mapping)
