"""Reading messages back: what was stored, for whom, and what happened to it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.errors import NotFound
from postlane.store import _sqlite_delivery
from postlane.store.schema import events, messages, recipients


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """A stored message; its send options as the JSON text stored (:attr:`options` parses it).

    The delivery worker keys its parsed options by that text: parsing every
    message's options again, and writing them out canonically to find the
    cached parse, was 13 us per message (timeit), about 8% of the delivery
    role's time with Python's lock under bench/relay (py-spy).
    """

    id: str
    account_id: int
    smtp_user_id: int | None
    mail_from: str
    header_from: str
    message_id_header: str | None
    subject: str | None
    size: int
    options_json: str
    client_ip: str | None
    tls: str | None
    received_at: datetime
    raw: bytes = field(repr=False)

    @property
    def options(self) -> dict[str, Any]:
        return dict(json.loads(self.options_json) or {})


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    id: int
    address: str
    status: str
    priority: int
    next_attempt_at: datetime
    expires_at: datetime
    attempts: int
    last_reply: str | None


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    type: str
    created_at: datetime
    recipient_id: int | None
    data: dict[str, Any]


_CHUNK = 500  # ids per IN (...): below SQLite's and drivers' parameter limits


# Every column, the options as their stored JSON text (not decoded).
_MESSAGE_COLUMNS = [
    sa.cast(column, sa.Text).label(column.name) if column is messages.c.options else column
    for column in messages.c
]


def get_message(conn: Connection, message_id: str) -> MessageRecord:
    query = sa.select(*_MESSAGE_COLUMNS).where(messages.c.id == message_id)
    row = conn.execute(query).one_or_none()
    if row is None:
        raise NotFound(f"message {message_id!r} not found")
    return _message(row)


def get_messages(conn: Connection, message_ids: Sequence[str]) -> dict[str, MessageRecord]:
    """The messages of ``message_ids`` that exist, by id: one query per 500 ids.

    For the delivery worker, which needs every message of a leased batch:
    one message at a time was a query (and a thread hop) per recipient. On
    SQLite the query runs on the driver's cursor (:mod:`._sqlite_delivery`).
    """
    if conn.dialect.name == "sqlite":
        rows = _sqlite_delivery.get_messages(conn, list(dict.fromkeys(message_ids)))
        return {row[0]: MessageRecord(*row) for row in rows}
    return _get_messages_core(conn, message_ids)


def _get_messages_core(conn: Connection, message_ids: Sequence[str]) -> dict[str, MessageRecord]:
    found: dict[str, MessageRecord] = {}
    for chunk in _chunks(message_ids):
        for row in conn.execute(sa.select(*_MESSAGE_COLUMNS).where(messages.c.id.in_(chunk))):
            found[row.id] = _message(row)
    return found


def recipient_counts(conn: Connection, message_ids: Sequence[str]) -> dict[str, int]:
    """How many recipient rows each message has (messages without rows are left out)."""
    counts: dict[str, int] = {}
    for chunk in _chunks(message_ids):
        query = (
            sa.select(recipients.c.message_id, sa.func.count())
            .where(recipients.c.message_id.in_(chunk))
            .group_by(recipients.c.message_id)
        )
        for message_id, count in conn.execute(query):
            counts[message_id] = int(count)
    return counts


def _chunks(ids: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for value in dict.fromkeys(ids):
        chunk.append(value)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _message(row: sa.Row[Any]) -> MessageRecord:
    return MessageRecord(
        id=row.id,
        account_id=row.account_id,
        smtp_user_id=row.smtp_user_id,
        mail_from=row.mail_from,
        header_from=row.header_from,
        message_id_header=row.message_id_header,
        subject=row.subject,
        size=row.size,
        options_json=row.options or "{}",
        client_ip=row.client_ip,
        tls=row.tls,
        received_at=row.received_at,
        raw=bytes(row.raw),
    )


def recipients_of(conn: Connection, message_id: str) -> list[RecipientRecord]:
    query = (
        sa.select(recipients).where(recipients.c.message_id == message_id).order_by(recipients.c.id)
    )
    return [
        RecipientRecord(
            id=r.id,
            address=r.address,
            status=r.status,
            priority=r.priority,
            next_attempt_at=r.next_attempt_at,
            expires_at=r.expires_at,
            attempts=r.attempts,
            last_reply=r.last_reply,
        )
        for r in conn.execute(query)
    ]


def events_of(conn: Connection, message_id: str) -> list[EventRecord]:
    query = sa.select(events).where(events.c.message_id == message_id).order_by(events.c.id)
    return [
        EventRecord(
            id=e.id,
            type=e.type,
            created_at=e.created_at,
            recipient_id=e.recipient_id,
            data=dict(e.data or {}),
        )
        for e in conn.execute(query)
    ]
