"""Sending domains: the DKIM keys and DNS names an account sends under.

Names are stored lower-cased, since DNS compares them case-insensitively, and
each domain belongs to one account only: two customers must never be able to
sign as the same domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.errors import InvalidInput, NotFound
from postlane.store import _values
from postlane.store._constraints import explained
from postlane.store.schema import sending_domains, utc_now


@dataclass(frozen=True, slots=True)
class SendingDomain:
    id: int
    account_id: int
    name: str
    dkim_selector: str
    dkim_algorithm: str
    #: Encrypted by the caller; kept out of repr all the same.
    dkim_private_key_enc: bytes = field(repr=False)
    #: Base64 of the DER SubjectPublicKeyInfo: the DKIM record's p= value.
    dkim_public_key: str
    ed25519_selector: str | None
    ed25519_private_key_enc: bytes | None = field(repr=False)
    ed25519_public_key: str | None
    return_path_subdomain: str
    spf_verified: bool
    dkim_verified: bool
    dmarc_verified: bool
    return_path_verified: bool
    verified_at: datetime | None
    created_at: datetime
    updated_at: datetime


def add_domain(
    conn: Connection,
    account_id: int,
    name: str,
    *,
    dkim_selector: str,
    dkim_private_key_enc: bytes,
    dkim_public_key: str,
    ed25519_selector: str | None = None,
    ed25519_private_key_enc: bytes | None = None,
    ed25519_public_key: str | None = None,
    return_path_subdomain: str = "bounce",
) -> SendingDomain:
    """Register ``name`` for the account, unverified.

    :class:`AlreadyExists` if any account has it, :class:`NotFound` if the
    account does not exist. The Ed25519 key is optional but all or nothing.
    """
    ed25519 = (ed25519_selector, ed25519_private_key_enc, ed25519_public_key)
    if any(part is not None for part in ed25519) and None in ed25519:
        raise InvalidInput("an Ed25519 key needs its selector, private key and public key together")
    name = _values.domain("domain name", name)
    values = {
        "account_id": _values.integer("account_id", account_id),
        "name": name,
        "dkim_selector": _values.name("dkim_selector", dkim_selector),
        "dkim_private_key_enc": _values.blob("dkim_private_key_enc", dkim_private_key_enc),
        "dkim_public_key": _values.name("dkim_public_key", dkim_public_key),
        "ed25519_selector": _values.optional_name("ed25519_selector", ed25519_selector),
        "ed25519_private_key_enc": _values.optional_bytes(
            "ed25519_private_key_enc", ed25519_private_key_enc
        ),
        "ed25519_public_key": _values.optional_name("ed25519_public_key", ed25519_public_key),
        "return_path_subdomain": _values.domain("return_path_subdomain", return_path_subdomain),
    }
    now = utc_now()
    statement = (
        sa.insert(sending_domains)
        .values(**values, created_at=now, updated_at=now)
        .returning(*sending_domains.c)
    )
    with explained(
        conn,
        duplicate=f"domain '{name}' exists",
        missing_parent=f"account {account_id} not found",
        values=values,
    ):
        row = conn.execute(statement).one()
    return _domain(row)


def get_domain(conn: Connection, name: str) -> SendingDomain:
    row = conn.execute(
        sa.select(sending_domains).where(sending_domains.c.name == name.lower())
    ).one_or_none()
    if row is None:
        raise NotFound(f"domain '{name}' not found")
    return _domain(row)


def list_domains(conn: Connection, account_id: int | None = None) -> list[SendingDomain]:
    """Every domain, or the domains of one account, by name."""
    statement = sa.select(sending_domains).order_by(sending_domains.c.name)
    if account_id is not None:
        statement = statement.where(sending_domains.c.account_id == account_id)
    return [_domain(row) for row in conn.execute(statement)]


def domains_for_account(conn: Connection, account_id: int) -> list[SendingDomain]:
    """The domains an account may send from (intake's From-alignment check)."""
    return list_domains(conn, account_id)


def _domain(row: sa.Row[Any]) -> SendingDomain:
    return SendingDomain(**row._mapping)
