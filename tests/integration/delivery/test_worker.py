"""The delivery worker end to end: a real database, DNS server and receiving SMTP server.

Each test seeds an account with a sending domain (``shop.example``, DKIM keys
made by the admin code) and messages through the intake store, points the
worker at the test DNS server (``dnsserver.py``) and at a receiving server on
loopback, drives it with ``run_once()`` and checks what the store recorded and
what the receiver got. The receiver is Postlane's own server engine
(``smtp.protocol.Connection``) behind a small asyncio listener that answers
each recipient as the test says and, given credentials, requires AUTH like a
provider's relay; it keeps every byte it read, to show what was (not) sent.
Runs on SQLite and on PostgreSQL.

DNS: ``example.test`` → MX ``mx.test.example`` → 127.0.0.1 (the name the
conftest's test CA certifies, so required TLS can verify it);
``nullmx.test`` has a null MX; ``broken.test`` answers SERVFAIL;
``twomx.test`` has ``mx.test.example`` first and then ``down.test.example``
(127.0.0.2, where nothing listens).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.policy
import functools
import json
import re
import ssl
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, TypeVar

import dkim
import pytest
import sqlalchemy as sa

from dnsserver import DnsServer
from postlane import crypto
from postlane.config import Settings
from postlane.delivery import verp
from postlane.delivery import worker as worker_module
from postlane.delivery.compose import compose
from postlane.delivery.mta_sts import MtaStsCache
from postlane.delivery.outcome_journal import OutcomeJournal
from postlane.delivery.resolver import Resolver
from postlane.delivery.shaping import Shaper, load_rules
from postlane.delivery.signer import Signer
from postlane.delivery.worker import (
    INLINE_COMPOSE_BYTES,
    SIGN_BATCH,
    VERP_KEY_PURPOSE,
    DeliveryWorker,
)
from postlane.errors import StoreError
from postlane.options import SendOptions, from_headers
from postlane.render.dkim import Unsigned
from postlane.smtp import protocol as p
from postlane.store import Database, queue, upgrade
from postlane.store import messages as message_store
from postlane.store import suppressions as suppression_store
from postlane.store import templates as template_store
from postlane.store.domains import SendingDomain
from postlane.store.intake import NewMessage, NewRecipient, insert_messages
from postlane.store.schema import recipients
from postlane.tenants import admin

from .conftest import MX_NAME, Pki

T = TypeVar("T")
MASTER = b"w" * 32
QUEUED = p.Reply(250, "2.0.0", ("Ok: queued",))


# -- the receiving server ------------------------------------------------------------------------


@dataclass
class Delivered:
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    tls: bool


@dataclass
class Receiver:
    """Accepts everything except the recipients in ``replies``, which get that reply."""

    replies: dict[str, p.Reply] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None
    # (username, password): AUTH required before MAIL, and only these pass.
    credentials: tuple[str, str] | None = None
    plaintext_auth: bool = False  # offer AUTH without TLS too
    auth_attempts: list[tuple[str, str, bool]] = field(default_factory=list)
    wire: bytearray = field(default_factory=bytearray)  # everything read, decrypted
    messages: list[Delivered] = field(default_factory=list)
    sessions: int = 0
    closed: int = 0
    resets: int = 0
    server: asyncio.Server | None = None
    greeting_delay: float = 0.0  # seconds before the 220 banner (a slow server)
    refusal: bytes | None = None  # sent instead of the 220 banner, then the connection closed
    on_message: Callable[[Delivered], None] | None = None  # called as each message arrives
    transports: list[asyncio.Transport] = field(default_factory=list)

    async def start(self) -> int:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _ReceiverSession(self), "127.0.0.1", 0
        )
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def drop_all(self) -> None:
        """Close every open session without a word, as a server timing out idle clients."""
        for transport in self.transports:
            transport.abort()


class _ReceiverSession(asyncio.Protocol):
    def __init__(self, owner: Receiver) -> None:
        self.owner = owner
        policy = p.SessionPolicy(
            MX_NAME,
            auth_required=owner.credentials is not None,
            allow_plaintext_auth=owner.plaintext_auth,
            starttls_available=owner.tls is not None,
        )
        self.conn = p.Connection(policy)
        self.transport: asyncio.Transport | None = None
        self.upgrading = False
        self.early = b""
        self.task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner.sessions += 1
        self.owner.transports.append(transport)
        if self.owner.refusal is not None:
            transport.write(self.owner.refusal)
            transport.close()
            return
        if self.owner.greeting_delay:
            asyncio.get_running_loop().call_later(self.owner.greeting_delay, self.flush)
        else:
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.closed += 1

    def data_received(self, data: bytes) -> None:
        self.owner.wire += data
        if self.upgrading:
            self.early += data
            return
        self.owner.resets += data.upper().count(b"RSET\r\n")
        self.conn.receive_data(data)
        self.pump()

    def eof_received(self) -> bool | None:
        self.conn.receive_data(b"")
        self.pump()
        return None

    def pump(self) -> None:
        while not self.upgrading and (event := self.conn.next_event()) is not None:
            if isinstance(event, p.MailFrom):
                self.conn.answer()
            elif isinstance(event, p.Rcpt):
                self.conn.answer(self.owner.replies.get(event.address))
            elif isinstance(event, p.MessageReceived):
                delivered = Delivered(
                    event.mail_from, event.recipients, event.data, self.conn.tls_active
                )
                if self.owner.on_message is not None:
                    self.owner.on_message(delivered)
                self.owner.messages.append(delivered)
                self.conn.answer_message(QUEUED)
            elif isinstance(event, p.AuthAttempt):
                good = (event.username, event.password) == self.owner.credentials
                self.owner.auth_attempts.append((event.mechanism, event.username, good))
                if good:
                    self.conn.auth_succeeded(event.username)
                else:
                    self.conn.auth_failed()
            elif isinstance(event, p.StartTLS):
                self.flush()
                self.upgrading = True
                self.task = asyncio.ensure_future(self.upgrade())
                return
            elif isinstance(event, p.CloseRequested):
                self.flush()
                if self.transport is not None:
                    self.transport.close()
                return
        self.flush()

    async def upgrade(self) -> None:
        assert self.transport is not None and self.owner.tls is not None
        try:
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, self.owner.tls, server_side=True
            )
        except (ssl.SSLError, OSError):
            self.transport.abort()
            return
        assert transport is not None
        self.transport = transport
        self.upgrading = False
        self.conn.tls_started()
        early, self.early = self.early, b""
        if early:
            self.conn.receive_data(early)
        self.pump()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_dns() -> Iterator[DnsServer]:
    records = {
        ("example.test", "MX"): ["10 " + MX_NAME],
        (MX_NAME, "A"): ["127.0.0.1"],
        ("nullmx.test", "MX"): ["0 ."],
        ("twomx.test", "MX"): ["10 " + MX_NAME, "20 down.test.example"],
        ("down.test.example", "A"): ["127.0.0.2"],
    }
    with DnsServer(records, servfail={"broken.test"}) as server:
        yield server


@dataclass
class Env:
    """A migrated database with account ``shop`` and its domain ``shop.example``."""

    db: Database
    domain: SendingDomain
    account_id: int
    dns: DnsServer
    tmp_path: Path

    def settings(self, port: int, **delivery: Any) -> Settings:
        values: dict[str, Any] = {
            "nameservers": [self.dns.nameserver],
            "mx_port": port,
            "allow_internal_mx": True,  # the receivers listen on loopback
            "lease_batch": 100,
            "lease_seconds": 60,
            **delivery,
        }
        return Settings(hostname="out.shop.example", data_dir=self.tmp_path, delivery=values)

    def message(
        self,
        *addresses: str,
        priority: int = 3,
        options: dict[str, Any] | None = None,
        header_from: str = "news@shop.example",
        received_at: datetime | None = None,
        expires_in: timedelta = timedelta(days=3),
        body: str = "Hello there.\r\n",
    ) -> str:
        now = received_at or datetime.now(UTC) - timedelta(seconds=5)
        message_id = uuid.uuid4().hex
        to = ", ".join(addresses)
        raw = (
            f"From: Shop <{header_from}>\r\nTo: {to}\r\nSubject: Hello\r\n"
            f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{message_id}@shop.example>\r\n\r\n{body}"
        ).encode()
        batch = NewMessage(
            id=message_id,
            account_id=self.account_id,
            smtp_user_id=None,
            mail_from=header_from,
            header_from=header_from,
            message_id_header=f"<{message_id}@shop.example>",
            subject="Hello",
            raw=raw,
            options=options or {},
            client_ip="127.0.0.1",
            tls=None,
            received_at=now,
            dedupe_key=None,
            recipients=tuple(
                NewRecipient(
                    address=address,
                    domain=address.rpartition("@")[2],
                    priority=priority,
                    next_attempt_at=now,
                    expires_at=now + expires_in,
                )
                for address in addresses
            ),
        )
        with self.db.begin() as conn:
            insert_messages(conn, [batch])
        return message_id

    def recipients(self, message_id: str) -> dict[str, message_store.RecipientRecord]:
        with self.db.connect() as conn:
            return {r.address: r for r in message_store.recipients_of(conn, message_id)}

    def events(self, message_id: str, kind: str) -> list[message_store.EventRecord]:
        with self.db.connect() as conn:
            return [e for e in message_store.events_of(conn, message_id) if e.type == kind]

    def suppressed(self) -> dict[str, str]:
        """Every listed address of the account, with its list."""
        with self.db.connect() as conn:
            rows = suppression_store.list_suppressions(conn, self.account_id)
        return {row.address: row.reason for row in rows}

    def listed(self, address: str, reason: str, detail: str | None = None) -> None:
        with self.db.begin() as conn:
            suppression_store.add_suppression(
                conn, self.account_id, address, reason, detail, now=datetime.now(UTC)
            )

    def verp_for(self, recipient_id: int) -> str:
        key = crypto.derive_key(MASTER, VERP_KEY_PURPOSE)
        return verp.encode(recipient_id, key=key, domain="bounce.shop.example")

    def dkim_dns(self) -> Callable[..., bytes | None]:
        name = f"{self.domain.dkim_selector}._domainkey.shop.example"
        record = f"v=DKIM1; k=rsa; p={self.domain.dkim_public_key}".encode()

        def lookup(qname: bytes, timeout: int = 5) -> bytes | None:
            return record if qname.decode().rstrip(".") == name else None

        return lookup


@pytest.fixture
def env(database_url: str, worker_dns: DnsServer, tmp_path: Path) -> Iterator[Env]:
    db = Database.from_url(database_url)
    upgrade(db)
    box = crypto.SecretBox(MASTER)
    account = admin.create_account(db, "shop")
    domain = admin.add_domain(db, box, "shop", "shop.example", selector="pl1")
    try:
        yield Env(db, domain, account.id, worker_dns, tmp_path)
    finally:
        db.dispose()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def deliver(
    env: Env,
    receiver: Receiver,
    *,
    rounds: int = 1,
    ssl_context: ssl.SSLContext | None = None,
    **delivery: Any,
) -> list[int]:
    """Start ``receiver``, run the worker ``rounds`` times; the rows leased each time."""
    port = await receiver.start()
    try:
        worker = DeliveryWorker(
            env.settings(port, **delivery), env.db, MASTER, ssl_context=ssl_context
        )
        return [await worker.run_once() for _ in range(rounds)]
    finally:
        await receiver.stop()


# -- tests ---------------------------------------------------------------------------------------


def test_delivers_signed_copy_with_verp_sender(env: Env) -> None:
    message_id = env.message("ann@example.test", "bob@example.test")
    receiver = Receiver()
    assert run(deliver(env, receiver)) == [2]

    rows = env.recipients(message_id)
    assert {r.status for r in rows.values()} == {"delivered"}
    assert receiver.sessions == 1  # one connection for the domain's copies
    by_rcpt = {m.recipients: m for m in receiver.messages}
    for address, row in rows.items():
        received = by_rcpt[(address,)]
        assert received.mail_from == env.verp_for(row.id)
        assert dkim.verify(received.data, dnsfunc=env.dkim_dns())
        assert f"To: {address}".encode() in received.data  # each copy shows its own To
    events = env.events(message_id, "delivered")
    assert len(events) == 2
    assert events[0].data["mx"] == MX_NAME
    assert events[0].data["ip"] == "127.0.0.1"
    assert "tls" in events[0].data and events[0].data["tls"] is None
    assert events[0].data["reply"].startswith("250")


@pytest.mark.parametrize(("size", "threaded"), [(1000, False), (INLINE_COMPOSE_BYTES, True)])
def test_small_copies_compose_on_the_loop_large_ones_in_a_thread(
    env: Env, monkeypatch: pytest.MonkeyPatch, size: int, threaded: bool
) -> None:
    """A small copy is rendered on the loop and signed by the signer; a large one in a thread."""
    in_thread: list[str] = []
    real = asyncio.to_thread

    async def spy(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        if isinstance(func, functools.partial) and func.func is compose:
            in_thread.append(func.keywords["recipient"])
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    by_signer = spy_on_signer(monkeypatch)
    body = ("x" * 76 + "\r\n") * (size // 78 + 1)
    message_id = env.message("ann@example.test", body=body)
    receiver = Receiver()
    run(deliver(env, receiver))

    assert in_thread == (["ann@example.test"] if threaded else [])
    assert by_signer == ([] if threaded else [1])
    (received,) = receiver.messages
    assert body.encode() in received.data
    assert dkim.verify(received.data, dnsfunc=env.dkim_dns())
    assert env.recipients(message_id)["ann@example.test"].status == "delivered"


def spy_on_signer(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each batch the worker hands to its signer, as they come."""
    batches: list[int] = []
    real = Signer.sign

    async def sign(self: Signer, batch: list[Unsigned]) -> list[bytes]:
        batches.append(len(batch))
        return await real(self, batch)

    monkeypatch.setattr(Signer, "sign", sign)
    return batches


def test_a_groups_copies_are_signed_in_batches_and_each_verifies(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = spy_on_signer(monkeypatch)
    addresses = [f"r{n}@example.test" for n in range(SIGN_BATCH + 3)]
    message_id = env.message(*addresses)
    receiver = Receiver()
    rules = shaping_rules(env, per_minute=6000, per_connection=100)
    run(deliver(env, receiver, shaping_rules=rules))

    assert batches == [SIGN_BATCH, 3]
    assert {m.recipients[0] for m in receiver.messages} == set(addresses)
    for received in receiver.messages:  # each copy carries its own signature
        assert f"To: {received.recipients[0]}".encode() in received.data
        assert dkim.verify(received.data, dnsfunc=env.dkim_dns())
    assert {r.status for r in env.recipients(message_id).values()} == {"delivered"}


def test_a_copy_that_cannot_be_signed_is_deferred_with_the_reason(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Signer, batch: list[Unsigned]) -> list[bytes]:
        raise RuntimeError("the signing threads are gone")

    monkeypatch.setattr(Signer, "sign", broken)
    message_id = env.message("ann@example.test", "bob@example.test")
    receiver = Receiver()
    before = datetime.now(UTC)
    run(deliver(env, receiver))

    assert receiver.messages == []  # nothing unsigned leaves
    for row in env.recipients(message_id).values():
        assert row.status == "deferred"
        assert row.last_reply == "DKIM signing failed: the signing threads are gone"
        assert row.next_attempt_at >= before + timedelta(seconds=60)
    events = env.events(message_id, "deferred")
    assert len(events) == 2 and all(e.data["stage"] == "sign" for e in events)


def test_a_bug_after_signing_fails_that_recipient_only(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = worker_module._archiving

    def archiving(row: queue.Leased, data: bytes, now: datetime) -> Any:
        if row.address == "ann@example.test":
            raise RuntimeError("archive broke")
        return real(row, data, now)

    monkeypatch.setattr(worker_module, "_archiving", archiving)
    message_id = env.message("ann@example.test", "bob@example.test", options={"archive_copy": True})
    receiver = Receiver()
    run(deliver(env, receiver))

    rows = env.recipients(message_id)
    assert rows["ann@example.test"].status == "failed"
    assert rows["ann@example.test"].last_reply == (
        "internal error preparing the message: archive broke"
    )
    assert rows["bob@example.test"].status == "delivered"
    assert [m.recipients for m in receiver.messages] == [("bob@example.test",)]


def test_replies_decide_each_recipient(env: Env) -> None:
    message_id = env.message(
        "ok@example.test",
        "later@example.test",
        "gone@example.test",
        "policy@example.test",
        "content@example.test",
    )
    receiver = Receiver(
        replies={
            "later@example.test": p.Reply(450, "4.2.0", ("Mailbox busy, try again later",)),
            "gone@example.test": p.Reply(550, "5.1.1", ("No such user here",)),
            "policy@example.test": p.Reply(550, "5.7.1", ("Message refused by local policy",)),
            "content@example.test": p.Reply(554, "5.6.0", ("Message content rejected",)),
        }
    )
    before = datetime.now(UTC)
    run(deliver(env, receiver))

    rows = env.recipients(message_id)
    assert rows["ok@example.test"].status == "delivered"
    later = rows["later@example.test"]
    assert later.status == "deferred"
    assert later.attempts == 1
    assert later.next_attempt_at >= before + timedelta(seconds=60)
    assert later.last_reply is not None and later.last_reply.startswith("450 4.2.0")
    assert rows["gone@example.test"].status == "failed"
    assert rows["policy@example.test"].status == "failed"
    assert rows["content@example.test"].status == "failed"
    # 5.1.1 suppresses; a policy or content refusal only lists the address as returned
    assert env.suppressed() == {
        "gone@example.test": "hard_bounce",
        "policy@example.test": "returned",
        "content@example.test": "returned",
    }
    with env.db.connect() as conn:
        details = {
            s.address: s.detail for s in suppression_store.list_suppressions(conn, env.account_id)
        }
    assert details["policy@example.test"] == "550 5.7.1 Message refused by local policy"
    failed = {e.recipient_id: e.data for e in env.events(message_id, "failed")}
    assert failed[rows["gone@example.test"].id]["kind"] == "hard"
    assert failed[rows["policy@example.test"].id]["kind"] == "policy"
    assert failed[rows["content@example.test"].id]["kind"] == "content"
    assert [m.recipients for m in receiver.messages] == [("ok@example.test",)]


def journaled_ids(env: Env) -> set[int]:
    """Recipient ids in the delivery journal files of the data directory."""
    ids = set()
    for path in (env.tmp_path / "delivery-journal").glob("*.journal"):
        for line in path.read_text().splitlines()[1:]:
            ids.add(json.loads(line)["id"])
    return ids


def copies_taken_too_early(env: Env, *, journal_counts: bool) -> list[tuple[str, list[str]]]:
    """Deliver one message to 6 recipients over one connection, watching the order.

    Each time the receiver takes a copy, the copies it took before must be
    delivered in the database, or (``journal_counts``) in the worker's
    journal; the list says which copy came while which earlier ones were not.
    """
    addresses = [f"r{i}@example.test" for i in range(6)]
    message_id = env.message(*addresses)
    unrecorded: list[tuple[str, list[str]]] = []

    def check(copy: Delivered) -> None:
        earlier = [m.recipients[0] for m in receiver.messages]
        rows = env.recipients(message_id)
        journaled = journaled_ids(env) if journal_counts else set()
        late = [a for a in earlier if rows[a].status != "delivered" and rows[a].id not in journaled]
        if late:
            unrecorded.append((copy.recipients[0], late))

    receiver = Receiver(on_message=check)
    run(deliver(env, receiver))

    assert receiver.sessions == 1
    assert sorted(m.recipients[0] for m in receiver.messages) == sorted(addresses)
    assert {r.status for r in env.recipients(message_id).values()} == {"delivered"}
    return unrecorded


def test_a_connection_sends_its_next_copy_only_once_the_last_is_written_down(env: Env) -> None:
    """A worker killed mid-connection must resend at most the copy in flight.

    So when the receiver takes a copy, every copy it took before on that
    connection is recorded as delivered, or at least in the worker's journal
    (which a sweep records after a crash): none is only in memory.
    """
    assert copies_taken_too_early(env, journal_counts=True) == []


def test_when_the_journal_fails_the_next_copy_waits_for_the_database_row(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: OutcomeJournal, delivery: queue.Delivery) -> int:
        raise StoreError("cannot write the delivery journal: disk full")

    monkeypatch.setattr(OutcomeJournal, "append", broken)
    assert copies_taken_too_early(env, journal_counts=False) == []


def test_a_group_cancelled_mid_connection_sends_none_of_its_queued_copies(env: Env) -> None:
    """Stopping cancels groups still sending: what was queued on the connection stays home."""
    addresses = [f"c{i}@example.test" for i in range(8)]
    message_id = env.message(*addresses)
    worker: DeliveryWorker | None = None

    def cancel_at_the_second(copy: Delivered) -> None:
        if len(receiver.messages) == 1 and worker is not None:  # the second copy arrives
            for task in worker._groups:
                task.cancel()

    receiver = Receiver(on_message=cancel_at_the_second)

    async def scenario() -> None:
        nonlocal worker
        port = await receiver.start()
        try:
            worker = DeliveryWorker(env.settings(port), env.db, MASTER)
            with contextlib.suppress(asyncio.CancelledError):
                await worker.run_once()
            await asyncio.sleep(0.3)  # anything still queued would arrive by now
        finally:
            await receiver.stop()

    run(scenario())
    # the second copy, and at most the next one already on the wire when the cancel landed
    assert 2 <= len(receiver.messages) <= 3
    statuses = [r.status for r in env.recipients(message_id).values()]
    assert statuses.count("sending") >= len(addresses) - 3  # their leases run out, then retried


def test_null_mx_and_no_such_domain_fail_and_suppress_and_servfail_defers(env: Env) -> None:
    null_id = env.message("x@nullmx.test")
    gone_id = env.message("z@no-such-domain.test")  # NXDOMAIN
    broken_id = env.message("y@broken.test")
    receiver = Receiver()
    before = datetime.now(UTC)
    run(deliver(env, receiver))

    null = env.recipients(null_id)["x@nullmx.test"]
    assert null.status == "failed"
    assert env.events(null_id, "failed")[0].data["status"] == "5.1.10"
    assert env.events(null_id, "failed")[0].data["kind"] == "hard"
    gone = env.recipients(gone_id)["z@no-such-domain.test"]
    assert gone.status == "failed"
    assert env.events(gone_id, "failed")[0].data["status"] == "5.1.2"
    broken = env.recipients(broken_id)["y@broken.test"]
    assert broken.status == "deferred"
    assert broken.next_attempt_at >= before + timedelta(seconds=60)
    assert env.events(broken_id, "deferred")[0].data["status"] == "4.4.3"
    assert receiver.messages == []
    # A domain that takes no mail is a hard bounce and suppresses the address,
    # as a 5.1.x reply would; a temporary DNS failure does not.
    assert env.suppressed() == {
        "x@nullmx.test": "hard_bounce",
        "z@no-such-domain.test": "hard_bounce",
    }


def test_higher_priority_is_leased_first(env: Env) -> None:
    earlier = datetime.now(UTC) - timedelta(minutes=5)
    normal_id = env.message("n1@example.test", "n2@example.test", received_at=earlier)
    urgent_id = env.message("urgent@example.test", priority=1)
    receiver = Receiver()
    assert run(deliver(env, receiver, lease_batch=1)) == [1]

    assert env.recipients(urgent_id)["urgent@example.test"].status == "delivered"
    assert {r.status for r in env.recipients(normal_id).values()} == {"queued"}
    assert [m.recipients for m in receiver.messages] == [("urgent@example.test",)]


def test_test_mode_renders_but_sends_nothing(env: Env) -> None:
    message_id = env.message("ann@example.test", options={"test_mode": True})
    receiver = Receiver()
    run(deliver(env, receiver))

    assert env.recipients(message_id)["ann@example.test"].status == "delivered"
    event = env.events(message_id, "delivered")[0]
    assert event.data["test"] is True
    assert receiver.messages == [] and receiver.sessions == 0


def test_options_are_parsed_once_per_stored_text_and_each_message_keeps_its_own(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[object] = []
    real = SendOptions.from_json.__func__  # type: ignore[attr-defined]

    def counting(cls: type[SendOptions], data: object) -> SendOptions:
        parsed.append(data)
        return real(cls, data)  # type: ignore[no-any-return]

    monkeypatch.setattr(SendOptions, "from_json", classmethod(counting))
    plain = [env.message(f"p{n}@example.test") for n in range(3)]
    tested = [env.message(f"t{n}@example.test", options={"test_mode": True}) for n in range(2)]
    receiver = Receiver()
    run(deliver(env, receiver))

    assert len(parsed) == 2  # five messages, two distinct stored options
    assert sorted(m.recipients for m in receiver.messages) == [
        (f"p{n}@example.test",) for n in range(3)
    ]
    for message_id in plain + tested:
        assert {r.status for r in env.recipients(message_id).values()} == {"delivered"}
    assert all(env.events(m, "delivered")[0].data.get("test") for m in tested)


def test_suppressed_address_is_not_sent(env: Env) -> None:
    with env.db.begin() as conn:
        suppression_store.add_suppression(
            conn, env.account_id, "Ann@Example.test", "manual", now=datetime.now(UTC)
        )
    message_id = env.message("ann@example.test", "bob@example.test")
    bypass_id = env.message("ann@example.test", options={"bypass_list_filters": True})
    receiver = Receiver()
    run(deliver(env, receiver))

    rows = env.recipients(message_id)
    assert rows["ann@example.test"].status == "suppressed"
    assert rows["bob@example.test"].status == "delivered"
    (event,) = env.events(message_id, "suppressed")
    assert event.data == {
        "reason": "address is on the account's suppression list (manual)",
        "filter": "manual",
    }
    assert env.recipients(bypass_id)["ann@example.test"].status == "delivered"
    assert sorted(m.recipients for m in receiver.messages) == [
        ("ann@example.test",),
        ("bob@example.test",),
    ]


def put_welcome(env: Env) -> None:
    with env.db.begin() as conn:
        template_store.put_template(
            conn,
            env.account_id,
            "welcome",
            subject="Welcome, {{ name }}",
            html="<p>Hello {{ name }}, your plan: {{ plan }}</p>",
            text="Hello {{ name }}, your plan: {{ plan }}",
        )


def test_template_named_in_the_headers_is_rendered_and_signed(env: Env) -> None:
    put_welcome(env)
    parsed = from_headers(
        [
            ("X-OV-Template", "welcome"),
            ("X-OV-Template-Variables", '{"name": "Ann"}'),
            ("X-OV-Variables", '{"name": "general", "plan": "pro"}'),
        ],
        tz=UTC,
    )
    message_id = env.message(
        "ann@example.test", options=SendOptions().layer(parsed.partial).to_json()
    )

    receiver = Receiver()
    run(deliver(env, receiver))

    assert env.recipients(message_id)["ann@example.test"].status == "delivered"
    (received,) = receiver.messages
    assert dkim.verify(received.data, dnsfunc=env.dkim_dns())
    copy = BytesParser(policy=email.policy.default).parsebytes(received.data)
    assert isinstance(copy, EmailMessage)
    assert copy["Subject"] == "Welcome, Ann"
    text, page = copy.iter_parts()
    assert text.get_content().strip() == "Hello Ann, your plan: pro"
    assert page.get_content().strip() == "<p>Hello Ann, your plan: pro</p>"
    assert b"Hello there." not in received.data  # the body the client sent was replaced


def test_missing_template_fails_only_its_recipients(env: Env) -> None:
    put_welcome(env)
    missing_id = env.message("ann@example.test", "bob@example.test", options={"template": "x"})
    welcome_id = env.message("carl@example.test", options={"template": "Welcome"})
    plain_id = env.message("dora@example.test")
    receiver = Receiver()
    run(deliver(env, receiver))

    for failed in env.recipients(missing_id).values():
        assert failed.status == "failed"
        assert failed.last_reply == "template 'x' does not exist for this account"
    reasons = [e.data for e in env.events(missing_id, "failed")]
    assert len(reasons) == 2 and all(r["stage"] == "render" for r in reasons)
    assert {r["reason"] for r in reasons} == {"template 'x' does not exist for this account"}
    assert env.recipients(welcome_id)["carl@example.test"].status == "delivered"
    assert env.recipients(plain_id)["dora@example.test"].status == "delivered"
    assert sorted(m.recipients for m in receiver.messages) == [
        ("carl@example.test",),
        ("dora@example.test",),
    ]


def test_a_template_that_fails_to_render_fails_with_its_line(env: Env) -> None:
    with env.db.begin() as conn:
        template_store.put_template(conn, env.account_id, "broken", text="ok\n{{ 1 / n }}")
    message_id = env.message(
        "ann@example.test", options={"template": "broken", "template_variables": {"n": 0}}
    )
    run(deliver(env, Receiver()))

    failed = env.recipients(message_id)["ann@example.test"]
    assert failed.status == "failed"
    assert failed.last_reply == "template 'broken' (text): line 2: division by zero"


def test_unaligned_from_is_signed_by_the_accounts_domain(env: Env) -> None:
    message_id = env.message("ann@example.test", header_from="news@elsewhere.test")
    receiver = Receiver()
    run(deliver(env, receiver))

    assert env.recipients(message_id)["ann@example.test"].status == "delivered"
    assert b"d=shop.example;" in receiver.messages[0].data
    assert dkim.verify(receiver.messages[0].data, dnsfunc=env.dkim_dns())


def test_opportunistic_tls_is_recorded(env: Env, pki: Pki) -> None:
    message_id = env.message("ann@example.test")
    receiver = Receiver(tls=pki.self_signed)
    run(deliver(env, receiver))

    assert receiver.messages[0].tls
    event = env.events(message_id, "delivered")[0]
    assert event.data["tls"] in ("TLSv1.2", "TLSv1.3")
    assert event.data["cipher"]


def test_required_tls_verified_delivers(env: Env, pki: Pki) -> None:
    message_id = env.message("ann@example.test", options={"require_tls": True})
    receiver = Receiver(tls=pki.signed)
    run(deliver(env, receiver, ssl_context=pki.client_context()))

    assert env.recipients(message_id)["ann@example.test"].status == "delivered"
    assert receiver.messages[0].tls


def test_required_tls_without_starttls_defers(env: Env) -> None:
    message_id = env.message("ann@example.test", options={"require_tls": True})
    plain_id = env.message("bob@example.test")
    receiver = Receiver()
    run(deliver(env, receiver))

    row = env.recipients(message_id)["ann@example.test"]
    assert row.status == "deferred"
    assert row.last_reply is not None and "STARTTLS" in row.last_reply
    assert env.recipients(plain_id)["bob@example.test"].status == "delivered"
    assert [m.recipients for m in receiver.messages] == [("bob@example.test",)]


def test_unreachable_mx_defers(env: Env) -> None:
    message_id = env.message("ann@example.test")

    async def scenario() -> None:
        receiver = Receiver()
        port = await receiver.start()
        await receiver.stop()  # nothing listens on the port any more
        worker = DeliveryWorker(env.settings(port), env.db, MASTER, connect_timeout=5)
        await worker.run_once()

    run(scenario())
    row = env.recipients(message_id)["ann@example.test"]
    assert row.status == "deferred"
    assert row.last_reply is not None and "refused" in row.last_reply


@pytest.mark.parametrize("recipient", ["ann@example.test", "ann@[127.0.0.1]"])
def test_a_recipient_domain_cannot_point_delivery_at_internal_addresses(
    env: Env, recipient: str
) -> None:
    """Its MX records (or an address literal) made Postlane connect into the operator's network."""
    message_id = env.message(recipient)
    receiver = Receiver()
    assert run(deliver(env, receiver, allow_internal_mx=False)) == [1]
    assert receiver.messages == []
    row = env.recipients(message_id)[recipient]
    assert row.status == "deferred"
    assert row.last_reply is not None
    assert "has no public address (127.0.0.1); delivery.allow_internal_mx is off" in row.last_reply
    # allowed by the operator, the same recipient is delivered
    with env.db.begin() as conn:
        conn.execute(
            sa.update(recipients)
            .where(recipients.c.message_id == message_id)
            .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    run(deliver(env, receiver))
    assert env.recipients(message_id)[recipient].status == "delivered"


def test_expired_deferral_becomes_expired(env: Env) -> None:
    soon = datetime.now(UTC) - timedelta(days=3) + timedelta(seconds=30)
    message_id = env.message("later@example.test", received_at=soon)
    receiver = Receiver(replies={"later@example.test": p.Reply(451, "4.3.0", ("Try later",))})
    run(deliver(env, receiver))

    # The next attempt would come after the expiry: expired, not deferred.
    assert env.recipients(message_id)["later@example.test"].status == "expired"


def test_role_start_and_stop(env: Env) -> None:
    message_id = env.message("ann@example.test")

    async def scenario() -> None:
        receiver = Receiver()
        port = await receiver.start()
        worker = DeliveryWorker(env.settings(port, poll_interval=0.05), env.db, MASTER)
        await worker.start()
        try:
            for _ in range(200):
                if receiver.messages:
                    break
                await asyncio.sleep(0.05)
        finally:
            await worker.stop()
            await receiver.stop()

    run(scenario())
    assert env.recipients(message_id)["ann@example.test"].status == "delivered"


def test_lost_lease_changes_nothing(env: Env) -> None:
    """A row reclaimed while its worker sent: the late report is fenced off."""
    message_id = env.message("ann@example.test")
    with env.db.begin() as conn:
        queue.lease_due(
            conn,
            owner="dead:1:x",
            now=datetime.now(UTC),
            limit=10,
            lease_for=timedelta(seconds=60),
            dialect=env.db.dialect_name,
        )
    receiver = Receiver()
    assert run(deliver(env, receiver)) == [0]  # leased by someone else: nothing to do
    assert env.recipients(message_id)["ann@example.test"].status == "sending"


def test_a_dead_workers_journal_is_recorded_before_its_leases_are_reclaimed(env: Env) -> None:
    """Its journaled copy is recorded as delivered, not resent; the rest go out again."""
    long_ago = datetime.now(UTC) - timedelta(minutes=10)
    message_id = env.message("ann@example.test", "bob@example.test", received_at=long_ago)
    with env.db.begin() as conn:
        leased = queue.lease_due(
            conn,
            owner="dead:1:x",
            now=long_ago,
            limit=10,
            lease_for=timedelta(seconds=60),  # long run out
            dialect=env.db.dialect_name,
        )
    ids = {row.address: row.id for row in leased}
    # It died after ann's 250, with the delivery written down but not in the database.
    dead = OutcomeJournal(env.tmp_path / "delivery-journal", "dead:1:x")
    dead.append(queue.Delivery(ids["ann@example.test"], {"mx": MX_NAME}, "250 2.0.0 Ok: Q1"))
    dead.close()  # its lock is gone, as with a killed process

    receiver = Receiver()
    run(deliver(env, receiver))

    assert [m.recipients for m in receiver.messages] == [("bob@example.test",)]
    rows = env.recipients(message_id)
    assert rows["ann@example.test"].status == "delivered"
    assert rows["ann@example.test"].last_reply == "250 2.0.0 Ok: Q1"
    assert rows["bob@example.test"].status == "delivered"
    (event,) = [
        e for e in env.events(message_id, "delivered") if e.recipient_id == ids["ann@example.test"]
    ]
    assert event.data["recovered"] == "journal"
    assert journaled_ids(env) <= {ids["bob@example.test"]}  # the dead worker's file is gone


def test_a_delivery_whose_write_failed_is_written_by_the_next_sweep_not_resent(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    message_id = env.message("ann@example.test")
    real = queue.mark_delivered_many
    failing = True

    def flaky(*args: Any, **kwargs: Any) -> list[bool]:
        if failing:
            raise StoreError("database error: disk I/O error")
        return real(*args, **kwargs)

    monkeypatch.setattr(queue, "mark_delivered_many", flaky)
    receiver = Receiver()

    async def scenario() -> tuple[str, str]:
        nonlocal failing
        port = await receiver.start()
        try:
            worker = DeliveryWorker(env.settings(port), env.db, MASTER)
            await worker.run_once()  # sent and accepted; its row cannot be written
            before = env.recipients(message_id)["ann@example.test"].status
            failing = False
            await worker.run_once()  # the sweep writes it; nothing is sent again
            return before, env.recipients(message_id)["ann@example.test"].status
        finally:
            await receiver.stop()

    assert run(scenario()) == ("sending", "delivered")
    assert len(receiver.messages) == 1
    (event,) = env.events(message_id, "delivered")
    assert event.data["reply"].startswith("250")


# -- traffic shaping -------------------------------------------------------------------------------

SHAPING = """
[default]
max_connections = 2
messages_per_connection = 50
messages_per_minute = 600

[[rule]]
name = "testmx"
mx = ["*.test.example"]
max_connections = 1
messages_per_connection = {per_connection}
messages_per_minute = {per_minute}
"""


def shaping_rules(env: Env, *, per_minute: int, per_connection: int = 1) -> Path:
    """A rules file that makes ``example.test`` (MX ``mx.test.example``) destination testmx."""
    path = env.tmp_path / "shaping.toml"
    path.write_text(SHAPING.format(per_minute=per_minute, per_connection=per_connection))
    return path


def test_rate_limit_sends_the_burst_and_defers_the_rest_locally(env: Env) -> None:
    addresses = [f"r{n}@example.test" for n in range(5)]
    message_id = env.message(*addresses)
    receiver = Receiver()
    before = datetime.now(UTC)
    # 12/min: the bucket holds 10 s worth, 2 messages; one message per connection.
    rules = shaping_rules(env, per_minute=12)
    run(deliver(env, receiver, shaping_rules=rules))

    rows = env.recipients(message_id)
    delivered = [a for a in addresses if rows[a].status == "delivered"]
    deferred = [a for a in addresses if rows[a].status == "deferred"]
    assert len(delivered) == 2 and len(deferred) == 3
    assert receiver.sessions == 2  # messages_per_connection = 1: a connection each
    assert sorted(m.recipients[0] for m in receiver.messages) == sorted(delivered)
    waits = []
    for address in deferred:
        row = rows[address]
        assert row.last_reply is not None
        assert row.last_reply.startswith("4.7.0 local rate limit for testmx: next slot in ")
        wait = int(row.last_reply.rsplit(" ", 2)[1])
        waits.append(wait)
        # The slot, not the one-minute backoff floor of a remote deferral.
        assert row.next_attempt_at <= datetime.now(UTC) + timedelta(seconds=wait + 1)
        assert row.next_attempt_at >= before + timedelta(seconds=wait - 1)
    assert sorted(waits) == [5, 10, 15]  # spread over the coming slots
    events = env.events(message_id, "deferred")
    assert len(events) == 3
    for event in events:
        assert event.data["local"] is True and event.data["destination"] == "testmx"
        assert "kind" not in event.data  # not a remote failure


async def deliver_shaped(env: Env, receiver: Receiver, shaper: Shaper) -> None:
    port = await receiver.start()
    try:
        worker = DeliveryWorker(env.settings(port), env.db, MASTER, shaper=shaper)
        await worker.run_once()
    finally:
        await receiver.stop()


def test_throttled_reply_slows_down_and_defers_the_rest_of_the_group(env: Env) -> None:
    addresses = [f"t{n}@example.test" for n in range(3)]
    message_id = env.message(*addresses)
    throttle = p.Reply(421, "4.7.0", ("Rate limited, slow down",))
    receiver = Receiver(replies=dict.fromkeys(addresses, throttle))
    rules = shaping_rules(env, per_minute=600)
    shaper = Shaper(load_rules(rules))
    before = datetime.now(UTC)
    run(deliver_shaped(env, receiver, shaper))
    assert receiver.sessions == 1  # one connection was refused; the others were not opened
    assert receiver.messages == []
    assert shaper.current_rate("testmx") == 300.0  # halved
    rows = env.recipients(message_id)
    assert {row.status for row in rows.values()} == {"deferred"}
    remote = [row for row in rows.values() if row.last_reply and row.last_reply.startswith("421")]
    local = [row for row in rows.values() if row not in remote]
    assert len(remote) == 1 and len(local) == 2
    assert remote[0].next_attempt_at >= before + timedelta(seconds=60)  # the backoff
    for row in local:
        assert row.last_reply is not None
        assert row.last_reply.startswith(
            "4.7.0 local rate limit for testmx (the server throttled us): next slot in "
        )
    by_row = {event.recipient_id: event.data for event in env.events(message_id, "deferred")}
    assert by_row[remote[0].id]["kind"] == "throttled"
    assert all(by_row[row.id]["local"] is True for row in local)


def test_a_421_greeting_slows_down_as_a_421_in_a_transaction_does(env: Env) -> None:
    """The commonest way to throttle: refuse the session before any transaction."""
    addresses = [f"g{n}@example.test" for n in range(3)]
    message_id = env.message(*addresses)
    receiver = Receiver(refusal=b"421 4.7.0 Too many connections from your IP, slow down\r\n")
    shaper = Shaper(load_rules(shaping_rules(env, per_minute=600)))

    run(deliver_shaped(env, receiver, shaper))
    assert receiver.sessions == 1  # the other connections were not opened
    assert shaper.current_rate("testmx") == 300.0  # halved
    rows = env.recipients(message_id)
    assert {row.status for row in rows.values()} == {"deferred"}
    remote = [row for row in rows.values() if row.last_reply and "421 4.7.0" in row.last_reply]
    local = [row for row in rows.values() if row not in remote]
    assert len(remote) == 1 and len(local) == 2
    for row in local:
        assert row.last_reply is not None
        assert row.last_reply.startswith(
            "4.7.0 local rate limit for testmx (the server throttled us): next slot in "
        )


@pytest.mark.parametrize(
    "refusal",
    [
        b"421 4.7.0 Temporary System Problem. Try again later\r\n",
        b"421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected "
        b"volume or user complaints\r\n",
    ],
)
def test_real_world_421_greetings_slow_down(env: Env, refusal: bytes) -> None:
    env.message("ann@example.test")
    shaper = Shaper(load_rules(shaping_rules(env, per_minute=600)))
    run(deliver_shaped(env, Receiver(refusal=refusal), shaper))
    assert shaper.current_rate("testmx") == 300.0


def test_a_rate_limit_classified_as_reputation_slows_down(env: Env) -> None:
    """Microsoft's 4.7.650 is recorded as reputation, and still slows the destination down."""
    message_id = env.message("ann@example.test")
    text = "The mail server [127.0.0.1] has been temporarily rate limited due to IP reputation."
    receiver = Receiver(replies={"ann@example.test": p.Reply(451, "4.7.650", (text,))})
    shaper = Shaper(load_rules(shaping_rules(env, per_minute=600)))
    run(deliver_shaped(env, receiver, shaper))
    assert shaper.current_rate("testmx") == 300.0
    (event,) = env.events(message_id, "deferred")
    assert event.data["kind"] == "reputation"


def test_a_refused_greeting_that_is_not_about_rate_does_not_slow_down(env: Env) -> None:
    message_id = env.message("ann@example.test")
    shaper = Shaper(load_rules(shaping_rules(env, per_minute=600)))
    receiver = Receiver(refusal=b"554 5.7.1 No SMTP service here\r\n")
    run(deliver_shaped(env, receiver, shaper))
    assert shaper.current_rate("testmx") == 600.0
    assert env.recipients(message_id)["ann@example.test"].status == "deferred"


def test_a_throttling_mx_is_heard_though_a_later_one_is_unreachable(env: Env) -> None:
    message_id = env.message("ann@twomx.test")
    receiver = Receiver(refusal=b"421 4.7.0 Too many connections, try again in 20 minutes\r\n")
    shaper = Shaper(load_rules(shaping_rules(env, per_minute=600)))
    before = datetime.now(UTC)

    run(deliver_shaped(env, receiver, shaper))
    assert receiver.sessions == 1
    assert shaper.current_rate("testmx") == 300.0
    row = env.recipients(message_id)["ann@twomx.test"]
    assert row.status == "deferred"
    assert row.last_reply is not None and "421 4.7.0 Too many connections" in row.last_reply
    assert row.next_attempt_at >= before + timedelta(minutes=20)


def test_a_421_greeting_s_retry_hint_is_kept(env: Env) -> None:
    """ "try again in 30 minutes" at the greeting waits 30 minutes, not the 60 s first step."""
    message_id = env.message("ann@example.test")
    receiver = Receiver(refusal=b"421 4.7.0 Too busy, try again in 30 minutes\r\n")
    before = datetime.now(UTC)
    run(deliver(env, receiver))
    after = datetime.now(UTC)

    row = env.recipients(message_id)["ann@example.test"]
    assert row.status == "deferred"
    assert row.last_reply is not None and "try again in 30 minutes" in row.last_reply
    assert before + timedelta(minutes=30) <= row.next_attempt_at
    assert row.next_attempt_at <= after + timedelta(minutes=30)


# -- deadlines, and what a hostile server's replies cost ------------------------------------------


class _RawMx(asyncio.Protocol):
    """A hand-written MX for what the engine-based Receiver never does.

    ``ehlo`` is its EHLO reply; ``dribble`` sends the reply to the content one
    byte every 0.1 s; ``quit_reply`` None never answers QUIT.
    """

    def __init__(self, owner: RawMx) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner.sessions.append(self)
        transport.write(b"220 mx ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buffer, self.in_data = self.buffer[end + 5 :], False
                self.owner.messages += 1
                reply = b"250 2.0.0 queued as " + b"Q" * 500 + b"\r\n"
                self.drip(reply) if self.owner.dribble else self.write(reply)
                continue
            line, found, self.buffer = self.buffer.partition(b"\r\n")
            if not found:
                self.buffer = line
                return
            command = line[:4].upper()
            if command == b"EHLO":
                self.write(self.owner.ehlo)
            elif command == b"DATA":
                self.write(b"354 go\r\n")
                self.in_data = True
            elif command == b"QUIT":
                if self.owner.quit_reply is not None:
                    self.write(self.owner.quit_reply)
                    if self.transport is not None:
                        self.transport.close()
            else:
                self.write(b"250 2.1.0 Ok\r\n")

    def drip(self, data: bytes) -> None:
        if data and self.write(data[:1]):
            asyncio.get_running_loop().call_later(0.1, self.drip, data[1:])

    def write(self, data: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True


@dataclass
class RawMx:
    ehlo: bytes = b"250-mx\r\n250 PIPELINING\r\n"
    dribble: bool = False
    quit_reply: bytes | None = b"221 2.0.0 Bye\r\n"
    sessions: list[_RawMx] = field(default_factory=list)
    messages: int = 0

    async def start(self) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(lambda: _RawMx(self), "127.0.0.1", 0)


def test_a_dribbling_server_is_cut_off_and_the_copy_deferred_saying_so(env: Env) -> None:
    """A byte every 0.1 s used to keep the reply going (and a concurrency slot taken)."""
    message_id = env.message("ann@example.test")
    mx = RawMx(dribble=True)

    async def scenario() -> float:
        server = await mx.start()
        port = int(server.sockets[0].getsockname()[1])
        worker = DeliveryWorker(env.settings(port), env.db, MASTER, command_timeout=1)
        started = asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(worker.run_once(), 30)
            await asyncio.wait_for(worker.close_idle(), 10)
        finally:
            server.close()
        return asyncio.get_running_loop().time() - started

    assert run(scenario()) < 10  # the reply alone is 500 bytes: 50 s at that rate
    row = env.recipients(message_id)["ann@example.test"]
    assert row.status == "deferred"
    assert row.last_reply is not None
    assert row.last_reply.startswith("451 4.4.2") and "reply deadline" in row.last_reply
    assert mx.sessions[0].transport is None  # aborted, not kept for the next batch


def test_a_size_of_thousands_of_digits_delivers_and_stop_returns(env: Env) -> None:
    """int() of the SIZE value raised, and the connection kept in the cache hung stop()."""
    message_id = env.message("ann@example.test", "bob@example.test")
    mx = RawMx(ehlo=b"250-mx\r\n250-PIPELINING\r\n250 SIZE " + b"9" * 5000 + b"\r\n")

    async def scenario() -> None:
        server = await mx.start()
        port = int(server.sockets[0].getsockname()[1])
        worker = DeliveryWorker(env.settings(port, poll_interval=0.05), env.db, MASTER)
        await worker.start()
        try:
            for _ in range(200):
                if mx.messages == 2:
                    break
                await asyncio.sleep(0.05)
        finally:
            await asyncio.wait_for(worker.stop(), 20)
            server.close()

    run(scenario())
    assert {r.status for r in env.recipients(message_id).values()} == {"delivered"}
    assert mx.messages == 2 and len(mx.sessions) == 1


def test_close_idle_aborts_a_connection_whose_server_never_answers_quit(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "CLOSE_GRACE", 0.5, raising=False)
    env.message("ann@example.test")
    mx = RawMx(quit_reply=None)

    async def scenario() -> None:
        server = await mx.start()
        port = int(server.sockets[0].getsockname()[1])
        # the default 300 s reply deadline: only the grace keeps the wait short
        worker = DeliveryWorker(env.settings(port, connection_cache_seconds=60), env.db, MASTER)
        try:
            await worker.run_once()
            await asyncio.wait_for(worker.close_idle(), 10)
            await asyncio.sleep(0.05)
        finally:
            server.close()

    run(scenario())
    assert mx.messages == 1
    assert mx.sessions[0].transport is None


def test_a_long_reply_is_stored_cut_with_a_marker_and_classified_in_full(env: Env) -> None:
    message_id = env.message("gone@example.test", "later@example.test")
    filler = tuple(f"line {n}: " + "x" * 60 for n in range(100))  # about 7,000 characters
    receiver = Receiver(
        replies={
            "gone@example.test": p.Reply(550, "5.1.1", ("No such user", *filler)),
            # the retry hint is on the last line, past what is stored
            "later@example.test": p.Reply(
                450, "4.2.0", ("Mailbox busy", *filler, "try again in 30 minutes")
            ),
        }
    )
    before = datetime.now(UTC)
    run(deliver(env, receiver))

    rows = env.recipients(message_id)
    gone, later = rows["gone@example.test"], rows["later@example.test"]
    for row in (gone, later):
        stored = row.last_reply
        assert stored is not None and 1000 < len(stored) <= 2100
        assert re.search(r"\n… \(\d+ more characters\)$", stored), stored[-80:]
        assert stored.split("\n… (")[0].endswith("x" * 60)  # cut at a line end
    assert gone.status == "failed" and gone.last_reply is not None
    assert gone.last_reply.startswith("550 5.1.1 No such user\nline 0: ")
    assert later.status == "deferred"
    assert later.next_attempt_at >= before + timedelta(minutes=30)
    (failed,) = env.events(message_id, "failed")
    assert failed.data["kind"] == "hard" and failed.data["reply"] == gone.last_reply
    (deferred,) = env.events(message_id, "deferred")
    assert deferred.data["reply"] == later.last_reply
    with env.db.connect() as conn:
        (entry,) = suppression_store.list_suppressions(conn, env.account_id)
    assert entry.address == "gone@example.test" and entry.detail == gone.last_reply


# -- MTA-STS --------------------------------------------------------------------------------------

STS_DOMAIN = "sts.test"  # MX mx.test.example, and an _mta-sts record


def sts_policy(mode: str, mx: str) -> str:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"


async def deliver_with_sts(
    env: Env,
    receiver: Receiver,
    policy: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> list[str]:
    """Deliver with ``policy`` published for ``sts.test``; the domains whose policy was fetched.

    The policy is served by an injected fetch (the HTTPS side is tested in
    ``tests/unit/delivery/test_mta_sts.py``); the TXT record and MX come from
    the test DNS server, through the worker's own resolver.
    """
    fetched: list[str] = []

    async def fetch(domain: str) -> str:
        fetched.append(domain)
        return policy

    env.dns.set(STS_DOMAIN, "MX", ["10 " + MX_NAME])
    env.dns.set(f"_mta-sts.{STS_DOMAIN}", "TXT", ["v=STSv1; id=20260101"])
    port = await receiver.start()
    try:
        resolver = Resolver([env.dns.nameserver])
        worker = DeliveryWorker(
            env.settings(port),
            env.db,
            MASTER,
            resolver=resolver,
            ssl_context=ssl_context,
            mta_sts=MtaStsCache(resolver, fetch=fetch),
        )
        await worker.run_once()
    finally:
        await receiver.stop()
        env.dns.delete(STS_DOMAIN, "MX")
        env.dns.delete(f"_mta-sts.{STS_DOMAIN}", "TXT")
    return fetched


def test_mta_sts_enforce_with_a_matching_mx_requires_verified_tls(env: Env, pki: Pki) -> None:
    message_id = env.message(f"ann@{STS_DOMAIN}")
    receiver = Receiver(tls=pki.signed)
    policy = sts_policy("enforce", "*.test.example")
    fetched = run(deliver_with_sts(env, receiver, policy, ssl_context=pki.client_context()))

    assert fetched == [STS_DOMAIN]
    assert env.recipients(message_id)[f"ann@{STS_DOMAIN}"].status == "delivered"
    assert receiver.messages[0].tls
    event = env.events(message_id, "delivered")[0]
    assert event.data["mta_sts"] == "enforce"
    assert event.data["mx"] == MX_NAME
    assert event.data["tls"] in ("TLSv1.2", "TLSv1.3")


def test_mta_sts_enforce_never_sends_without_a_valid_certificate(env: Env, pki: Pki) -> None:
    """The same policy, but the MX's certificate is self-signed: deferred, not sent in clear."""
    message_id = env.message(f"ann@{STS_DOMAIN}")
    receiver = Receiver(tls=pki.self_signed)
    run(
        deliver_with_sts(
            env, receiver, sts_policy("enforce", MX_NAME), ssl_context=pki.client_context()
        )
    )

    row = env.recipients(message_id)[f"ann@{STS_DOMAIN}"]
    assert row.status == "deferred"
    assert receiver.messages == []


def test_mta_sts_enforce_without_a_matching_mx_defers_with_the_reason(env: Env) -> None:
    message_id = env.message(f"ann@{STS_DOMAIN}")
    receiver = Receiver()
    before = datetime.now(UTC)
    run(deliver_with_sts(env, receiver, sts_policy("enforce", "mx.elsewhere.example")))

    row = env.recipients(message_id)[f"ann@{STS_DOMAIN}"]
    assert row.status == "deferred"  # never bounced: the policy or DNS may be fixed
    assert row.next_attempt_at >= before + timedelta(seconds=60)
    assert row.last_reply is not None
    assert "no MX host is allowed by the domain's MTA-STS policy" in row.last_reply
    assert MX_NAME in row.last_reply
    event = env.events(message_id, "deferred")[0]
    assert event.data["status"] == "4.7.5"
    assert event.data["mta_sts"] == "enforce"
    assert receiver.sessions == 0  # the disallowed MX was not even contacted


def test_mta_sts_testing_delivers_and_records_the_violation(env: Env) -> None:
    message_id = env.message(f"ann@{STS_DOMAIN}")
    receiver = Receiver()  # no STARTTLS either: testing does not require it
    run(deliver_with_sts(env, receiver, sts_policy("testing", "mx.elsewhere.example")))

    assert env.recipients(message_id)[f"ann@{STS_DOMAIN}"].status == "delivered"
    assert [m.recipients for m in receiver.messages] == [(f"ann@{STS_DOMAIN}",)]
    event = env.events(message_id, "delivered")[0]
    assert event.data["mta_sts"] == "testing"
    assert event.data["mta_sts_violations"] == [MX_NAME]


def test_no_mta_sts_policy_records_none(env: Env) -> None:
    message_id = env.message("ann@example.test")
    run(deliver(env, Receiver()))
    assert env.events(message_id, "delivered")[0].data["mta_sts"] is None


def test_mta_sts_off_ignores_the_policy(env: Env) -> None:
    message_id = env.message(f"ann@{STS_DOMAIN}")

    async def scenario() -> list[str]:
        fetched: list[str] = []

        async def fetch(domain: str) -> str:
            fetched.append(domain)
            return sts_policy("enforce", "mx.elsewhere.example")

        env.dns.set(STS_DOMAIN, "MX", ["10 " + MX_NAME])
        env.dns.set(f"_mta-sts.{STS_DOMAIN}", "TXT", ["v=STSv1; id=1"])
        receiver = Receiver()
        port = await receiver.start()
        try:
            resolver = Resolver([env.dns.nameserver])
            worker = DeliveryWorker(
                env.settings(port, mta_sts=False),
                env.db,
                MASTER,
                resolver=resolver,
                mta_sts=MtaStsCache(resolver, fetch=fetch),
            )
            await worker.run_once()
        finally:
            await receiver.stop()
            env.dns.delete(STS_DOMAIN, "MX")
            env.dns.delete(f"_mta-sts.{STS_DOMAIN}", "TXT")
        return fetched

    assert run(scenario()) == []
    assert env.recipients(message_id)[f"ann@{STS_DOMAIN}"].status == "delivered"


# -- transports and the smarthost ----------------------------------------------------------------

CLOSED_PORT = 9  # mx_port in these tests: MX delivery would fail, so success proves the route


async def deliver_via(
    env: Env, receivers: list[Receiver], make: Callable[[list[int]], Any]
) -> None:
    """Start ``receivers``; ``make(ports)`` gives the delivery settings; run the worker once."""
    ports = [await receiver.start() for receiver in receivers]
    try:
        settings = env.settings(CLOSED_PORT, **make(ports))
        worker = DeliveryWorker(settings, env.db, MASTER, connect_timeout=5)
        await worker.run_once()
    finally:
        for receiver in receivers:
            await receiver.stop()


def test_a_transport_sends_a_domain_without_mx_to_its_host_and_port(env: Env) -> None:
    message_id = env.message("ann@nomx.test", "bob@example.test")  # nomx.test: no DNS at all
    gateway, mx = Receiver(), Receiver()

    def make(ports: list[int]) -> dict[str, Any]:
        transport = {"domain": "nomx.test", "host": "127.0.0.1", "port": ports[0]}
        return {"transports": [transport]}

    run(deliver_via(env, [gateway, mx], make))

    rows = env.recipients(message_id)
    assert rows["ann@nomx.test"].status == "delivered"
    assert [m.recipients for m in gateway.messages] == [("ann@nomx.test",)]
    event = {e.recipient_id: e.data for e in env.events(message_id, "delivered")}
    assert event[rows["ann@nomx.test"].id]["transport"] == "nomx.test"
    assert event[rows["ann@nomx.test"].id]["ip"] == "127.0.0.1"
    # example.test has no transport and no smarthost: MX delivery, to the closed port
    assert rows["bob@example.test"].status == "deferred"


def test_a_wildcard_transport_by_host_name_with_required_tls(env: Env, pki: Pki) -> None:
    message_id = env.message("ann@deep.sub.corp.test", "bob@corp.test")
    gateway = Receiver(tls=pki.signed)

    async def scenario() -> None:
        port = await gateway.start()
        try:
            transport = {"domain": "*.corp.test", "host": MX_NAME, "port": port, "tls": "required"}
            settings = env.settings(CLOSED_PORT, transports=[transport])
            worker = DeliveryWorker(
                settings, env.db, MASTER, ssl_context=pki.client_context(), connect_timeout=5
            )
            await worker.run_once()
        finally:
            await gateway.stop()

    run(scenario())
    rows = env.recipients(message_id)
    assert rows["ann@deep.sub.corp.test"].status == "delivered"
    assert gateway.messages[0].tls  # required, and verified against the test CA
    data = env.events(message_id, "delivered")[0].data
    assert data["transport"] == "*.corp.test" and data["mx"] == MX_NAME
    # the pattern covers subdomains only, not corp.test itself (which has no DNS)
    assert rows["bob@corp.test"].status in ("deferred", "failed")
    assert [m.recipients for m in gateway.messages] == [("ann@deep.sub.corp.test",)]


def test_a_transport_with_tls_none_is_not_used_for_required_tls(env: Env, pki: Pki) -> None:
    """A message demanding TLS is not downgraded by a transport's ``tls = "none"``."""
    message_id = env.message("ann@nomx.test", options={"require_tls": True})
    gateway = Receiver()  # no STARTTLS

    def make(ports: list[int]) -> dict[str, Any]:
        transport = {"domain": "nomx.test", "host": "127.0.0.1", "port": ports[0], "tls": "none"}
        return {"transports": [transport]}

    run(deliver_via(env, [gateway], make))
    assert env.recipients(message_id)["ann@nomx.test"].status == "deferred"
    assert gateway.messages == []


def test_the_smarthost_receives_every_domain_without_a_transport(env: Env) -> None:
    message_id = env.message("ann@anywhere.invalid", "bob@example.test", "cat@partner.test")
    relay, partner = Receiver(), Receiver()

    def make(ports: list[int]) -> dict[str, Any]:
        return {
            "smarthost": {"host": "127.0.0.1", "port": ports[0], "tls": "opportunistic"},
            "transports": [{"domain": "partner.test", "host": "127.0.0.1", "port": ports[1]}],
        }

    run(deliver_via(env, [relay, partner], make))

    rows = env.recipients(message_id)
    assert {row.status for row in rows.values()} == {"delivered"}
    assert sorted(m.recipients[0] for m in relay.messages) == [
        "ann@anywhere.invalid",
        "bob@example.test",
    ]
    assert [m.recipients for m in partner.messages] == [("cat@partner.test",)]
    by_row = {e.recipient_id: e.data for e in env.events(message_id, "delivered")}
    assert by_row[rows["ann@anywhere.invalid"].id]["transport"] == "smarthost"
    assert by_row[rows["cat@partner.test"].id]["transport"] == "partner.test"
    assert "mta_sts" not in by_row[rows["bob@example.test"].id]  # not MX delivery


def test_a_transport_host_without_address_defers_rather_than_bounces(env: Env) -> None:
    message_id = env.message("ann@nomx.test")

    def make(ports: list[int]) -> dict[str, Any]:
        return {"transports": [{"domain": "nomx.test", "host": "gone.test", "port": ports[0]}]}

    run(deliver_via(env, [Receiver()], make))
    row = env.recipients(message_id)["ann@nomx.test"]
    assert row.status == "deferred"  # the operator's mistake, not the recipient's
    assert env.events(message_id, "deferred")[0].data["transport"] == "nomx.test"


# -- connections kept across batches ---------------------------------------------------------------


async def deliver_batches(
    env: Env,
    receiver: Receiver,
    batches: list[list[str]],
    *,
    between: Callable[[], None] | None = None,
    shaper: Shaper | None = None,
    **delivery: Any,
) -> list[str]:
    """One message and one ``run_once`` per batch; ``between`` runs after each but the last.

    Returns the message ids; idle connections are closed (QUIT) at the end.
    """
    port = await receiver.start()
    worker = DeliveryWorker(env.settings(port, **delivery), env.db, MASTER, shaper=shaper)
    ids = []
    try:
        for number, addresses in enumerate(batches):
            ids.append(env.message(*addresses))
            await worker.run_once()
            if between is not None and number < len(batches) - 1:
                between()
                await asyncio.sleep(0.05)  # the client sees the close
        return ids
    finally:
        await worker.close_idle()
        await receiver.stop()


def test_a_later_batch_reuses_the_connection_after_rset(env: Env) -> None:
    receiver = Receiver()
    run(deliver_batches(env, receiver, [["a@example.test"], ["b@example.test"]]))
    assert len(receiver.messages) == 2
    assert receiver.sessions == 1
    assert receiver.resets == 1  # the probe before the second batch


def test_idle_connections_are_quit_when_closed(env: Env) -> None:
    receiver = Receiver()
    run(deliver_batches(env, receiver, [["a@example.test"]]))
    assert receiver.sessions == 1 and receiver.closed == 1


def test_no_cache_means_a_connection_per_batch(env: Env) -> None:
    receiver = Receiver()
    batches = [["a@example.test"], ["b@example.test"]]
    run(deliver_batches(env, receiver, batches, connection_cache_seconds=0))
    assert len(receiver.messages) == 2
    assert receiver.sessions == 2 and receiver.resets == 0


def test_a_connection_the_server_dropped_while_idle_is_replaced(env: Env) -> None:
    receiver = Receiver()
    batches = [["a@example.test"], ["b@example.test"]]
    ids = run(deliver_batches(env, receiver, batches, between=receiver.drop_all))
    assert sorted(m.recipients for m in receiver.messages) == [
        ("a@example.test",),
        ("b@example.test",),
    ]
    assert receiver.sessions == 2
    # nothing deferred because of the dead connection
    assert {row.status for mid in ids for row in env.recipients(mid).values()} == {"delivered"}


def test_messages_per_connection_counts_across_batches(env: Env) -> None:
    receiver = Receiver()
    shaper = Shaper(load_rules(shaping_rules(env, per_minute=6000, per_connection=2)))
    batches = [["a@example.test"], ["b@example.test"], ["c@example.test"]]
    run(deliver_batches(env, receiver, batches, shaper=shaper))
    assert len(receiver.messages) == 3
    assert receiver.sessions == 2  # a and b on the first connection, c on a new one


@pytest.mark.parametrize(
    ("rows", "max_connections", "per_connection", "sessions"),
    [
        (25, 3, 100, 3),  # one more connection per 10 rows
        (40, 2, 100, 2),  # but never more than max_connections
        (25, 5, 100, 3),
        (9, 5, 100, 1),  # a small group keeps to one connection
        (30, 1, 10, 3),  # and messages_per_connection still caps each
    ],
)
def test_a_group_is_spread_over_its_destinations_connections(
    env: Env, rows: int, max_connections: int, per_connection: int, sessions: int
) -> None:
    rules = env.tmp_path / "spread.toml"
    rules.write_text(
        "[default]\nmax_connections = 1\nmessages_per_connection = 100\n"
        "messages_per_minute = 100000\n\n"
        f'[[rule]]\nname = "testmx"\nmx = ["*.test.example"]\n'
        f"max_connections = {max_connections}\nmessages_per_connection = {per_connection}\n"
    )
    message_id = env.message(*(f"r{n}@example.test" for n in range(rows)))
    receiver = Receiver()
    run(deliver(env, receiver, shaping_rules=rules, concurrency=10, connection_cache_seconds=0))
    assert len(receiver.messages) == rows
    assert receiver.sessions == sessions
    assert {r.status for r in env.recipients(message_id).values()} == {"delivered"}


# -- AUTH at a relay ---------------------------------------------------------------------------

RELAY_USER, RELAY_PASSWORD = "postlane@relay.test", "correct horse battery"


def relay_auth(port: int, **extra: Any) -> dict[str, Any]:
    """Settings for a relay on ``port`` with the test credentials."""
    return {"host": "127.0.0.1", "port": port, "username": RELAY_USER, **extra}


def password_in(data: object) -> bool:
    text = str(data)
    encoded = base64.b64encode(RELAY_PASSWORD.encode()).decode()
    return RELAY_PASSWORD in text or encoded in text


def test_smarthost_with_auth_plain_over_starttls(env: Env, pki: Pki) -> None:
    """Opportunistic TLS with credentials: the operator accepted that the password can be read."""
    message_id = env.message("ann@anywhere.invalid", "bob@example.test")
    relay = Receiver(tls=pki.self_signed, credentials=(RELAY_USER, RELAY_PASSWORD))

    def make(ports: list[int]) -> dict[str, Any]:
        accepted = {"tls": "opportunistic", "allow_plaintext_auth": True}
        return {"smarthost": relay_auth(ports[0], password=RELAY_PASSWORD, **accepted)}

    run(deliver_via(env, [relay], make))

    rows = env.recipients(message_id)
    assert {row.status for row in rows.values()} == {"delivered"}
    assert sorted(m.recipients[0] for m in relay.messages) == [
        "ann@anywhere.invalid",
        "bob@example.test",
    ]
    assert all(m.tls for m in relay.messages)
    # A connection per recipient domain, each authenticated once.
    assert relay.sessions == 2
    assert relay.auth_attempts == [("PLAIN", RELAY_USER, True)] * 2
    for event in env.events(message_id, "delivered"):
        assert event.data["auth"] == "PLAIN"
        assert event.data["transport"] == "smarthost"
        assert event.data["tls"] in ("TLSv1.2", "TLSv1.3")
        assert not password_in(event.data)


def test_wrong_password_at_the_relay_defers_with_the_reason(env: Env, pki: Pki) -> None:
    message_id = env.message("ann@anywhere.invalid")
    relay = Receiver(tls=pki.self_signed, credentials=(RELAY_USER, RELAY_PASSWORD))
    before = datetime.now(UTC)
    ports: list[int] = []

    def make(given: list[int]) -> dict[str, Any]:
        ports.extend(given)
        # Self-signed: unverified TLS, which the operator accepted.
        accepted = {"tls": "opportunistic", "allow_plaintext_auth": True}
        return {"smarthost": relay_auth(given[0], password="not the password", **accepted)}

    run(deliver_via(env, [relay], make))

    row = env.recipients(message_id)["ann@anywhere.invalid"]
    assert row.status == "deferred"  # the operator's mistake: never bounced
    assert row.next_attempt_at >= before + timedelta(seconds=60)
    assert row.last_reply == (
        f"authentication to 127.0.0.1:{ports[0]} failed: "
        "535 5.7.8 Authentication credentials invalid"
    )
    event = env.events(message_id, "deferred")[0]
    assert event.data["status"] == "4.7.8"  # 5.7.8, made temporary
    assert event.data["transport"] == "smarthost"
    assert relay.auth_attempts == [("PLAIN", RELAY_USER, False)]
    assert relay.messages == []
    assert env.suppressed() == {}


def test_plaintext_relay_is_not_sent_the_password_unless_allowed(env: Env) -> None:
    """Credentials without ``allow_plaintext_auth`` make TLS required: no STARTTLS, no AUTH.

    (The client's own refusal to send them without TLS, "TLS is not
    active", is tested in test_client.py: the settings no longer let a
    relay with credentials get that far without TLS.)
    """
    message_id = env.message("ann@anywhere.invalid", "cat@partner.test")
    # Neither offers STARTTLS; both offer AUTH in the clear.
    relay = Receiver(credentials=(RELAY_USER, RELAY_PASSWORD), plaintext_auth=True)
    partner = Receiver(credentials=(RELAY_USER, RELAY_PASSWORD), plaintext_auth=True)

    def make(ports: list[int]) -> dict[str, Any]:
        transport = relay_auth(
            ports[1], password=RELAY_PASSWORD, domain="partner.test", allow_plaintext_auth=True
        )
        return {
            "smarthost": relay_auth(ports[0], password=RELAY_PASSWORD),  # not allowed
            "transports": [transport],
        }

    run(deliver_via(env, [relay, partner], make))

    rows = env.recipients(message_id)
    refused = rows["ann@anywhere.invalid"]
    assert refused.status == "deferred"
    assert refused.last_reply == "127.0.0.1 did not offer STARTTLS"
    assert relay.sessions == 1 and relay.messages == []
    assert b"AUTH" not in relay.wire  # the receiver never saw an AUTH command
    assert not password_in(relay.wire)
    assert relay.wire.endswith(b"QUIT\r\n")
    # The transport allows plaintext AUTH explicitly: delivered, authenticated.
    assert rows["cat@partner.test"].status == "delivered"
    assert partner.auth_attempts == [("PLAIN", RELAY_USER, True)]
    delivered = env.events(message_id, "delivered")[0]
    assert delivered.data["auth"] == "PLAIN" and delivered.data["tls"] is None
    assert delivered.data["transport"] == "partner.test"


def test_a_relay_signed_by_a_private_ca_gets_the_password_only_with_its_ca_file(
    env: Env, pki: Pki
) -> None:
    """Credentials make TLS required; ``ca_file`` names the CA the relay's certificate needs.

    Both relays have a certificate for their host name from the test CA, as
    an internal relay has one from a company CA. The transport names that CA
    in ``ca_file`` and is sent mail after AUTH; the smarthost does not, so
    its certificate is checked against the system's CAs, fails, and the
    password is never sent (as to anyone presenting a certificate of their
    own for the relay's name).
    """
    message_id = env.message("ann@anywhere.invalid", "cat@partner.test")
    trusted = Receiver(tls=pki.signed, credentials=(RELAY_USER, RELAY_PASSWORD))
    unknown = Receiver(tls=pki.signed, credentials=(RELAY_USER, RELAY_PASSWORD))
    ca_file = env.tmp_path / "relay-ca.pem"
    ca_file.write_bytes(pki.ca_pem)

    def make(ports: list[int]) -> dict[str, Any]:
        transport = relay_auth(
            ports[0], password=RELAY_PASSWORD, domain="partner.test", ca_file=str(ca_file)
        )
        transport["host"] = MX_NAME  # the name the certificate is for
        smarthost = {**relay_auth(ports[1], password=RELAY_PASSWORD), "host": MX_NAME}
        return {"transports": [transport], "smarthost": smarthost}

    run(deliver_via(env, [trusted, unknown], make))

    rows = env.recipients(message_id)
    assert rows["cat@partner.test"].status == "delivered"
    assert trusted.auth_attempts == [("PLAIN", RELAY_USER, True)]
    assert [m.recipients for m in trusted.messages] == [("cat@partner.test",)]
    assert trusted.messages[0].tls
    delivered = env.events(message_id, "delivered")[0].data
    assert delivered["auth"] == "PLAIN" and delivered["transport"] == "partner.test"
    assert delivered["tls"] in ("TLSv1.2", "TLSv1.3")

    refused = rows["ann@anywhere.invalid"]
    assert refused.status == "deferred"
    assert refused.last_reply is not None
    assert refused.last_reply.startswith(f"certificate for {MX_NAME} is not valid")
    assert unknown.auth_attempts == [] and unknown.messages == []
    assert b"AUTH" not in unknown.wire and not password_in(unknown.wire)
    deferred = env.events(message_id, "deferred")[0].data
    assert deferred["transport"] == "smarthost" and deferred["status"] == "4.7.5"


def test_mx_delivery_records_no_auth(env: Env) -> None:
    message_id = env.message("ann@example.test")
    run(deliver(env, Receiver()))
    assert "auth" not in env.events(message_id, "delivered")[0].data


def test_a_broken_handshake_is_not_retried_in_plaintext_with_credentials(env: Env) -> None:
    """No plaintext retry after a failed handshake when credentials may not go in plaintext.

    Without credentials opportunistic TLS falls back to plaintext; with them
    (and no ``allow_plaintext_auth``) TLS is required, which is never
    downgraded: a retry could only leak the password or fail at AUTH.
    """
    message_id = env.message("ann@anywhere.invalid")
    lines: list[bytes] = []
    connections = 0

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(b"220 relay ESMTP\r\n")
        while line := await reader.readline():
            lines.append(line)
            if line.startswith(b"EHLO"):
                writer.write(b"250-relay\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n")
            elif line.startswith(b"STARTTLS"):
                writer.write(b"220 2.0.0 go ahead\r\n")
                await writer.drain()
                await reader.read(16384)  # the ClientHello, answered with plaintext
                writer.write(b"500 5.5.1 this is not TLS\r\n")
            else:
                writer.write(b"502 5.5.2 not here\r\n")
            await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(session, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        try:
            smarthost = relay_auth(port, password=RELAY_PASSWORD)
            settings = env.settings(CLOSED_PORT, smarthost=smarthost)
            await DeliveryWorker(settings, env.db, MASTER, connect_timeout=5).run_once()
        finally:
            server.close()
            await server.wait_closed()

    run(scenario())
    row = env.recipients(message_id)["ann@anywhere.invalid"]
    assert row.status == "deferred"
    assert row.last_reply is not None
    assert row.last_reply.startswith("TLS handshake with 127.0.0.1 failed")
    assert connections == 1  # no second, plaintext, connection
    assert not any(line.startswith(b"AUTH") for line in lines)


# -- X-ListOption list filtering -------------------------------------------------------------

LISTED = {
    "gone@example.test": "hard_bounce",
    "spam@example.test": "complaint",
    "unsub@example.test": "unsubscribe",
    "block@example.test": "blocklist",
    "back@example.test": "returned",
}
ALWAYS = "address is on the account's suppression list ({})"
UNSUB = "address unsubscribed (X-ListOption 32)"
BLOCK = "address is on the account's blocklist (X-ListOption 128)"
BACK = "earlier mail to this address came back (X-ListOption 512)"


@pytest.mark.parametrize(
    ("list_options", "filtered"),
    [
        ({}, {}),
        ({"remove_unsubscribed": True}, {"unsub@example.test": (UNSUB, "unsubscribe")}),
        ({"remove_blacklisted": True}, {"block@example.test": (BLOCK, "blocklist")}),
        ({"remove_bounced": True}, {"back@example.test": (BACK, "returned")}),
        (
            {"remove_unsubscribed": True, "remove_blacklisted": True, "remove_bounced": True},
            {
                "unsub@example.test": (UNSUB, "unsubscribe"),
                "block@example.test": (BLOCK, "blocklist"),
                "back@example.test": (BACK, "returned"),
            },
        ),
    ],
)
def test_list_bits_filter_only_the_lists_they_name(
    env: Env, list_options: dict[str, bool], filtered: dict[str, tuple[str, str]]
) -> None:
    for address, reason in LISTED.items():
        env.listed(address, reason)
    message_id = env.message(*LISTED, "fresh@example.test", options=list_options)
    receiver = Receiver()
    run(deliver(env, receiver))

    # the suppression list applies whatever the bits
    expected = {
        "gone@example.test": (ALWAYS.format("hard_bounce"), "hard_bounce"),
        "spam@example.test": (ALWAYS.format("complaint"), "complaint"),
        **filtered,
    }
    rows = env.recipients(message_id)
    assert {a for a, r in rows.items() if r.status == "suppressed"} == set(expected)
    assert {a for a, r in rows.items() if r.status == "delivered"} == (set(rows) - set(expected))
    by_id = {r.id: a for a, r in rows.items()}
    events = {
        by_id[e.recipient_id]: (e.data["reason"], e.data["filter"])
        for e in env.events(message_id, "suppressed")
        if e.recipient_id is not None
    }
    assert events == expected
    assert sorted(m.recipients[0] for m in receiver.messages) == sorted(set(rows) - set(expected))
    assert all(rows[a].attempts == 0 for a in expected)


def test_65536_bypasses_every_list_and_duplicates(env: Env) -> None:
    for address, reason in LISTED.items():
        env.listed(address, reason)
    everything = {
        "remove_duplicates": True,
        "remove_unsubscribed": True,
        "remove_blacklisted": True,
        "remove_bounced": True,
        "bypass_list_filters": True,
    }
    message_id = env.message(*LISTED, "GONE@example.test", options=everything)
    receiver = Receiver()
    run(deliver(env, receiver))

    with env.db.connect() as conn:
        statuses = [r.status for r in message_store.recipients_of(conn, message_id)]
    assert statuses == ["delivered"] * 6
    assert env.events(message_id, "suppressed") == []
    assert len(receiver.messages) == 6


def test_duplicates_are_sent_once_only_with_64(env: Env) -> None:
    addresses = ("ann@example.test", "Ann@Example.TEST", "bob@example.test", "ann@example.test")
    deduped = env.message(*addresses, options={"remove_duplicates": True})
    kept = env.message(*addresses)
    receiver = Receiver()
    # one row per batch: the twins of a row are filtered in later batches too
    assert run(deliver(env, receiver, lease_batch=1, rounds=9)) == [1] * 8 + [0]

    with env.db.connect() as conn:
        rows = message_store.recipients_of(conn, deduped)
        plain = message_store.recipients_of(conn, kept)
    assert [r.status for r in rows] == ["delivered", "suppressed", "delivered", "suppressed"]
    assert [r.status for r in plain] == ["delivered"] * 4
    events = env.events(deduped, "suppressed")
    assert [e.recipient_id for e in events] == [rows[1].id, rows[3].id]
    assert {(e.data["reason"], e.data["filter"]) for e in events} == {
        ("duplicate recipient of this message", "duplicate")
    }
    assert len(receiver.messages) == 2 + 4


def test_a_duplicate_of_a_suppressed_address_is_reported_as_a_duplicate(env: Env) -> None:
    env.listed("gone@example.test", "hard_bounce")
    message_id = env.message(
        "gone@example.test", "gone@example.test", options={"remove_duplicates": True}
    )
    run(deliver(env, Receiver()))

    reasons = [e.data["reason"] for e in env.events(message_id, "suppressed")]
    assert reasons == [ALWAYS.format("hard_bounce"), "duplicate recipient of this message"]


def test_an_expired_recipient_is_returned_and_512_then_filters_it(env: Env) -> None:
    first = env.message("slow@example.test", expires_in=timedelta(seconds=30))
    receiver = Receiver(replies={"slow@example.test": p.Reply(450, "4.2.0", ("Busy",))})
    run(deliver(env, receiver))
    assert env.recipients(first)["slow@example.test"].status == "expired"
    assert env.suppressed() == {"slow@example.test": "returned"}

    asks = env.message("slow@example.test", options={"remove_bounced": True})
    plain = env.message("slow@example.test")
    receiver = Receiver()
    run(deliver(env, receiver))
    assert env.recipients(asks)["slow@example.test"].status == "suppressed"
    assert env.events(asks, "suppressed")[0].data["reason"] == BACK
    assert env.recipients(plain)["slow@example.test"].status == "delivered"


def test_a_hard_bounce_replaces_a_returned_entry(env: Env) -> None:
    env.listed("gone@example.test", "returned", "550 5.7.1 policy")
    message_id = env.message("gone@example.test", options={"bypass_list_filters": True})
    receiver = Receiver(replies={"gone@example.test": p.Reply(550, "5.1.1", ("No such user",))})
    run(deliver(env, receiver))

    assert env.recipients(message_id)["gone@example.test"].status == "failed"
    assert env.suppressed() == {"gone@example.test": "hard_bounce"}


# -- X-JobOption 128: archived copies ------------------------------------------------------------


def test_archive_keeps_each_recipients_copy_as_sent(env: Env) -> None:
    from postlane.store.archive import archived_copies_of

    kept = env.message("ann@example.test", "bob@example.test", options={"archive_copy": True})
    plain = env.message("carl@example.test")
    receiver = Receiver()
    run(deliver(env, receiver))

    with env.db.connect() as conn:
        copies = archived_copies_of(conn, kept)
        assert archived_copies_of(conn, plain) == []
    received = {m.recipients[0]: m.data for m in receiver.messages}
    assert {c.address: c.data for c in copies} == {
        "ann@example.test": received["ann@example.test"],
        "bob@example.test": received["bob@example.test"],
    }
    rows = env.recipients(kept)
    assert {c.recipient_id for c in copies} == {rows[a].id for a in rows}


def test_archive_in_test_mode_keeps_the_copy_that_was_not_sent(env: Env) -> None:
    from postlane.store.archive import archived_copies_of

    message_id = env.message("ann@example.test", options={"archive_copy": True, "test_mode": True})
    receiver = Receiver()
    run(deliver(env, receiver))

    assert receiver.messages == []
    with env.db.connect() as conn:
        (copy,) = archived_copies_of(conn, message_id)
    assert dkim.verify(copy.data, dnsfunc=env.dkim_dns())
    assert env.events(message_id, "delivered")[0].data["size"] == len(copy.data)


# -- lease renewal -------------------------------------------------------------------------------


def test_a_row_taken_back_while_in_flight_here_is_not_sent_twice(env: Env) -> None:
    """Another worker's sweep took the row while this one sent it; it was leased and sent again."""
    message_id = env.message("ann@example.test")

    def row() -> queue.QueueRow:
        with env.db.connect() as conn:
            (found,) = [r for r in queue.list_queue(conn) if r.message_id == message_id]
        return found

    async def scenario() -> Receiver:
        receiver = Receiver(greeting_delay=1.5)
        port = await receiver.start()
        worker = DeliveryWorker(env.settings(port, poll_interval=0.05), env.db, MASTER)
        await worker.start()
        try:
            for _ in range(100):
                if row().status == "sending":
                    break
                await asyncio.sleep(0.02)
            # what a sweep elsewhere does to a lease it thinks ran out
            with env.db.begin() as conn:
                conn.execute(
                    sa.update(recipients)
                    .where(recipients.c.message_id == message_id)
                    .values(
                        status="deferred",
                        next_attempt_at=datetime.now(UTC) - timedelta(seconds=1),
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                )
            for _ in range(150):
                if row().status == "delivered":
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)  # room for a second copy, if one were on its way
        finally:
            await worker.stop()
            await receiver.stop()
        return receiver

    receiver = run(scenario())
    assert len(receiver.messages) == 1
    assert row().status == "delivered"


def test_leases_of_rows_in_flight_are_renewed(env: Env) -> None:
    """A receiver slower than a third of the lease: the lease moves forward while it waits."""
    message_id = env.message("ann@example.test")
    seen: list[datetime] = []

    def lease_expiry() -> datetime | None:
        with env.db.connect() as conn:
            (row,) = [r for r in queue.list_queue(conn) if r.message_id == message_id]
        return row.lease_expires_at

    async def scenario() -> None:
        receiver = Receiver(greeting_delay=6.0)
        port = await receiver.start()
        worker = DeliveryWorker(
            env.settings(port, poll_interval=0.05, lease_seconds=10), env.db, MASTER
        )
        await worker.start()
        try:
            for _ in range(100):
                first = lease_expiry()
                if first is not None:
                    seen.append(first)
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(5.0)  # renewal every 10/3 s; the banner comes at 6 s
            later = lease_expiry()
            assert later is not None
            seen.append(later)
            for _ in range(100):
                if receiver.messages:
                    break
                await asyncio.sleep(0.05)
        finally:
            await worker.stop()
            await receiver.stop()

    run(scenario())
    assert len(seen) == 2 and seen[1] >= seen[0] + timedelta(seconds=3)
    assert env.recipients(message_id)["ann@example.test"].status == "delivered"


# -- how many MX addresses and sessions one attempt may use ---------------------------------------


@contextlib.contextmanager
def mx_hosts(env: Env, domain: str, addresses: dict[str, list[str]]) -> Iterator[None]:
    """``domain``'s MX hosts (preference 10, 20, ... in the given order) and their addresses."""
    mx = [f"{10 * (i + 1)} {host}" for i, host in enumerate(addresses)]
    env.dns.set(domain, "MX", mx)
    for host, values in addresses.items():
        env.dns.set(host, "A", values)
    try:
        yield
    finally:
        env.dns.delete(domain, "MX")
        for host in addresses:
            env.dns.delete(host, "A")


def test_an_attempt_tries_at_most_five_addresses_of_hosts_that_refuse(env: Env) -> None:
    """The recipient's DNS chose them: 300 hosts of 16 addresses each were all tried."""
    message_id = env.message("ann@refusing.test")
    hosts = {f"mx{h}.refusing.test": [f"127.0.{h}.{a}" for a in range(1, 4)] for h in range(4)}
    tried: list[tuple[str, str]] = []

    async def scenario() -> None:
        receiver = Receiver()
        port = await receiver.start()
        await receiver.stop()  # nothing listens on the port any more: every connect is refused
        worker = DeliveryWorker(env.settings(port), env.db, MASTER, connect_timeout=5)
        real_open = worker._open

        async def counting_open(address: str, mx: str, *args: Any, **kwargs: Any) -> Any:
            tried.append((mx, address))
            return await real_open(address, mx, *args, **kwargs)

        worker._open = counting_open  # type: ignore[method-assign]
        await worker.run_once()

    with mx_hosts(env, "refusing.test", hosts):
        run(scenario())
    assert worker_module.MX_ADDRESS_LIMIT == 5
    assert tried == [
        ("mx0.refusing.test", "127.0.0.1"),
        ("mx0.refusing.test", "127.0.0.2"),
        ("mx0.refusing.test", "127.0.0.3"),
        ("mx1.refusing.test", "127.0.1.1"),
        ("mx1.refusing.test", "127.0.1.2"),
    ]
    row = env.recipients(message_id)["ann@refusing.test"]
    assert row.status == "deferred"
    assert row.last_reply is not None and "refused" in row.last_reply


def test_an_attempt_opens_at_most_two_sessions_that_fail(env: Env) -> None:
    """Postfix's smtp_mx_session_limit: hosts that answer but refuse count separately."""
    message_id = env.message("ann@refusing.test")
    hosts = {f"mx{h}.refusing.test": ["127.0.0.1"] for h in range(4)}
    receiver = Receiver(refusal=b"554 5.7.1 No SMTP service here\r\n")
    with mx_hosts(env, "refusing.test", hosts):
        assert run(deliver(env, receiver)) == [1]
    assert worker_module.MX_SESSION_LIMIT == 2
    assert receiver.sessions == 2
    row = env.recipients(message_id)["ann@refusing.test"]
    assert row.status == "deferred"
    assert row.last_reply is not None and "No SMTP service here" in row.last_reply
