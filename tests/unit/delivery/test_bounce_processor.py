"""Bounce processing: DSNs and complaints received at a bounce domain, end to end on the store."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from postlane.config import Settings
from postlane.crypto import derive_key
from postlane.delivery import bounce_processor, verp
from postlane.delivery.bounce_processor import BounceProcessor
from postlane.store import Database, create_account, upgrade
from postlane.store import inbound as inbound_store
from postlane.store.intake import NewMessage, NewRecipient, insert_messages
from postlane.store.schema import events, recipients
from postlane.store.suppressions import list_suppressions

MASTER = b"master-secret-for-tests-0123456789"
VERP_KEY = derive_key(MASTER, "postlane/verp/v1")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=2)
BOUNCE_DOMAIN = "bounce.shop.example.com"
_ids = itertools.count(1)

DSN = """\
Return-Path: <>
Date: Sat,  1 Mar 2025 12:00:04 +0000 (UTC)
From: MAILER-DAEMON@mail.example.net (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {verp}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4F1A2B3C.1740830404/mail.example.net"
Message-Id: <20250301120004.5D2E31A0@mail.example.net>

This is a MIME-encapsulated message.

--4F1A2B3C.1740830404/mail.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mail.example.net.

<{address}>: host mx.example.org[192.0.2.25] said: {code} {status}
    <{address}>: {text} (in reply to RCPT TO command)

--4F1A2B3C.1740830404/mail.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mail.example.net
X-Postfix-Queue-ID: 4F1A2B3C
X-Postfix-Sender: rfc822; {verp}
Arrival-Date: Sat,  1 Mar 2025 12:00:01 +0000 (UTC)

Final-Recipient: rfc822; {address}
Original-Recipient: rfc822;{address}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; {code} {status} <{address}>: {text}

--4F1A2B3C.1740830404/mail.example.net
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

From: Shop News <news@shop.example.com>
To: {address}
Subject: March offers
Message-ID: <abc123@shop.example.com>

--4F1A2B3C.1740830404/mail.example.net--
"""

ARF = """\
From: <feedback@mailbox-provider.example>
Date: Sat, 1 Mar 2025 14:40:36 +0000
Subject: FW: March offers
To: <fbl@{bounce_domain}>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
     boundary="part1_13d.2e68ed54_boundary"

--part1_13d.2e68ed54_boundary
Content-Type: text/plain; charset="US-ASCII"

This is an email abuse report.

--part1_13d.2e68ed54_boundary
Content-Type: message/feedback-report

Feedback-Type: {feedback_type}
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <{verp}>
Original-Rcpt-To: <{address}>
Arrival-Date: Sat, 1 Mar 2025 12:00:01 +0000
Source-IP: 203.0.113.5

--part1_13d.2e68ed54_boundary
Content-Type: message/rfc822
Content-Disposition: inline

Return-Path: <{verp}>
From: Shop News <news@shop.example.com>
To: <{address}>
Subject: March offers
Message-ID: <abc126@shop.example.com>

Our March offers.

--part1_13d.2e68ed54_boundary--
"""

USER_UNKNOWN = {"code": "550", "status": "5.1.1", "text": "User unknown", "action": "failed"}
MAILBOX_FULL_LATER = {"code": "452", "status": "4.2.2", "text": "Mailbox full", "action": "delayed"}


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database.from_url(database_url)
    upgrade(database)
    try:
        yield database
    finally:
        database.dispose()


@dataclass
class Clock:
    """The processor's clock, moved on by the tests that wait for a retry."""

    now: datetime = NOW

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    db: Database
    account_id: int
    other_account_id: int
    processor: BounceProcessor
    clock: Clock

    def send(self, address: str = "nobody@example.org", *, account_id: int | None = None) -> int:
        """A recipient row for ``address``, delivered; its id."""
        queue_id = f"OUT{next(_ids)}"
        message = NewMessage(
            id=queue_id,
            account_id=self.account_id if account_id is None else account_id,
            smtp_user_id=None,
            mail_from="news@shop.example.com",
            header_from="news@shop.example.com",
            message_id_header=f"<{queue_id}@shop.example.com>",
            subject="March offers",
            raw=b"From: news@shop.example.com\r\n\r\nOur March offers.\r\n",
            options={},
            client_ip="192.0.2.10",
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
        with self.db.begin() as conn:
            insert_messages(conn, [message])
            conn.execute(
                sa.update(recipients)
                .where(recipients.c.message_id == queue_id)
                .values(status="delivered", attempts=1)
            )
            return int(
                conn.execute(
                    sa.select(recipients.c.id).where(recipients.c.message_id == queue_id)
                ).scalar_one()
            )

    def receive(self, raw: bytes, *rcpt_to: str, account_id: int | None = None) -> str:
        """Mail received at the bounce domain, stored as intake stores it; its queue id."""
        queue_id = f"IN{next(_ids)}"
        message = NewMessage(
            id=queue_id,
            account_id=self.account_id if account_id is None else account_id,
            smtp_user_id=None,
            mail_from="",
            header_from="MAILER-DAEMON@mail.example.net",
            message_id_header=None,
            subject="Undelivered Mail Returned to Sender",
            raw=raw,
            options={},
            client_ip="198.51.100.10",
            tls=None,
            received_at=T0 + timedelta(hours=1),
            dedupe_key=None,
            recipients=(),
            event_data={"session": "s-1", "recipients": list(rcpt_to), "size": len(raw)},
            event_type="inbound",
        )
        with self.db.begin() as conn:
            insert_messages(conn, [message])
        return queue_id

    def status(self, recipient_id: int) -> str:
        with self.db.connect() as conn:
            query = sa.select(recipients.c.status).where(recipients.c.id == recipient_id)
            return str(conn.execute(query).scalar_one())

    def events(self, **where: Any) -> list[dict[str, Any]]:
        with self.db.connect() as conn:
            query = sa.select(events).order_by(events.c.id)
            for column, value in where.items():
                query = query.where(events.c[column] == value)
            return [dict(row._mapping) for row in conn.execute(query)]

    def processed(self, queue_id: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events(message_id=queue_id, type="inbound_processed")]

    def suppressed(self, account_id: int | None = None) -> dict[str, str]:
        with self.db.connect() as conn:
            found = list_suppressions(conn, self.account_id if account_id is None else account_id)
        return {s.address: s.reason for s in found}


@pytest.fixture
def world(db: Database, tmp_path: Path) -> World:
    with db.begin() as conn:
        account = create_account(conn, "shop")
        other = create_account(conn, "other")
    settings = Settings(hostname="out.shop.example", data_dir=tmp_path)
    clock = Clock()
    processor = BounceProcessor(settings, db, MASTER, clock=clock)
    return World(db, account.id, other.id, processor, clock)


def address_for(recipient_id: int) -> str:
    return verp.encode(recipient_id, key=VERP_KEY, domain=BOUNCE_DOMAIN)


def dsn(recipient_id: int, address: str = "nobody@example.org", **fields: str) -> bytes:
    values = {**USER_UNKNOWN, **fields}
    return crlf(DSN.format(verp=address_for(recipient_id), address=address, **values))


def test_a_hard_bounce_bounces_and_suppresses_the_recipient(world: World) -> None:
    recipient_id = world.send("nobody@example.org")
    inbound = world.receive(dsn(recipient_id), address_for(recipient_id))

    assert world.processor.run_once() == 1

    assert world.status(recipient_id) == "bounced"
    (bounced,) = world.events(type="bounced")
    assert bounced["recipient_id"] == recipient_id
    assert bounced["account_id"] == world.account_id
    assert bounced["message_id"] != inbound
    assert bounced["created_at"] == NOW
    data = bounced["data"]
    assert data["status"] == "5.1.1"
    assert data["diagnostic"] == "550 5.1.1 <nobody@example.org>: User unknown"
    assert data["remote_mta"] == "mx.example.org"
    assert data["classification"] == "hard"
    assert data["inbound_message_id"] == inbound
    assert world.suppressed() == {"nobody@example.org": "hard_bounce"}
    assert world.processed(inbound) == [
        {"matched": True, "kind": "dsn", "recipients": {str(recipient_id): "bounced"}}
    ]


@pytest.mark.parametrize(
    ("code", "status", "text", "kind"),
    [
        ("552", "5.2.2", "Mailbox full", "soft"),
        ("550", "5.7.1", "Message refused by local policy", "policy"),
        ("550", "5.7.1", "Unknown user", "policy"),  # the policy code outranks the text
        ("554", "5.6.0", "Message content rejected as spam", "content"),
    ],
)
def test_a_bounce_that_is_not_hard_lists_the_address_as_returned(
    world: World, code: str, status: str, text: str, kind: str
) -> None:
    recipient_id = world.send("back@example.org")
    raw = dsn(recipient_id, "back@example.org", code=code, status=status, text=text)
    world.receive(raw, address_for(recipient_id))

    assert world.processor.run_once() == 1

    assert world.status(recipient_id) == "bounced"
    assert world.events(type="bounced")[0]["data"]["classification"] == kind
    # not suppressed: only mail asking for X-ListOption 512 avoids the address
    assert world.suppressed() == {"back@example.org": "returned"}
    with world.db.connect() as conn:
        (entry,) = list_suppressions(conn, world.account_id)
    assert entry.detail == f"{code} {status} <back@example.org>: {text}"


@pytest.mark.parametrize(
    ("status", "kind", "listed"),
    [("5.7.1", "policy", "returned"), ("5.1.1", "hard", "hard_bounce")],
)
def test_a_generic_status_is_classified_by_the_code_in_the_quoted_reply(
    world: World, status: str, kind: str, listed: str
) -> None:
    """``Status: 5.0.0`` says less than the remote reply it quotes: the reply's code decides."""
    recipient_id = world.send("who@example.org")
    raw = dsn(recipient_id, "who@example.org", status=status, text="Unknown user")
    raw = raw.replace(f"Status: {status}\r\n".encode(), b"Status: 5.0.0\r\n")
    assert b"Status: 5.0.0\r\n" in raw
    world.receive(raw, address_for(recipient_id))

    assert world.processor.run_once() == 1

    assert world.events(type="bounced")[0]["data"]["classification"] == kind
    assert world.suppressed() == {"who@example.org": listed}


def test_a_hard_bounce_after_a_returned_entry_suppresses(world: World) -> None:
    first = world.send("gone@example.org")
    world.receive(
        dsn(first, "gone@example.org", code="550", status="5.7.1", text="Refused by policy"),
        address_for(first),
    )
    second = world.send("gone@example.org")
    world.receive(dsn(second, "gone@example.org"), address_for(second))

    assert world.processor.run_once() == 2

    assert world.suppressed() == {"gone@example.org": "hard_bounce"}


def test_a_delayed_report_records_a_delay_and_changes_nothing(world: World) -> None:
    recipient_id = world.send("slow@example.org")
    raw = dsn(recipient_id, "slow@example.org", **MAILBOX_FULL_LATER)
    inbound = world.receive(raw, address_for(recipient_id))

    assert world.processor.run_once() == 1

    assert world.status(recipient_id) == "delivered"
    (delayed,) = world.events(type="delayed")
    assert delayed["recipient_id"] == recipient_id
    assert delayed["data"]["status"] == "4.2.2"
    assert world.events(type="bounced") == []
    assert world.suppressed() == {}
    assert world.processed(inbound)[0]["recipients"] == {str(recipient_id): "delayed"}


def test_a_complaint_suppresses_and_keeps_the_status(world: World) -> None:
    recipient_id = world.send("user@mailbox-provider.example")
    raw = crlf(
        ARF.format(
            verp=address_for(recipient_id),
            address="user@mailbox-provider.example",
            bounce_domain=BOUNCE_DOMAIN,
            feedback_type="abuse",
        )
    )
    # Feedback loops mail a fixed address: the VERP address is in the report only.
    inbound = world.receive(raw, f"fbl@{BOUNCE_DOMAIN}")

    assert world.processor.run_once() == 1

    assert world.status(recipient_id) == "delivered"
    (complained,) = world.events(type="complained")
    assert complained["recipient_id"] == recipient_id
    assert complained["data"]["feedback_type"] == "abuse"
    assert complained["data"]["source_ip"] == "203.0.113.5"
    assert world.suppressed() == {"user@mailbox-provider.example": "complaint"}
    assert world.processed(inbound) == [
        {"matched": True, "kind": "arf", "recipients": {str(recipient_id): "complained"}}
    ]


def test_feedback_that_is_not_a_complaint_changes_nothing(world: World) -> None:
    recipient_id = world.send("user@mailbox-provider.example")
    raw = ARF.format(
        verp=address_for(recipient_id),
        address="user@mailbox-provider.example",
        bounce_domain=BOUNCE_DOMAIN,
        feedback_type="not-spam",
    )
    world.receive(crlf(raw), f"fbl@{BOUNCE_DOMAIN}")

    assert world.processor.run_once() == 1

    assert world.events(type="complained") == []
    assert world.suppressed() == {}


def test_a_forged_tag_matches_nothing(world: World) -> None:
    recipient_id = world.send()
    genuine = address_for(recipient_id)
    local, _, domain = genuine.partition("@")
    forged = f"{local[:-1]}{'a' if local[-1] != 'a' else 'b'}@{domain}"
    assert verp.decode(forged, key=VERP_KEY) is None
    raw = dsn(recipient_id).replace(genuine.encode(), forged.encode())
    inbound = world.receive(raw, forged)

    assert world.processor.run_once() == 1

    assert world.status(recipient_id) == "delivered"
    assert world.events(type="bounced") == []
    assert world.suppressed() == {}
    (outcome,) = world.processed(inbound)
    assert outcome["matched"] is False
    assert "VERP" in outcome["reason"]


def test_another_accounts_recipient_is_not_touched(world: World) -> None:
    victim = world.send("victim@example.org", account_id=world.other_account_id)
    # A genuine VERP address of the other account, reported to this account's bounce domain.
    inbound = world.receive(dsn(victim, "victim@example.org"), address_for(victim))

    assert world.processor.run_once() == 1

    assert world.status(victim) == "delivered"
    assert world.events(type="bounced") == []
    assert world.suppressed(world.other_account_id) == {}
    assert world.suppressed() == {}
    (outcome,) = world.processed(inbound)
    assert outcome["matched"] is False
    assert "another account" in outcome["reason"]


def test_a_human_reply_to_a_verp_address_is_not_a_bounce(world: World) -> None:
    recipient_id = world.send()
    raw = crlf("From: nobody@example.org\nSubject: Re: March offers\n\nStop mailing me!\n")
    inbound = world.receive(raw, address_for(recipient_id))

    assert world.processor.run_once() == 1

    assert world.status(recipient_id) == "delivered"
    assert world.processed(inbound) == [
        {"matched": False, "reason": "not a delivery report", "recipient_ids": [recipient_id]}
    ]


def test_a_forwarded_bounce_is_matched_by_the_return_path_it_quotes(world: World) -> None:
    recipient_id = world.send()
    world.receive(dsn(recipient_id), f"postmaster@{BOUNCE_DOMAIN}")

    assert world.processor.run_once() == 1

    assert world.status(recipient_id) == "bounced"


def test_processing_twice_does_nothing_the_second_time(world: World) -> None:
    recipient_id = world.send()
    inbound = world.receive(dsn(recipient_id), address_for(recipient_id))

    assert world.processor.run_once() == 1
    assert world.processor.run_once() == 0
    # A second processor (another node, or a restart) finds nothing either.
    fresh = BounceProcessor(
        Settings(hostname="x.example", data_dir=Path(".")), world.db, MASTER, clock=lambda: NOW
    )
    assert fresh.run_once() == 0

    assert len(world.processed(inbound)) == 1
    assert len(world.events(type="bounced")) == 1


def test_a_repeated_report_is_processed_but_bounces_once(world: World) -> None:
    recipient_id = world.send()
    world.receive(dsn(recipient_id), address_for(recipient_id))
    second = world.receive(dsn(recipient_id), address_for(recipient_id))

    assert world.processor.run_once() == 2

    assert len(world.events(type="bounced")) == 1
    assert world.processed(second)[0]["recipients"] == {str(recipient_id): "already bounced"}


def test_run_once_returns_the_number_processed(world: World) -> None:
    first, second = world.send("a@example.org"), world.send("b@example.org")
    world.receive(dsn(first, "a@example.org"), address_for(first))
    world.receive(dsn(second, "b@example.org", **MAILBOX_FULL_LATER), address_for(second))
    world.receive(crlf("Subject: hello\n\nhi\n"), f"info@{BOUNCE_DOMAIN}")

    assert world.processor.run_once() == 3
    assert world.processor.run_once() == 0
    world.receive(dsn(second, "b@example.org"), address_for(second))
    assert world.processor.run_once() == 1
    assert world.status(first) == world.status(second) == "bounced"


def test_the_role_processes_while_running(world: World) -> None:
    recipient_id = world.send()
    world.receive(dsn(recipient_id), address_for(recipient_id))
    processor = BounceProcessor(
        Settings(hostname="x.example", data_dir=Path(".")),
        world.db,
        MASTER,
        clock=lambda: NOW,
        poll_interval=0.01,
    )

    async def scenario() -> None:
        await processor.start()
        for _ in range(500):
            if world.status(recipient_id) == "bounced":
                break
            await asyncio.sleep(0.01)
        await processor.stop()

    asyncio.run(scenario())
    assert processor.name == "bounces"
    assert world.status(recipient_id) == "bounced"


def test_a_failing_message_does_not_hold_up_the_others_and_is_retried(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = world.send("a@example.org"), world.send("b@example.org")
    failing = world.receive(dsn(first, "a@example.org"), address_for(first))
    world.receive(dsn(second, "b@example.org"), address_for(second))
    real = inbound_store.record_bounce

    def broken(conn: Any, recipient_id: int, **kwargs: Any) -> bool:
        if recipient_id == first:
            raise RuntimeError("database hiccup")
        return real(conn, recipient_id, **kwargs)

    monkeypatch.setattr(inbound_store, "record_bounce", broken)
    assert world.processor.run_once() == 1
    assert world.processed(failing) == []  # rolled back: no half-done message
    assert world.status(first) == "delivered"

    (failure,) = world.events(message_id=failing, type="inbound_failed")
    assert failure["data"] == {"attempt": 1, "error": "RuntimeError: database hiccup"}

    monkeypatch.setattr(inbound_store, "record_bounce", real)
    assert world.processor.run_once() == 0  # the retry waits
    world.clock.now += bounce_processor.RETRY_DELAY
    assert world.processor.run_once() == 1
    assert world.status(first) == world.status(second) == "bounced"
    assert world.processed(failing)[0]["recipients"] == {str(first): "bounced"}


def fail_for(
    monkeypatch: pytest.MonkeyPatch, recipient_id: int, error: str = "database hiccup"
) -> None:
    """Make applying a bounce to ``recipient_id`` fail, as a database refusal would."""
    real = inbound_store.record_bounce

    def broken(conn: Any, rid: int, **kwargs: Any) -> bool:
        if rid == recipient_id:
            raise RuntimeError(error)
        return real(conn, rid, **kwargs)

    monkeypatch.setattr(inbound_store, "record_bounce", broken)


def test_more_failing_messages_than_a_batch_do_not_stop_a_later_bounce(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    attacker = world.send("attacker@example.org")
    for _ in range(bounce_processor.BATCH + 1):
        world.receive(dsn(attacker, "attacker@example.org"), address_for(attacker))
    genuine = world.send("gone@example.org")
    world.receive(dsn(genuine, "gone@example.org"), address_for(genuine))
    fail_for(monkeypatch, attacker)

    assert world.processor.run_once() == 1
    assert world.status(genuine) == "bounced"
    assert len(world.events(type="inbound_failed")) == bounce_processor.BATCH + 1

    # While the failed ones wait for their retry, later reports still get through.
    later = world.send("later@example.org")
    world.receive(dsn(later, "later@example.org"), address_for(later))
    assert world.processor.run_once() == 1
    assert world.status(later) == "bounced"
    assert world.status(attacker) == "delivered"
    assert len(world.events(type="inbound_failed")) == bounce_processor.BATCH + 1


def test_a_message_that_keeps_failing_is_given_up_after_max_attempts(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    recipient_id = world.send()
    failing = world.receive(dsn(recipient_id), address_for(recipient_id))
    fail_for(monkeypatch, recipient_id, "refused\x00\nSQL: secret parameters")
    caplog.set_level(logging.INFO, logger="postlane.bounces")

    for attempt in range(1, bounce_processor.MAX_ATTEMPTS):
        assert world.processor.run_once() == 0
        assert len(world.events(message_id=failing, type="inbound_failed")) == attempt
        assert world.processed(failing) == []
        wait = bounce_processor.RETRY_DELAY * 2 ** (attempt - 1)
        world.clock.now += wait - timedelta(seconds=1)
        assert world.processor.run_once() == 0  # not due yet: not tried
        assert len(world.events(message_id=failing, type="inbound_failed")) == attempt
        world.clock.now += timedelta(seconds=1)

    assert world.processor.run_once() == 1  # the last attempt fails and gives up
    error = "RuntimeError: refused"
    assert world.processed(failing) == [
        {
            "matched": False,
            "reason": "processing failed",
            "error": error,
            "attempts": bounce_processor.MAX_ATTEMPTS,
        }
    ]
    failures = world.events(message_id=failing, type="inbound_failed")
    assert [f["data"] for f in failures] == [
        {"attempt": n, "error": error} for n in range(1, bounce_processor.MAX_ATTEMPTS + 1)
    ]
    assert world.status(recipient_id) == "delivered"
    world.clock.now += timedelta(days=1)
    assert world.processor.run_once() == 0  # off the work list for good
    failed_lines = [r.getMessage() for r in caplog.records if "processing failed" in r.getMessage()]
    assert len(failed_lines) == bounce_processor.MAX_ATTEMPTS
    assert all(failing in line and error in line for line in failed_lines)
    assert any("given up" in r.getMessage() for r in caplog.records)


def test_a_nul_in_the_diagnostic_does_not_stop_the_bounce(world: World) -> None:
    """PostgreSQL text cannot hold NUL: it is stripped on the way, not refused at commit."""
    recipient_id = world.send("who@example.org")
    raw = dsn(recipient_id, "who@example.org", status="5.7.1", text="Refused\x00by policy")
    assert b"\x00" in raw
    inbound = world.receive(raw, address_for(recipient_id))

    assert world.processor.run_once() == 1

    assert world.status(recipient_id) == "bounced"
    diagnostic = "550 5.7.1 <who@example.org>: Refused by policy"
    assert world.events(type="bounced")[0]["data"]["diagnostic"] == diagnostic
    with world.db.connect() as conn:
        query = sa.select(recipients.c.last_reply).where(recipients.c.id == recipient_id)
        assert conn.execute(query).scalar_one() == f"5.7.1 {diagnostic}"
        (entry,) = list_suppressions(conn, world.account_id)
    assert (entry.reason, entry.detail) == ("returned", diagnostic)
    assert world.processed(inbound)[0]["recipients"] == {str(recipient_id): "bounced"}


def test_a_nul_in_a_complaint_does_not_stop_it(world: World) -> None:
    recipient_id = world.send("user@mailbox-provider.example")
    raw = crlf(
        ARF.format(
            verp=address_for(recipient_id),
            address="user@mailbox-provider.example",
            bounce_domain=BOUNCE_DOMAIN,
            feedback_type="abuse\x00",
        ).replace("SomeGenerator/1.0", "Some\x00Generator/1.0")
    )
    world.receive(raw, f"fbl@{BOUNCE_DOMAIN}")

    assert world.processor.run_once() == 1

    (complained,) = world.events(type="complained")
    assert complained["data"]["user_agent"] == "Some Generator/1.0"
    with world.db.connect() as conn:
        (entry,) = list_suppressions(conn, world.account_id)
    assert (entry.reason, entry.detail) == ("complaint", "Some Generator/1.0")


def test_events_behind_the_cursor_are_found_by_the_lookback_or_the_rescan(world: World) -> None:
    clock = [0.0]
    processor = BounceProcessor(
        Settings(hostname="x.example", data_dir=Path(".")),
        world.db,
        MASTER,
        clock=lambda: NOW,
        monotonic=lambda: clock[0],
    )
    assert processor.run_once() == 0
    recipient_id = world.send()
    world.receive(dsn(recipient_id), address_for(recipient_id))
    # As if later event ids had been read before this one became visible.
    processor._cursor = world.events()[-1]["id"] + bounce_processor.LOOKBACK_IDS - 1
    assert processor.run_once() == 1  # within the lookback

    other = world.send("b@example.org")
    world.receive(dsn(other, "b@example.org"), address_for(other))
    processor._cursor = world.events()[-1]["id"] + bounce_processor.LOOKBACK_IDS + 1
    assert processor.run_once() == 0  # beyond it: missed for now
    clock[0] += bounce_processor.RESCAN_SECONDS
    assert processor.run_once() == 1  # the periodic re-read finds it
    assert world.status(other) == "bounced"


def test_the_verp_key_is_derived_as_the_delivery_worker_derives_it() -> None:
    from postlane.delivery import worker

    assert bounce_processor.VERP_KEY_PURPOSE == worker.VERP_KEY_PURPOSE
