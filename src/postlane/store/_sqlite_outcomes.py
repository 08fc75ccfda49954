"""Delivered recipients written on SQLite on the driver's cursor, as intake's commits are.

Measured on the 2-core benchmark machine (500 delivered recipients leased by
one owner, one transaction, CPU of the writing thread, the rows and message
sizes of a bench/relay run): through SQLAlchemy's execution path 33 us per
recipient, the same statements on the sqlite3 cursor 12 us. The delivery
role writes such a batch for every few hundred copies it sends, holding
SQLite's one write lock meanwhile, which intake's commits wait for.

The statements are the ones :func:`postlane.store.queue.mark_delivered_many`
makes through SQLAlchemy, with values converted exactly as the column types
convert them (see :mod:`postlane.store._sqlite_intake`); the tests run both
paths on the same rows and compare what they wrote. PostgreSQL keeps
SQLAlchemy's path, with its ``FOR UPDATE``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from postlane.errors import StoreError
from postlane.store._sqlite_intake import cursor_of, when
from postlane.store.schema import events, recipients

__all__ = ["mark_delivered"]

_CHUNK = 500  # ids per SELECT, as queue's

_HELD = (
    f"SELECT id, account_id, message_id FROM {recipients.name} "  # noqa: S608 - schema names
    "WHERE id IN ({ids}) AND lease_owner = ? AND status = 'sending'"
)
_DELIVERED = (
    f"UPDATE {recipients.name} SET status = 'delivered', attempts = attempts + 1, "  # noqa: S608
    "lease_owner = NULL, lease_expires_at = NULL, updated_at = ?{reply} WHERE id = ?"
)
_WITH_REPLY = _DELIVERED.format(reply=", last_reply = ?")
_WITHOUT_REPLY = _DELIVERED.format(reply="")
_EVENT = (
    f"INSERT INTO {events.name} "  # noqa: S608 - schema names
    "(account_id, message_id, recipient_id, type, created_at, data) VALUES (?, ?, ?, ?, ?, ?)"
)


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
