"""The delivery role's busiest statements on SQLite, on the driver's cursor, as intake's are.

Measured by hand on the 2-core benchmark machine (500 recipients of a
bench/relay run, one transaction, CPU of the calling thread): writing them
delivered through SQLAlchemy's execution path cost 33 us per recipient, the
same statements on the sqlite3 cursor 12 us; leasing them, 14.7 and 9.1 us.
Both run in write transactions, holding SQLite's one write lock, which
intake's commits wait for. Reading a batch's messages (500 of 10 KiB, a
read, records built) took 27.6-28.5 us per message through SQLAlchemy and
16.9-18.3 on the cursor.

The statements are the ones :mod:`postlane.store.queue` makes through
SQLAlchemy (printed from it), with values converted exactly as the column
types convert them (see :mod:`postlane.store._sqlite_intake`); the tests run
both paths on the same rows and compare what they return and write.
PostgreSQL keeps SQLAlchemy's path, with its row locks.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Connection

from postlane.errors import StoreError
from postlane.store._sqlite_intake import cursor_of, when

__all__ = ["get_messages", "lease", "mark_delivered"]

_CHUNK = 500  # ids per SELECT, as queue's

_LEASE = (
    "WITH due_queued AS (SELECT id, priority, next_attempt_at FROM recipients "
    "WHERE status = 'queued' AND next_attempt_at <= ? "
    "ORDER BY priority, next_attempt_at, id LIMIT ?), "
    "due_deferred AS (SELECT id, priority, next_attempt_at FROM recipients "
    "WHERE status = 'deferred' AND next_attempt_at <= ? "
    "ORDER BY priority, next_attempt_at, id LIMIT ?), "
    "picked AS (SELECT id FROM (SELECT id, priority, next_attempt_at FROM due_queued "
    "UNION ALL SELECT id, priority, next_attempt_at FROM due_deferred) "
    "ORDER BY priority, next_attempt_at, id LIMIT ?) "
    "UPDATE recipients SET status = 'sending', lease_owner = ?, lease_expires_at = ?, "
    "updated_at = ? FROM picked WHERE recipients.id = picked.id "
    "RETURNING id, message_id, account_id, address, domain, priority, attempts, "
    "expires_at, next_attempt_at"
)
#: A leased row: id, message id, account id, address, domain, priority, attempts,
#: expires_at, next_attempt_at.
LeasedRow = tuple[int, str, int, str, str, int, int, datetime, datetime]

_HELD = (
    "SELECT id, account_id, message_id FROM recipients "
    "WHERE id IN ({ids}) AND lease_owner = ? AND status = 'sending'"
)
_DELIVERED = (
    "UPDATE recipients SET status = 'delivered', attempts = attempts + 1, "
    "lease_owner = NULL, lease_expires_at = NULL, updated_at = ?{reply} WHERE id = ?"
)
_WITH_REPLY = _DELIVERED.format(reply=", last_reply = ?")
_WITHOUT_REPLY = _DELIVERED.format(reply="")
_EVENT = (
    "INSERT INTO events (account_id, message_id, recipient_id, type, created_at, data) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


_MESSAGES = (
    "SELECT id, account_id, smtp_user_id, mail_from, header_from, message_id_header, "
    "subject, size, CAST(options AS TEXT), client_ip, tls, received_at, raw "
    "FROM messages WHERE id IN ({ids})"
)
#: A message row, in :class:`postlane.store.messages.MessageRecord`'s field order:
#: id, account id, SMTP user id, MAIL FROM, header From, Message-ID, subject,
#: size, options (their JSON text), client IP, TLS, received_at, raw.
MessageRow = tuple[
    str,
    int,
    int | None,
    str,
    str,
    str | None,
    str | None,
    int,
    str,
    str | None,
    str | None,
    datetime,
    bytes,
]


def get_messages(conn: Connection, message_ids: Sequence[str]) -> list[MessageRow]:
    """The stored messages among ``message_ids`` (distinct), in no particular order."""
    cursor = cursor_of(conn)
    found: list[MessageRow] = []
    try:
        for start in range(0, len(message_ids), _CHUNK):
            chunk = message_ids[start : start + _CHUNK]
            sql = _MESSAGES.format(ids=", ".join("?" * len(chunk)))
            found += [
                (*row[:8], row[8] or "{}", row[9], row[10], _instant(row[11]), row[12])
                for row in cursor.execute(sql, chunk)
            ]
    except sqlite3.Error as e:
        raise StoreError(f"database error: {e}") from e
    finally:
        cursor.close()
    return found


def lease(
    conn: Connection, *, owner: str, now: datetime, until: datetime, limit: int
) -> list[LeasedRow]:
    """Up to ``limit`` due rows leased to ``owner`` until ``until``, in no particular order.

    Arguments are checked by the caller. Highest priority first, then oldest
    ``next_attempt_at``, then lowest id, as :func:`postlane.store.queue.lease_due`.
    """
    stamp = when(now)
    cursor = cursor_of(conn)
    try:
        rows = cursor.execute(
            _LEASE, (stamp, limit, stamp, limit, limit, owner, when(until), stamp)
        ).fetchall()
    except sqlite3.Error as e:
        raise StoreError(f"database error: {e}") from e
    finally:
        cursor.close()
    return [(*row[:7], _instant(row[7]), _instant(row[8])) for row in rows]


def _instant(stored: str) -> datetime:
    """What ``UTCDateTime`` reads back on SQLite: the stored naive UTC, made aware."""
    return datetime.fromisoformat(stored).replace(tzinfo=UTC)


def mark_delivered(
    conn: Connection,
    deliveries: Mapping[int, tuple[str | None, dict[str, Any]]],
    *,
    owner: str,
    now: datetime,
) -> set[int]:
    """Write ``deliveries`` (id: (reply, event data)) that ``owner`` holds; the ids written.

    Arguments are checked by the caller. A recipient ``owner`` no longer
    holds (its lease ran out and another worker took it) is left alone.
    """
    cursor = cursor_of(conn)
    try:
        return _write(cursor, deliveries, owner, when(now))
    except sqlite3.Error as e:
        raise StoreError(f"database error: {e}") from e
    finally:
        cursor.close()


def _write(
    cursor: sqlite3.Cursor,
    deliveries: Mapping[int, tuple[str | None, dict[str, Any]]],
    owner: str,
    stamp: str,
) -> set[int]:
    ids = list(deliveries)
    held: list[tuple[int, int, str]] = []
    for start in range(0, len(ids), _CHUNK):
        chunk: Sequence[int] = ids[start : start + _CHUNK]
        sql = _HELD.format(ids=", ".join("?" * len(chunk)))
        held.extend(cursor.execute(sql, [*chunk, owner]).fetchall())
    if not held:
        return set()
    with_reply = [
        (stamp, deliveries[rid][0], rid) for rid, _, _ in held if deliveries[rid][0] is not None
    ]
    without = [(stamp, rid) for rid, _, _ in held if deliveries[rid][0] is None]
    if with_reply:
        cursor.executemany(_WITH_REPLY, with_reply)
    if without:
        cursor.executemany(_WITHOUT_REPLY, without)
    cursor.executemany(
        _EVENT,
        [
            (account, message, rid, "delivered", stamp, json.dumps(deliveries[rid][1]))
            for rid, account, message in held
        ],
    )
    return {rid for rid, _, _ in held}
