"""Stored templates: an account's named Jinja2 sources for a message's Subject and body.

A message names one in X-OV-Template or X-Mailgun-Template-Name, and the
delivery worker renders it in place of the body the client sent (see
:mod:`postlane.delivery.compose`).

Names travel in mail headers and on command lines, so they are kept to
ASCII letters, digits and ``. _ - /`` (``welcome-email``,
``newsletter/2026-11``), and compared case-insensitively: they are stored
lower-cased, as a header written ``Welcome`` by one client and ``welcome``
by another names the same template.

Sources are compiled when stored, so a syntax error is refused with its line
while the author is there to fix it, instead of failing every recipient of
a send later. The database's CHECK refuses a template with neither an HTML
nor a text part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from postlane.errors import InvalidInput, NotFound
from postlane.render.templates import check_template
from postlane.store import _values
from postlane.store._constraints import explained
from postlane.store.schema import templates, utc_now

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_SOURCE_CHARS",
    "Template",
    "delete_template",
    "find_template",
    "get_template",
    "list_templates",
    "normalise_name",
    "put_template",
]

MAX_NAME_LENGTH: Final = 128
MAX_SOURCE_CHARS: Final = 1_000_000
"""A larger source is no email template: Gmail clips a body past about 100 kB."""

_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._/-]*")
_NAME_RULE: Final = (
    f"1 to {MAX_NAME_LENGTH} characters: ASCII letters, digits, '.', '_', '-' and '/', "
    "starting with a letter or digit"
)


@dataclass(frozen=True, slots=True)
class Template:
    id: int
    account_id: int
    #: Lower-cased.
    name: str
    #: Jinja2 sources; None where the template has no such part.
    subject: str | None
    html: str | None
    text: str | None
    created_at: datetime
    updated_at: datetime


def put_template(
    conn: Connection,
    account_id: int,
    name: str,
    *,
    html: str | None = None,
    text: str | None = None,
    subject: str | None = None,
    now: datetime | None = None,
) -> Template:
    """Store the template ``name`` of the account, replacing one of that name.

    A replacement keeps ``created_at`` and sets ``updated_at`` to ``now``
    (the current time when None); parts not given are removed, so what is
    stored is exactly what was put. :class:`InvalidInput` for a bad name, a
    source that does not compile (with its line) or neither HTML nor text;
    :class:`NotFound` if the account does not exist.
    """
    name = normalise_name(name)
    values = {
        "account_id": _values.integer("account_id", account_id),
        "name": name,
        "subject": _source(name, "subject", subject, html=False),
        "html": _source(name, "html", html, html=True),
        "text": _source(name, "text", text, html=False),
    }
    stamp = _stamp(now)
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    row_values = insert(templates).values(**values, created_at=stamp, updated_at=stamp)
    statement = row_values.on_conflict_do_update(
        index_elements=["account_id", "name"],
        set_={
            "subject": row_values.excluded.subject,
            "html": row_values.excluded.html,
            "text": row_values.excluded.text,
            "updated_at": row_values.excluded.updated_at,
        },
    ).returning(*templates.c)
    # No values= for explained(): its CHECK is about the parts *not* given,
    # so the rule alone says it ("a template needs an HTML or a text part").
    with explained(conn, missing_parent=f"account {account_id} not found"):
        row = conn.execute(statement).one()
    return _template(row)


def find_template(conn: Connection, account_id: int, name: str) -> Template | None:
    """The account's template of that name (any case), or None.

    A name no template could have is simply not found: the caller is asking
    for what a message header named, and "does not exist" is the answer.
    """
    query = sa.select(templates).where(
        templates.c.account_id == _values.integer("account_id", account_id),
        templates.c.name == name.lower(),
    )
    row = conn.execute(query).one_or_none()
    return None if row is None else _template(row)


def get_template(conn: Connection, account_id: int, name: str) -> Template:
    """The account's template of that name; :class:`NotFound` if it has none."""
    found = find_template(conn, account_id, name)
    if found is None:
        raise NotFound(f"template {name!r} not found for account {account_id}")
    return found


def list_templates(conn: Connection, account_id: int) -> list[Template]:
    """The account's templates by name."""
    query = (
        sa.select(templates)
        .where(templates.c.account_id == _values.integer("account_id", account_id))
        .order_by(templates.c.name)
    )
    return [_template(row) for row in conn.execute(query)]


def delete_template(conn: Connection, account_id: int, name: str) -> None:
    """Remove the account's template of that name; :class:`NotFound` if it has none.

    Messages queued with its name fail when they come to be sent, with the
    reason that it does not exist: there is nothing left to render them with.
    """
    statement = sa.delete(templates).where(
        templates.c.account_id == _values.integer("account_id", account_id),
        templates.c.name == name.lower(),
    )
    if conn.execute(statement).rowcount == 0:
        raise NotFound(f"template {name!r} not found for account {account_id}")


def normalise_name(name: Any) -> str:
    """The stored form of a template name, or :class:`InvalidInput` saying what is allowed."""
    if not isinstance(name, str):
        raise InvalidInput(f"template name must be text, got {type(name).__name__}")
    # isascii first: str.lower() turns some non-ASCII letters (the Kelvin sign) into ASCII.
    lowered = name.lower()
    if not name.isascii() or len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(lowered):
        raise InvalidInput(f"template name {name!r} is invalid: use {_NAME_RULE}")
    return lowered


def _source(name: str, part: str, source: Any, *, html: bool) -> str | None:
    if source is None:
        return None
    if not isinstance(source, str):
        raise InvalidInput(f"template {name!r}: {part} must be text, got {type(source).__name__}")
    if not source.strip():
        raise InvalidInput(f"template {name!r}: {part} is empty; leave the part out instead")
    if len(source) > MAX_SOURCE_CHARS:
        raise InvalidInput(
            f"template {name!r}: {part} is longer than {MAX_SOURCE_CHARS} characters"
        )
    if part == "subject" and ("\n" in source or "\r" in source):
        raise InvalidInput(f"template {name!r}: subject must be one line")
    check_template(name, source, html, part=part)
    return source


def _stamp(now: datetime | None) -> datetime:
    if now is None:
        return utc_now()
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise InvalidInput(f"now must be an aware UTC datetime, got {now!r}")
    return now


def _template(row: sa.Row[Any]) -> Template:
    return Template(**row._mapping)
