"""Inbound mail at bounce domains: the work list, claiming, bounces and events."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from postlane.errors import InvalidInput
from postlane.store import Account, Database, create_account
from postlane.store.inbound import (
    claim_inbound,
    mark_inbound_processed,
    pending_inbound,
    printable,
    recipients_by_id,
    record_bounce,
    record_event,
    record_inbound_failure,
)
from postlane.store.intake import NewMessage, NewRecipient, insert_messages
from postlane.store.schema import events, recipients

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
VERP = "b-1-aaaaaaaaaaaaaaaa@bounce.acme.com"


def outbound(account_id: int, queue_id: str, address: str = "bob@example.org") -> NewMessage:
    return NewMessage(
        id=queue_id,
        account_id=account_id,
        smtp_user_id=None,
        mail_from="news@acme.com",
        header_from="news@acme.com",
        message_id_header=f"<{queue_id}@acme.com>",
        subject="News",
        raw=b"From: news@acme.com\r\n\r\nhello\r\n",
        options={},
        client_ip=None,
        tls=None,
        received_at=T0,
        dedupe_key=None,
        recipients=(
            NewRecipient(
                address=address,
                domain=address.rpartition("@")[2],
                priority=3,
                next_attempt_at=T0,
                expires_at=T0 + timedelta(days=3),
            ),
        ),
    )


def inbound(account_id: int, queue_id: str, raw: bytes = b"Subject: hi\r\n\r\nx\r\n") -> NewMessage:
    return replace(
        outbound(account_id, queue_id),
        mail_from="",
        raw=raw,
        recipients=(),
        event_type="inbound",
        event_data={"recipients": [VERP], "session": "s"},
    )


def write(db: Database, *batch: NewMessage) -> None:
    with db.begin() as conn:
        insert_messages(conn, list(batch))


def recipient_row(db: Database, message_id: str) -> dict[str, Any]:
    with db.connect() as conn:
        query = sa.select(recipients).where(recipients.c.message_id == message_id)
        return dict(conn.execute(query).one()._mapping)


def event_rows(db: Database, message_id: str) -> list[dict[str, Any]]:
    with db.connect() as conn:
        query = sa.select(events).where(events.c.message_id == message_id).order_by(events.c.id)
        return [dict(row._mapping) for row in conn.execute(query)]


def test_pending_lists_unprocessed_inbound_only_oldest_first(
    db: Database, account: Account
) -> None:
    write(db, outbound(account.id, "OUT1"), inbound(account.id, "IN1"), inbound(account.id, "IN2"))
    with db.connect() as conn:
        pending = pending_inbound(conn, limit=10)
    assert [m.message_id for m in pending] == ["IN1", "IN2"]
    first = pending[0]
    assert first.account_id == account.id
    assert first.rcpt_to == (VERP,)
    assert first.raw == b"Subject: hi\r\n\r\nx\r\n"
    assert first.mail_from == ""

    with db.begin() as conn:
        assert claim_inbound(conn, first)
        mark_inbound_processed(conn, first, now=T0, data={"matched": False, "reason": "test"})
    with db.connect() as conn:
        assert [m.message_id for m in pending_inbound(conn, limit=10)] == ["IN2"]
        assert pending_inbound(conn, limit=1, after_event_id=pending[1].event_id) == []
    with db.begin() as conn:
        assert not claim_inbound(conn, first)  # done already: a second processor backs off
    assert event_rows(db, "IN1")[-1]["type"] == "inbound_processed"
    assert event_rows(db, "IN1")[-1]["data"] == {"matched": False, "reason": "test"}


def test_pending_is_bounded_by_the_limit(db: Database, account: Account) -> None:
    write(db, *(inbound(account.id, f"IN{i}") for i in range(5)))
    with db.connect() as conn:
        assert len(pending_inbound(conn, limit=2)) == 2
        with pytest.raises(InvalidInput):
            pending_inbound(conn, limit=0)


def test_a_purged_message_is_still_listed_without_its_bytes(db: Database, account: Account) -> None:
    write(db, inbound(account.id, "IN1"))
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM messages WHERE id = 'IN1'"))
    with db.connect() as conn:
        (pending,) = pending_inbound(conn, limit=10)
    assert pending.raw is None
    assert pending.mail_from is None


def test_pending_query_uses_the_event_indexes_on_sqlite(db: Database, account: Account) -> None:
    if db.dialect_name != "sqlite":
        pytest.skip("the plan checked is SQLite's")
    write(db, inbound(account.id, "IN1"))
    seen: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:
        seen.append((args[2], args[3]))

    with db.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute", capture)
        pending_inbound(conn, after_event_id=0, limit=10)
        sa.event.remove(conn, "before_cursor_execute", capture)
        ((sql, params),) = [(q, p) for q, p in seen if q.lstrip().startswith("SELECT")]
        plan = [str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
    # The outer read is a range of the partial index of inbound events, the
    # NOT EXISTS an index lookup: no scan of the rest of the event log.
    assert any("USING INDEX ix_events_inbound (id>?)" in step for step in plan), plan
    assert any("ix_events_message (message_id=? AND id>?)" in step for step in plan), plan


def test_record_bounce_overrides_delivered_once(db: Database, account: Account) -> None:
    write(db, outbound(account.id, "OUT1"))
    recipient = recipient_row(db, "OUT1")
    with db.begin() as conn:
        conn.execute(
            sa.update(recipients)
            .where(recipients.c.id == recipient["id"])
            .values(status="delivered", lease_owner=None)
        )
    data = {"status": "5.1.1", "diagnostic": "550 5.1.1 user unknown", "classification": "hard"}
    later = T0 + timedelta(hours=1)
    with db.begin() as conn:
        assert record_bounce(conn, recipient["id"], now=later, status_code="5.1.1", data=data)
    row = recipient_row(db, "OUT1")
    assert row["status"] == "bounced"
    assert row["last_reply"] == "5.1.1 550 5.1.1 user unknown"
    assert row["updated_at"] == later
    bounced = event_rows(db, "OUT1")[-1]
    assert bounced["type"] == "bounced"
    assert bounced["recipient_id"] == recipient["id"]
    assert bounced["account_id"] == account.id
    assert bounced["data"] == data
    with db.begin() as conn:  # a repeated report: nothing more
        assert not record_bounce(conn, recipient["id"], now=later, status_code="5.1.1", data=data)
        assert not record_bounce(conn, 999_999, now=later, status_code=None, data={})
    assert [e["type"] for e in event_rows(db, "OUT1")] == ["accepted", "queued", "bounced"]


def test_record_bounce_strips_controls_from_last_reply(db: Database, account: Account) -> None:
    """PostgreSQL text cannot hold NUL; a reply from a stranger's report may carry one."""
    write(db, outbound(account.id, "OUT1"))
    recipient = recipient_row(db, "OUT1")
    data = {"diagnostic": "550 user\x00unknown\r\n" + "x" * 5000}
    with db.begin() as conn:
        assert record_bounce(conn, recipient["id"], now=T0, status_code="5.1.1", data=data)
    reply = recipient_row(db, "OUT1")["last_reply"]
    assert reply.startswith("5.1.1 550 user unknown  xxx")
    assert len(reply) == 2000


def test_printable() -> None:
    assert printable("a\x00b\x1b[31mc\x7f\td\n") == "a b [31mc \td"
    assert printable("xyz" * 10, 4) == "xyzx"


def test_failures_are_counted_and_the_last_allowed_one_gives_up(
    db: Database, account: Account
) -> None:
    write(db, inbound(account.id, "IN1"), inbound(account.id, "IN2"))
    with db.connect() as conn:
        first, second = pending_inbound(conn, limit=10)
    assert (first.failures, first.last_failure_at) == (0, None)
    later = T0 + timedelta(minutes=3)
    for n, now in ((1, T0), (2, later)):
        with db.begin() as conn:
            assert claim_inbound(conn, first)
            assert not record_inbound_failure(
                conn, first, now=now, error=f"boom {n}\x00", max_attempts=3
            )
    with db.connect() as conn:
        listed = pending_inbound(conn, limit=10)
    assert [(m.message_id, m.failures, m.last_failure_at) for m in listed] == [
        ("IN1", 2, later),
        ("IN2", 0, None),
    ]
    with db.begin() as conn:
        assert claim_inbound(conn, first)
        assert record_inbound_failure(conn, first, now=later, error="boom 3", max_attempts=3)
    with db.connect() as conn:
        assert [m.message_id for m in pending_inbound(conn, limit=10)] == ["IN2"]
    with db.begin() as conn:
        assert not claim_inbound(conn, first)
    rows = event_rows(db, "IN1")
    assert [(r["type"], r["data"]) for r in rows[1:]] == [
        ("inbound_failed", {"attempt": 1, "error": "boom 1"}),
        ("inbound_failed", {"attempt": 2, "error": "boom 2"}),
        ("inbound_failed", {"attempt": 3, "error": "boom 3"}),
        (
            "inbound_processed",
            {"matched": False, "reason": "processing failed", "error": "boom 3", "attempts": 3},
        ),
    ]
    with db.begin() as conn, pytest.raises(InvalidInput):
        record_inbound_failure(conn, second, now=T0, error="x", max_attempts=0)


def test_record_bounce_takes_a_leased_row_from_its_worker(db: Database, account: Account) -> None:
    write(db, outbound(account.id, "OUT1"))
    recipient = recipient_row(db, "OUT1")
    with db.begin() as conn:
        conn.execute(
            sa.update(recipients)
            .where(recipients.c.id == recipient["id"])
            .values(status="sending", lease_owner="w1", lease_expires_at=T0 + timedelta(minutes=5))
        )
        assert record_bounce(conn, recipient["id"], now=T0, status_code=None, data={})
    row = recipient_row(db, "OUT1")
    assert (row["status"], row["lease_owner"], row["lease_expires_at"]) == ("bounced", None, None)
    assert row["last_reply"] is None


def test_recipients_by_id_and_record_event(db: Database, account: Account) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
    write(db, outbound(account.id, "OUT1"), outbound(other.id, "OUT2", "eve@example.net"))
    first, second = recipient_row(db, "OUT1")["id"], recipient_row(db, "OUT2")["id"]
    with db.begin() as conn:
        found = recipients_by_id(conn, [second, first, 424242])
        record_event(
            conn,
            account_id=account.id,
            message_id="OUT1",
            recipient_id=first,
            event_type="delayed",
            now=T0,
            data={"status": "4.2.2"},
        )
    assert set(found) == {first, second}
    assert found[second].account_id == other.id
    assert found[second].address == "eve@example.net"
    assert found[first].status == "queued"
    assert event_rows(db, "OUT1")[-1]["type"] == "delayed"
    with db.begin() as conn, pytest.raises(InvalidInput):
        record_event(
            conn,
            account_id=account.id,
            message_id="OUT1",
            recipient_id=None,
            event_type="x",
            now=datetime(2025, 1, 1),  # naive
            data={},
        )
