"""Intake's grouped inserts on SQLite, run on the driver's cursor.

Measured on the 2-core benchmark machine (grouped commits of 1, 3 and 10
messages of 10 KiB, one recipient each, WAL with ``synchronous=FULL``):
through SQLAlchemy's execution path a commit cost 0.76 / 0.45 / 0.21 ms of
CPU per message, the same statements on the sqlite3 cursor 0.41 / 0.20 /
0.16 ms. At the small groups a server commits when few clients wait,
SQLAlchemy's per-statement work cost as much as SQLite's own, fsync
included, and intake's commits are the busiest write path there is.

So on SQLite the statements of every intake commit are fixed strings over
the schema's tables, run on the cursor of the transaction the caller holds
(a ``BEGIN IMMEDIATE`` one: see :meth:`postlane.store.Database.begin`), with
values converted exactly as the column types convert them (``UTCDateTime``:
naive UTC in SQLAlchemy's SQLite format; ``JSON``: ``json.dumps``). The
tests read every row back through SQLAlchemy, so the two cannot drift apart
unnoticed. PostgreSQL keeps SQLAlchemy's path.

Recipient ids: SQLite gives a new row the largest rowid plus one, and the
transaction holds the write lock, so the rows of one ``executemany`` get
consecutive ids ending at ``max(id)``; reading that once replaces a
``RETURNING`` per row.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.errors import StoreError
from postlane.store.schema import events, messages, recipients

if TYPE_CHECKING:
    from postlane.store.intake import NewMessage


def _insert(table: sa.Table, columns: tuple[str, ...]) -> str:
    names = ", ".join(table.c[name].name for name in columns)  # a typo fails at import
    marks = ", ".join("?" * len(columns))
    return f"INSERT INTO {table.name} ({names}) VALUES ({marks})"  # noqa: S608 - schema names


_MESSAGES = _insert(
    messages,
    (
        "id",
        "account_id",
        "smtp_user_id",
        "mail_from",
        "header_from",
        "message_id_header",
        "subject",
        "size",
        "raw",
        "options",
        "client_ip",
        "tls",
        "received_at",
        "dedupe_key",
    ),
)
_RECIPIENTS = _insert(
    recipients,
    (
        "message_id",
        "account_id",
        "address",
        "domain",
        "status",
        "priority",
        "next_attempt_at",
        "expires_at",
        "created_at",
        "updated_at",
    ),
)
_EVENTS = _insert(
    events, ("account_id", "message_id", "recipient_id", "type", "created_at", "data")
)
_LAST_RECIPIENT = "SELECT max(id) FROM recipients"
_DUPLICATES = (
    "SELECT dedupe_key, min(id) FROM messages WHERE dedupe_key IN ({keys}) "
    "AND received_at >= ? AND duplicate_of IS NULL GROUP BY dedupe_key"
)


def when(value: datetime) -> str:
    """What ``UTCDateTime`` stores on SQLite: naive UTC, SQLAlchemy's DATETIME format."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} given; use an aware UTC datetime")
    v = value.astimezone(UTC)
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d} "
        f"{v.hour:02d}:{v.minute:02d}:{v.second:02d}.{v.microsecond:06d}"
    )


def cursor_of(conn: Connection) -> sqlite3.Cursor:
    """A cursor of the sqlite3 connection under ``conn``, in its transaction."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    assert isinstance(cursor, sqlite3.Cursor)
    return cursor


def find_duplicates(conn: Connection, keys: Sequence[str], since: datetime) -> dict[str, str]:
    unique = sorted(set(keys))
    sql = _DUPLICATES.format(keys=", ".join("?" * len(unique)))
    try:
        rows = cursor_of(conn).execute(sql, [*unique, when(since)]).fetchall()
    except sqlite3.Error as e:
        raise StoreError(f"database error: {e}") from e
    return {str(key): str(first) for key, first in rows}


def insert(conn: Connection, batch: Sequence[NewMessage]) -> None:
    """The messages, their recipients, and their ``accepted``/``inbound`` and ``queued`` events."""
    cursor = cursor_of(conn)
    try:
        _insert_all(cursor, batch)
    except sqlite3.Error as e:
        raise StoreError(f"database error: {e}") from e
    finally:
        cursor.close()


def _insert_all(cursor: sqlite3.Cursor, batch: Sequence[NewMessage]) -> None:
    received = [when(m.received_at) for m in batch]
    cursor.executemany(
        _MESSAGES,
        [
            (
                m.id,
                m.account_id,
                m.smtp_user_id,
                m.mail_from,
                m.header_from,
                m.message_id_header,
                m.subject,
                len(m.raw),
                m.raw,
                json.dumps(m.options),
                m.client_ip,
                m.tls,
                created,
                m.dedupe_key,
            )
            for m, created in zip(batch, received, strict=True)
        ],
    )
    event_rows: list[tuple[Any, ...]] = [
        (m.account_id, m.id, None, m.event_type, created, json.dumps(m.event_data))
        for m, created in zip(batch, received, strict=True)
    ]
    rows: list[tuple[Any, ...]] = []
    queued: list[tuple[Any, ...]] = []  # the queued events, waiting for their recipient ids
    for m, created in zip(batch, received, strict=True):
        for r in m.recipients:
            start = when(r.next_attempt_at)
            rows.append(
                (
                    m.id,
                    m.account_id,
                    r.address,
                    r.domain,
                    "queued",
                    r.priority,
                    start,
                    when(r.expires_at),
                    created,
                    created,
                )
            )
            data: dict[str, Any] = {"recipient": r.address, "priority": r.priority}
            if r.next_attempt_at != m.received_at:
                data["scheduled_for"] = r.next_attempt_at.isoformat()
            queued.append((m.account_id, m.id, "queued", created, json.dumps(data)))
    if rows:
        cursor.executemany(_RECIPIENTS, rows)
        (last,) = cursor.execute(_LAST_RECIPIENT).fetchone()
        first = int(last) - len(rows) + 1
        event_rows += [
            (account, message, first + i, kind, created, data)
            for i, (account, message, kind, created, data) in enumerate(queued)
        ]
    cursor.executemany(_EVENTS, event_rows)
