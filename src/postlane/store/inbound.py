"""Mail received at a bounce domain, and what bounce processing writes about it.

Intake stores each message sent to a return-path domain as a ``messages`` row
with no recipients and an ``inbound`` event (data ``{"recipients": [...]}``,
the RCPT addresses). Bounce processing marks a message done with an
``inbound_processed`` event, written in the same transaction as its effects
(``bounced``, ``delayed`` and ``complained`` events, status changes,
suppressions), so a crash either leaves everything undone or everything done.
No extra table or column: the event log *is* the work list.

Finding the work without a full scan
------------------------------------
"Inbound events with no later ``inbound_processed``" is read from the
partial index ``ix_events_inbound ON events (id) WHERE type = 'inbound'``
(migration 0003) from a cursor the caller keeps (``events.id >
after_event_id``), with the ``NOT EXISTS`` answered by ``ix_events_message
(message_id, id)``::

    SELECT e.id, e.message_id, e.account_id, e.data, m.mail_from, m.raw
    FROM events AS e LEFT JOIN messages AS m ON m.id = e.message_id
    WHERE e.id > :after AND e.type = 'inbound'
      AND NOT EXISTS (SELECT 1 FROM events AS p
                      WHERE p.message_id = e.message_id AND p.id > e.id
                        AND p.type = 'inbound_processed')
    ORDER BY e.id LIMIT :limit

So the work costs what there is of inbound mail, not the size of the event
log; callers still advance the cursor (see
:class:`~postlane.delivery.bounce_processor.BounceProcessor`) past what is done.

Failed attempts
---------------
A message whose processing transaction fails would otherwise stay on the
work list for ever, ahead of everything after it. Each failure therefore
leaves an ``inbound_failed`` event (data ``{"attempt": n, "error": ...}``),
written in a transaction of its own after the failed one rolled back, and
:func:`pending_inbound` reports how many there are and when the last was, so
the processor can wait before retrying. The attempt that reaches the limit
also writes the ``inbound_processed`` event, with the error as its outcome:
the message leaves the work list and the log says why nothing was applied.
Events again, counted through ``ix_events_message``: no migration needed.

Text written here can come from a stranger's mail; PostgreSQL ``text``
cannot hold NUL, so what goes into a text column or an error message is
stripped of control characters and bounded here as well, whatever the caller
already did.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.errors import InvalidInput
from postlane.store import _values
from postlane.store.schema import events, messages, recipients

__all__ = [
    "BounceRecipient",
    "InboundMessage",
    "claim_inbound",
    "mark_inbound_processed",
    "pending_inbound",
    "printable",
    "recipients_by_id",
    "record_bounce",
    "record_event",
    "record_inbound_failure",
]

INBOUND: Final = "inbound"
PROCESSED: Final = "inbound_processed"
FAILED: Final = "inbound_failed"
#: Bound parameters per ``IN (...)`` list; SQLite allows 32,766 per statement.
_CHUNK: Final = 500
#: Longest ``last_reply`` and error text kept: enough for a multi-line SMTP reply.
MAX_TEXT: Final = 2000
#: C0 controls but TAB, and DEL: NUL breaks PostgreSQL text, the rest breaks log lines.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One unprocessed message received at a bounce domain.

    ``raw`` is None when retention already purged the message (its event
    outlives it); ``rcpt_to`` are the envelope recipients the SMTP server
    accepted, the most trustworthy place a VERP address can be.
    ``failures`` counts the attempts that failed so far (``inbound_failed``
    events), ``last_failure_at`` is when the latest did, so a retry can wait.
    """

    event_id: int
    message_id: str
    account_id: int
    rcpt_to: tuple[str, ...]
    mail_from: str | None
    raw: bytes | None
    failures: int = 0
    last_failure_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class BounceRecipient:
    """What bounce processing needs of the recipient row a VERP address names."""

    id: int
    message_id: str
    account_id: int
    address: str
    status: str


def pending_inbound(
    conn: Connection, *, after_event_id: int = 0, limit: int
) -> list[InboundMessage]:
    """Inbound messages whose ``inbound`` event (id > ``after_event_id``) is not processed.

    Oldest first, at most ``limit``; messages that failed before are listed
    too (in id order, so the cursor can follow), with their failure count.
    Reading this is not claiming: another processor may take the same rows,
    so write through :func:`claim_inbound`.
    """
    after_event_id = _values.integer("after_event_id", after_event_id)
    if _values.integer("limit", limit) < 1:
        raise InvalidInput(f"limit must be positive, got {limit}")
    e = events.alias("e")
    p = events.alias("p")
    f = events.alias("f")
    processed = (
        sa.select(sa.literal(1))
        .select_from(p)
        .where(p.c.message_id == e.c.message_id, p.c.id > e.c.id, p.c.type == PROCESSED)
    )
    failed = f.c.message_id == e.c.message_id, f.c.id > e.c.id, f.c.type == FAILED
    query = (
        sa.select(
            e.c.id,
            e.c.message_id,
            e.c.account_id,
            e.c.data,
            messages.c.mail_from,
            messages.c.raw,
            sa.select(sa.func.count())
            .select_from(f)
            .where(*failed)
            .scalar_subquery()
            .label("failures"),
            sa.select(sa.func.max(f.c.created_at))
            .where(*failed)
            .scalar_subquery()
            .label("last_failure_at"),
        )
        .select_from(e.outerjoin(messages, messages.c.id == e.c.message_id))
        .where(e.c.id > after_event_id, e.c.type == INBOUND, ~sa.exists(processed))
        .order_by(e.c.id)
        .limit(limit)
    )
    return [
        InboundMessage(
            event_id=row.id,
            message_id=row.message_id,
            account_id=row.account_id,
            rcpt_to=_addresses(row.data),
            mail_from=row.mail_from,
            raw=None if row.raw is None else bytes(row.raw),
            failures=int(row.failures or 0),
            last_failure_at=row.last_failure_at,
        )
        for row in conn.execute(query)
        if row.message_id is not None
    ]


def claim_inbound(conn: Connection, message: InboundMessage) -> bool:
    """True if ``message`` is still unprocessed; call first in the processing transaction.

    On PostgreSQL the ``inbound`` event row is locked first (``FOR UPDATE``),
    so a second processor on another node waits here and then sees the first
    one's ``inbound_processed`` and gets False. On SQLite the caller's
    ``BEGIN IMMEDIATE`` already makes this transaction the only writer.
    """
    lock = sa.select(events.c.id).where(events.c.id == message.event_id)
    if conn.dialect.name == "postgresql":
        lock = lock.with_for_update()
    if conn.execute(lock).first() is None:
        return False
    done = sa.select(events.c.id).where(
        events.c.message_id == message.message_id,
        events.c.id > message.event_id,
        events.c.type == PROCESSED,
    )
    return conn.execute(done.limit(1)).first() is None


def mark_inbound_processed(
    conn: Connection, message: InboundMessage, *, now: datetime, data: Mapping[str, Any]
) -> None:
    """Write the one ``inbound_processed`` event that takes ``message`` off the work list."""
    record_event(
        conn,
        account_id=message.account_id,
        message_id=message.message_id,
        recipient_id=None,
        event_type=PROCESSED,
        now=now,
        data=data,
    )


def record_inbound_failure(
    conn: Connection,
    message: InboundMessage,
    *,
    now: datetime,
    error: str,
    max_attempts: int,
) -> bool:
    """Count a failed attempt at ``message``; True if that was the last one allowed.

    Call in a new transaction after :func:`claim_inbound` (the failed one has
    rolled back). The count is read here, under the claim's lock, not taken
    from ``message``, so two processors failing at once still count two. The
    last attempt also marks the message processed, ``{"matched": false,
    "reason": "processing failed", "error": ..., "attempts": n}``, so it can
    never hold up the work list again.
    """
    if _values.integer("max_attempts", max_attempts) < 1:
        raise InvalidInput(f"max_attempts must be positive, got {max_attempts}")
    text = printable(_values.text("error", error)) or "unknown error"
    count = sa.select(sa.func.count()).where(
        events.c.message_id == message.message_id,
        events.c.id > message.event_id,
        events.c.type == FAILED,
    )
    attempt = int(conn.execute(count).scalar_one()) + 1
    record_event(
        conn,
        account_id=message.account_id,
        message_id=message.message_id,
        now=now,
        recipient_id=None,
        event_type=FAILED,
        data={"attempt": attempt, "error": text},
    )
    if attempt < max_attempts:
        return False
    outcome = {"matched": False, "reason": "processing failed", "error": text, "attempts": attempt}
    mark_inbound_processed(conn, message, now=now, data=outcome)
    return True


def recipients_by_id(conn: Connection, ids: Iterable[int]) -> dict[int, BounceRecipient]:
    """The recipient rows with these ids that still exist, by id (of any account)."""
    wanted = sorted({_values.integer("recipient id", i) for i in ids})
    r = recipients.c
    found: dict[int, BounceRecipient] = {}
    for start in range(0, len(wanted), _CHUNK):
        query = sa.select(r.id, r.message_id, r.account_id, r.address, r.status).where(
            r.id.in_(wanted[start : start + _CHUNK])
        )
        for row in conn.execute(query):
            found[row.id] = BounceRecipient(**row._mapping)
    return found


def record_bounce(
    conn: Connection,
    recipient_id: int,
    *,
    now: datetime,
    status_code: str | None,
    data: Mapping[str, Any],
) -> bool:
    """A report says the message to this recipient bounced: status ``bounced``, with event.

    Whatever the row's status (a remote server that said ``250`` may bounce
    later, so ``delivered`` is overridden too; a row being sent loses its lease,
    and its worker's fenced report then changes nothing), except ``bounced``
    already: a repeated report returns False and writes nothing. ``last_reply``
    becomes the status code and diagnostic. False if there is no such row.
    """
    recipient_id = _values.integer("recipient id", recipient_id)
    _aware(now)
    event_data = _values.json_object("event data", data)
    diagnostic = event_data.get("diagnostic")
    reply = printable(" ".join(str(part) for part in (status_code, diagnostic) if part)) or None
    r = recipients.c
    statement = (
        sa.update(recipients)
        .where(r.id == recipient_id, r.status != "bounced")
        .values(
            status="bounced",
            last_reply=reply,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .returning(r.account_id, r.message_id)
    )
    row = conn.execute(statement).one_or_none()
    if row is None:
        return False
    record_event(
        conn,
        account_id=row.account_id,
        message_id=row.message_id,
        recipient_id=recipient_id,
        event_type="bounced",
        now=now,
        data=event_data,
    )
    return True


def record_event(
    conn: Connection,
    *,
    account_id: int,
    message_id: str | None,
    recipient_id: int | None,
    event_type: str,
    now: datetime,
    data: Mapping[str, Any],
) -> None:
    """Append one event (``delayed``, ``complained``, ...) to the log."""
    _aware(now)
    conn.execute(
        events.insert().values(
            account_id=_values.integer("account_id", account_id),
            message_id=message_id,
            recipient_id=recipient_id,
            type=_values.name("event type", event_type),
            created_at=now,
            data=_values.json_object("event data", data),
        )
    )


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` fit for a text column and a log line: controls as spaces, at most ``limit``.

    Spaces rather than nothing, so words a control character separated stay
    apart; TAB is kept, it is harmless. Bounding keeps one hostile report
    from storing megabytes per recipient row.
    """
    return _CONTROL.sub(" ", text).strip()[:limit]


def _addresses(data: Any) -> tuple[str, ...]:
    """The RCPT addresses of an ``inbound`` event's data; () if it is not as expected."""
    found = data.get("recipients") if isinstance(data, dict) else None
    if not isinstance(found, list):
        return ()
    return tuple(a for a in found if isinstance(a, str))


def _aware(now: datetime) -> None:
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise InvalidInput(f"now must be an aware UTC datetime, got {now!r}")
