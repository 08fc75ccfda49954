"""Archived copies: the bytes that left for a recipient, kept when the message asked.

X-JobOption 128 (OMICard's "backup a copy of EML") asks to keep what was
sent. What a recipient got is not the stored message: it is that
recipient's rendering (template, variables, To view, attachment policy)
with its DKIM signature, so the worker archives the composed copy itself.

One copy per recipient row: the first rendering that was going to be sent
(or, in test mode, shown as sent). A deferral renders the copy again for the
next attempt; only its DKIM timestamp differs, so keeping every attempt
would multiply the storage for nothing. The row is written before the copy
leaves, in the same grouped transaction as other delivery records; a worker
that dies after writing it and before sending leaves an archive for a
recipient that is sent later, which is still what that recipient gets.

No foreign keys (see migration 0003): an archive outlives the message's
retention, as the event log does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.errors import InvalidInput
from postlane.store import _values
from postlane.store.schema import archived_copies

__all__ = ["ArchivedCopy", "archive_copy", "archived_copies_of"]


@dataclass(frozen=True, slots=True)
class ArchivedCopy:
    id: int
    account_id: int
    message_id: str
    recipient_id: int
    address: str
    created_at: datetime
    data: bytes = field(repr=False)


def archive_copy(
    conn: Connection,
    *,
    account_id: int,
    message_id: str,
    recipient_id: int,
    address: str,
    data: bytes,
    now: datetime,
) -> bool:
    """Keep ``data`` as ``recipient_id``'s copy unless one is kept already; True if written."""
    _values.integer("recipient id", recipient_id)
    if not isinstance(data, bytes) or not data:
        raise InvalidInput("an archived copy must be non-empty bytes")
    c = archived_copies.c
    exists = conn.execute(
        sa.select(c.id).where(c.message_id == message_id, c.recipient_id == recipient_id).limit(1)
    ).first()
    if exists is not None:
        return False
    conn.execute(
        archived_copies.insert().values(
            account_id=account_id,
            message_id=message_id,
            recipient_id=recipient_id,
            address=address,
            data=data,
            created_at=now,
        )
    )
    return True


def archived_copies_of(
    conn: Connection, message_id: str, *, address: str | None = None
) -> list[ArchivedCopy]:
    """The copies kept for ``message_id`` (one recipient's with ``address``), oldest first."""
    c = archived_copies.c
    query = sa.select(archived_copies).where(c.message_id == message_id)
    if address is not None:
        query = query.where(sa.func.lower(c.address) == address.lower())
    return [
        ArchivedCopy(
            id=row.id,
            account_id=row.account_id,
            message_id=row.message_id,
            recipient_id=row.recipient_id,
            address=row.address,
            created_at=row.created_at,
            data=bytes(row.data),
        )
        for row in conn.execute(query.order_by(c.recipient_id, c.id))
    ]
