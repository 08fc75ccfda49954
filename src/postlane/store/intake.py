"""Writing accepted messages: the one statement set behind every ``250 queued``.

A message is stored once (its raw bytes), with one row per envelope recipient
and an ``accepted`` event, all in the transaction the caller holds. Many
messages go into one transaction (group commit), so the inserts here take
batches and use executemany: one round trip per table, not per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.store import _sqlite_intake
from postlane.store.schema import alerts, events, messages, recipients


@dataclass(frozen=True, slots=True)
class NewRecipient:
    address: str
    domain: str
    priority: int
    next_attempt_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class NewMessage:
    """Everything intake decided about one message, ready to be written."""

    id: str
    account_id: int
    smtp_user_id: int | None
    mail_from: str
    header_from: str
    message_id_header: str | None
    subject: str | None
    raw: bytes
    options: dict[str, Any]
    client_ip: str | None
    tls: str | None
    received_at: datetime
    dedupe_key: str | None
    recipients: tuple[NewRecipient, ...]
    event_data: dict[str, Any] = field(default_factory=dict)
    event_type: str = "accepted"  # "inbound" for mail to a bounce domain
    alerts: tuple[str, ...] = ()  # sender-policy violations accepted under "alert"


def _insert_recipients(conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert the recipient rows; one ``queued`` event per row, so each timeline starts there.

    The ids come back with ``RETURNING`` (batched into multi-row statements),
    matched to the rows by message and address: rows of one message with the
    same address carry the same values, so which id goes with which does not
    matter. Measured under bench/ingest, asking for the parameters' order
    instead makes SQLAlchemy run one statement per row on SQLite, and reading
    the ids back with a second query cost more than this.
    """
    inserted = conn.execute(_INSERT_RECIPIENTS, rows)
    ids: dict[tuple[str, str], list[int]] = {}
    for recipient_id, message_id, address in inserted:
        ids.setdefault((message_id, address), []).append(recipient_id)
    events_out: list[dict[str, Any]] = []
    for row in rows:
        data: dict[str, Any] = {"recipient": row["address"], "priority": row["priority"]}
        if row["next_attempt_at"] != row["created_at"]:
            data["scheduled_for"] = row["next_attempt_at"].isoformat()
        events_out.append(
            {
                "account_id": row["account_id"],
                "message_id": row["message_id"],
                "recipient_id": ids[(row["message_id"], row["address"])].pop(),
                "type": "queued",
                "created_at": row["created_at"],
                "data": data,
            }
        )
    return events_out


# Built once: every grouped commit runs these, and building a statement (and
# its cache key) each time cost more than running it (measured with cProfile).
_FIND_DUPLICATES = (
    sa.select(messages.c.dedupe_key, sa.func.min(messages.c.id))
    .where(messages.c.dedupe_key.in_(sa.bindparam("keys", expanding=True)))
    .where(messages.c.received_at >= sa.bindparam("since"))
    .where(messages.c.duplicate_of.is_(None))
    .group_by(messages.c.dedupe_key)
)
# Released at commit or rollback; a hash collision only makes two batches wait.
_LOCK_KEYS = sa.text(
    "SELECT pg_advisory_xact_lock(hashtextextended(k, 0))"
    " FROM unnest(CAST(:keys AS text[])) WITH ORDINALITY AS t(k, n) ORDER BY n"
)
_INSERT_MESSAGES = messages.insert()
_INSERT_RECIPIENTS = recipients.insert().returning(
    recipients.c.id, recipients.c.message_id, recipients.c.address
)
_INSERT_EVENTS = events.insert()


def find_duplicates(conn: Connection, keys: Sequence[str], since: datetime) -> dict[str, str]:
    """Dedupe key -> id of the message first accepted with it since ``since``.

    Call it in the transaction that then inserts the batch. On PostgreSQL it
    first takes a transaction lock on each key: two committers (other nodes,
    or other intake processes) could otherwise both find nothing and both
    queue the same resubmission; the second now waits for the first's commit
    and sees its message. SQLite has one writer at a time already.
    """
    if not keys:
        return {}
    if conn.dialect.name == "sqlite":
        return _sqlite_intake.find_duplicates(conn, keys, since)
    ordered = sorted(set(keys))  # one order for every committer: no deadlock
    conn.execute(_LOCK_KEYS, {"keys": ordered})
    rows = conn.execute(_FIND_DUPLICATES, {"keys": ordered, "since": since})
    return {str(key): str(first) for key, first in rows}


def insert_messages(conn: Connection, batch: Sequence[NewMessage]) -> None:
    """Store messages, their recipients, each message's ``accepted`` event (or its
    ``event_type``) and one ``queued`` event per recipient."""
    if not batch:
        return
    if conn.dialect.name == "sqlite":
        _sqlite_intake.insert(conn, batch)  # the same rows, without SQLAlchemy's overhead
    else:
        _insert_core(conn, batch)
    alert_rows = [
        {
            "account_id": m.account_id,
            "smtp_user_id": m.smtp_user_id,
            "kind": "unauthorised_sender",
            "message": text,
            "message_id": m.id,
            "created_at": m.received_at,
        }
        for m in batch
        for text in m.alerts
    ]
    if alert_rows:
        conn.execute(alerts.insert(), alert_rows)


def _insert_core(conn: Connection, batch: Sequence[NewMessage]) -> None:
    conn.execute(
        _INSERT_MESSAGES,
        [
            {
                "id": m.id,
                "account_id": m.account_id,
                "smtp_user_id": m.smtp_user_id,
                "mail_from": m.mail_from,
                "header_from": m.header_from,
                "message_id_header": m.message_id_header,
                "subject": m.subject,
                "size": len(m.raw),
                "raw": m.raw,
                "options": m.options,
                "client_ip": m.client_ip,
                "tls": m.tls,
                "received_at": m.received_at,
                "dedupe_key": m.dedupe_key,
            }
            for m in batch
        ],
    )
    rows: list[dict[str, Any]] = [
        {
            "message_id": m.id,
            "account_id": m.account_id,
            "address": r.address,
            "domain": r.domain,
            "status": "queued",
            "priority": r.priority,
            "next_attempt_at": r.next_attempt_at,
            "expires_at": r.expires_at,
            "created_at": m.received_at,
            "updated_at": m.received_at,
        }
        for m in batch
        for r in m.recipients
    ]
    event_rows: list[dict[str, Any]] = [
        {
            "account_id": m.account_id,
            "message_id": m.id,
            "recipient_id": None,
            "type": m.event_type,
            "created_at": m.received_at,
            "data": m.event_data,
        }
        for m in batch
    ]
    if rows:
        event_rows += _insert_recipients(conn, rows)
    conn.execute(_INSERT_EVENTS, event_rows)


def record_duplicates(conn: Connection, duplicates: Sequence[tuple[NewMessage, str]]) -> None:
    """A resubmission is not queued again; its arrival is an event on the original."""
    if not duplicates:
        return
    conn.execute(
        events.insert(),
        [
            {
                "account_id": m.account_id,
                "message_id": original,
                "type": "duplicate",
                "created_at": m.received_at,
                "data": {**m.event_data, "resubmitted_as": m.id},
            }
            for m, original in duplicates
        ],
    )
