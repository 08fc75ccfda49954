"""The session driver on a fake transport: STARTTLS, and a message intake cannot take.

asyncio's own loop may hand the first decrypted bytes (the client's EHLO after
the handshake) to the protocol before start_tls() has returned; those bytes
must reach the engine, not be dropped (start_tls() is faked for that).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from postlane.config import ListenerSettings, Settings, SmtpSettings
from postlane.errors import MessageRejected
from postlane.intake import pipeline
from postlane.intake.committer import CommitResult
from postlane.smtp import protocol
from postlane.smtp.authenticator import AuthResult
from postlane.smtp.server import ListenerContext, PendingCommits, SmtpServer, SmtpSession, _logfmt
from postlane.tenants.directory import TenantSnapshot


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.10", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeDirectory:
    snapshot = TenantSnapshot()


POLICY = protocol.SessionPolicy(
    hostname="mail.postlane.test", starttls_available=True, auth_required=False
)
COMMAND_TIMEOUT, DATA_TIMEOUT = 60, 600


def _listener(
    *,
    policy: protocol.SessionPolicy = POLICY,
    settings: ListenerSettings | None = None,
    **options: Any,
) -> ListenerContext:
    return ListenerContext(
        name="test",
        settings=settings or ListenerSettings(port=2525, tls="starttls", submission=False),
        policy=policy,
        limits=pipeline.IntakeLimits("mail.postlane.test", 25, timedelta(days=3)),
        command_timeout=COMMAND_TIMEOUT,
        data_timeout=DATA_TIMEOUT,
        **options,
    )


def _session(
    *,
    policy: protocol.SessionPolicy = POLICY,
    settings: ListenerSettings | None = None,
    directory: Any = None,
    authenticator: Any = None,
    committer: Any = None,
    listener: ListenerContext | None = None,
) -> SmtpSession:
    class Tls:
        context = object()

    return SmtpSession(
        listener or _listener(policy=policy, settings=settings),
        directory or FakeDirectory(),
        authenticator,
        committer,
        Tls(),  # type: ignore[arg-type]
        lambda session: None,
    )


def _replies(transport: FakeTransport) -> list[bytes]:
    return bytes(transport.written).split(b"\r\n")[:-1]


def test_bytes_decrypted_before_start_tls_returns_are_not_lost() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        session = _session()
        plain, secure = FakeTransport(), FakeTransport()

        async def start_tls(transport: Any, proto: Any, context: Any, **kwargs: Any) -> Any:
            proto.data_received(b"EHLO after-tls.example\r\n")  # arrives early
            return secure

        loop.start_tls = start_tls  # type: ignore[method-assign]
        session.connection_made(plain)  # type: ignore[arg-type]
        session.data_received(b"EHLO before.example\r\nSTARTTLS\r\n")
        for _ in range(5):
            await asyncio.sleep(0)
        return bytes(plain.written), bytes(secure.written)

    plain, secure = asyncio.run(scenario())
    assert b"220 2.0.0" in plain  # ready to start TLS
    assert secure.startswith(b"250-mail.postlane.test")  # the early EHLO was answered
    assert b"STARTTLS" not in secure  # and no longer offered inside TLS


def test_plaintext_after_starttls_is_not_executed() -> None:
    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        session = _session()
        plain, secure = FakeTransport(), FakeTransport()

        async def start_tls(transport: Any, proto: Any, context: Any, **kwargs: Any) -> Any:
            return secure

        loop.start_tls = start_tls  # type: ignore[method-assign]
        session.connection_made(plain)  # type: ignore[arg-type]
        # RFC 3207 injection: a command pipelined behind STARTTLS in plaintext
        session.data_received(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@example.net>\r\n")
        for _ in range(5):
            await asyncio.sleep(0)
        return bytes(plain.written) + bytes(secure.written)

    written = asyncio.run(scenario())
    assert b"2.1.0" not in written  # the injected MAIL got no answer


def test_a_fault_in_intake_is_a_temporary_failure_and_the_session_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug that escapes intake must not drop the connection without a reply.

    Before, such an exception left data_received() and asyncio closed the
    connection mid-transaction; the client saw a lost connection and no reason.
    """

    def broken(self: SmtpSession, *args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(SmtpSession, "_build", broken)
    monkeypatch.setattr(SmtpSession, "_rcpt", lambda self, event: None)  # no relay check

    async def scenario() -> FakeTransport:
        session = _session()
        transport = FakeTransport()
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(
            b"EHLO x\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        )
        session.data_received(b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
        for _ in range(5):
            await asyncio.sleep(0)
        return transport

    transport = asyncio.run(scenario())
    replies = bytes(transport.written).split(b"\r\n")
    assert b"451 4.3.0 Local error in processing, try again later" in replies
    assert replies[-2].startswith(b"250 2.0.0")  # NOOP: the session goes on
    assert not transport.closed


class BounceDirectory:
    """Two accounts, each with its own bounce domain."""

    snapshot = TenantSnapshot(
        domains={
            1: (SimpleNamespace(account_id=1, name="acme.com", return_path_subdomain="bounce"),),
            2: (SimpleNamespace(account_id=2, name="other.com", return_path_subdomain="bounce"),),
        },  # type: ignore[dict-item]
        bounce_domains=frozenset({"bounce.acme.com", "bounce.other.com"}),
    )


@pytest.mark.parametrize(
    "abandoned",
    [
        b"BDAT 500 LAST\r\n" + b"z" * 500,
        b"DATA\r\n" + b"z" * 500 + b"\r\n.\r\n",
        b"BDAT x\r\n",
    ],
)
def test_a_transaction_the_engine_abandons_leaves_nothing_behind(abandoned: bytes) -> None:
    """The bounce account of the first transaction once refused the second's recipient.

    The engine ended the transaction by itself (a message over the limit, a
    bad BDAT) and the session kept its envelope state and the data timeout.
    """

    async def scenario() -> tuple[SmtpSession, FakeTransport, float]:
        session = _session(
            policy=replace(POLICY, max_message_size=100), directory=BounceDirectory()
        )
        transport = FakeTransport()
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(
            b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<x@bounce.acme.com>\r\n" + abandoned
        )
        assert _replies(transport)[-1].startswith((b"552 5.3.4", b"501 5.5.4"))
        limit = session._limit()
        session.data_received(b"MAIL FROM:<>\r\nRCPT TO:<y@bounce.other.com>\r\n")
        return session, transport, limit

    session, transport, limit = asyncio.run(scenario())
    assert _replies(transport)[-2:] == [b"250 2.1.0 Ok", b"250 2.1.5 Ok"]
    assert session.bounce_account == 2
    assert limit == COMMAND_TIMEOUT  # the data timeout ended with the transaction


def test_a_refused_mail_from_starts_no_transaction() -> None:
    """The data timeout applied after a refused MAIL, with no transaction to wait for."""

    async def scenario() -> tuple[SmtpSession, FakeTransport]:
        session = _session()
        transport = FakeTransport()
        session.connection_made(transport)  # type: ignore[arg-type]
        account = SimpleNamespace(id=1, smtp_enabled=False)
        session.sender = SimpleNamespace(account=account, user=None)  # type: ignore[assignment]
        session.data_received(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\n")
        return session, transport

    session, transport = asyncio.run(scenario())
    assert _replies(transport)[-1].startswith(b"550 5.7.1")
    assert session._limit() == COMMAND_TIMEOUT


class RecordingAuthenticator:
    """Says no to every password, and notes which ones it was asked about."""

    def __init__(self) -> None:
        self.checked: list[tuple[str, str]] = []

    def quick(self, ip: str, username: str, password: str) -> AuthResult | None:
        if password:
            self.checked.append((username, password))
            return AuthResult("invalid")
        return None


def _auth_plain(message: str) -> tuple[list[bytes], list[tuple[str, str]]]:
    authenticator = RecordingAuthenticator()

    async def scenario() -> FakeTransport:
        session = _session(
            policy=replace(POLICY, allow_plaintext_auth=True), authenticator=authenticator
        )
        transport = FakeTransport()
        session.connection_made(transport)  # type: ignore[arg-type]
        response = base64.b64encode(message.encode())
        session.data_received(b"EHLO x\r\nAUTH PLAIN " + response + b"\r\n")
        return transport

    return _replies(asyncio.run(scenario())), authenticator.checked


def test_auth_plain_as_somebody_else_is_refused_like_a_wrong_password() -> None:
    """RFC 4616: act as the authzid or fail; this logged in as the authcid."""
    replies, checked = _auth_plain("admin\0u\0secret")
    assert replies[-1] == b"535 5.7.8 Authentication credentials invalid"
    assert checked == []


@pytest.mark.parametrize("authzid", ["", "u", "U"])
def test_auth_plain_as_oneself_is_checked(authzid: str) -> None:
    replies, checked = _auth_plain(f"{authzid}\0u\0secret")
    assert replies[-1] == b"535 5.7.8 Authentication credentials invalid"
    assert checked == [("u", "secret")]


def _v2_header(tlv_length: int) -> bytes:
    body = (
        ipaddress.ip_address("203.0.113.7").packed
        + ipaddress.ip_address("198.51.100.2").packed
        + struct.pack("!HH", 40000, 25)
        + b"\x04"  # PP2_TYPE_NOOP
        + struct.pack("!H", tlv_length)
        + bytes(tlv_length)
    )
    return b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + struct.pack("!H", len(body)) + body


def test_a_long_proxy_v2_header_is_read_however_tcp_splits_it() -> None:
    """A 631-byte header was taken in one read and refused as too long in two."""
    header = _v2_header(600)
    assert len(header) == 631
    stream = header + b"EHLO x\r\n"

    async def scenario() -> list[tuple[int, str, bool, list[bytes]]]:
        results = []
        for cut in range(1, len(stream)):
            session = _session(
                settings=ListenerSettings(
                    port=2525, proxy_protocol=True, proxy_trusted_networks=["192.0.2.0/28"]
                )
            )
            transport = FakeTransport()
            session.connection_made(transport)  # type: ignore[arg-type]
            session.data_received(stream[:cut])
            session.data_received(stream[cut:])
            replies = _replies(transport)
            results.append((cut, session.client_ip, transport.closed, replies[:2]))
        return results

    for cut, client_ip, closed, replies in asyncio.run(scenario()):
        assert (client_ip, closed) == ("203.0.113.7", False), cut
        assert replies == [b"220 mail.postlane.test ESMTP Postlane", b"250-mail.postlane.test"]


@pytest.mark.parametrize(
    ("networks", "read"),
    [(["192.0.2.10"], True), (["192.0.2.11"], False), (["198.51.100.0/24"], False)],
)
def test_only_the_named_balancers_may_send_a_proxy_header(networks: list[str], read: bool) -> None:
    """A client reaching the port directly named any address, a trusted network's too."""
    settings = ListenerSettings(port=2525, proxy_protocol=True, proxy_trusted_networks=networks)

    async def scenario() -> tuple[SmtpSession, FakeTransport]:
        session = _session(settings=settings)
        transport = FakeTransport()
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(_v2_header(0) + b"EHLO x\r\n")
        return session, transport

    session, transport = asyncio.run(scenario())
    if read:
        assert session.client_ip == "203.0.113.7"
        assert not transport.closed
    else:
        assert session.client_ip == "192.0.2.10"
        assert transport.closed
        assert _replies(transport) == []
        assert session.close_reason == "PROXY listener: peer not in proxy_trusted_networks"


@pytest.mark.parametrize("authenticated", [False, True])
def test_rcpt_to_postmaster_without_a_domain_is_refused_saying_why(authenticated: bool) -> None:
    """RFC 5321's domain-less <Postmaster> was queued for a domain named "postmaster"
    (authenticated) or refused as relaying (not)."""

    async def scenario() -> FakeTransport:
        session = _session(directory=BounceDirectory())
        transport = FakeTransport()
        session.connection_made(transport)  # type: ignore[arg-type]
        if authenticated:
            account = SimpleNamespace(id=1, smtp_enabled=True, unauthorised_sender_policy="alert")
            session.sender = SimpleNamespace(account=account, user=None)  # type: ignore[assignment]
            session._directory = SimpleNamespace(  # type: ignore[assignment]
                snapshot=SimpleNamespace(accounts={})
            )
        session.data_received(b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n")
        return transport

    transport = asyncio.run(scenario())
    assert _replies(transport)[-1] == (
        b"550 5.1.1 <postmaster> needs a domain here: this server keeps no mailboxes"
    )


# -- credentials revoked during a session ------------------------------------------------------


def _tenants(**user_changes: Any) -> TenantSnapshot:
    """Account 1 with SMTP user "app1" (id 7), as changed by ``user_changes``."""
    account = SimpleNamespace(
        id=1,
        name="acme",
        smtp_enabled=True,
        unauthorised_sender_policy="alert",
        track_opens=False,
        track_clicks=False,
        default_options={},
    )
    fields: dict[str, Any] = {
        "id": 7,
        "account_id": 1,
        "username": "app1",
        "password_hash": "hash-1",
        "active": True,
        "default_options": {},
        "authorised_domains": (),
        "authorised_senders": (),
    }
    user = SimpleNamespace(**(fields | user_changes))
    return TenantSnapshot(
        accounts={1: account},  # type: ignore[dict-item]
        users={user.username.lower(): user},  # type: ignore[dict-item]
    )


class SwappableDirectory:
    def __init__(self, snapshot: TenantSnapshot) -> None:
        self.snapshot = snapshot


class AcceptingAuthenticator:
    """Says yes to app1, as the user is in the directory's snapshot at the time."""

    def __init__(self, directory: SwappableDirectory) -> None:
        self._directory = directory

    def quick(self, ip: str, username: str, password: str) -> AuthResult | None:
        return AuthResult("ok", self._directory.snapshot.users["app1"])


def _mail_after_change(new: TenantSnapshot | None) -> tuple[list[bytes], bool]:
    """AUTH, one MAIL, RSET; the tenants change to ``new``; NOOP and MAIL again."""
    directory = SwappableDirectory(_tenants())

    async def scenario() -> FakeTransport:
        session = _session(
            policy=replace(POLICY, allow_plaintext_auth=True),
            directory=directory,
            authenticator=AcceptingAuthenticator(directory),
        )
        transport = FakeTransport()
        session.connection_made(transport)  # type: ignore[arg-type]
        token = base64.b64encode(b"\0app1\0secret")
        session.data_received(
            b"EHLO x\r\nAUTH PLAIN " + token + b"\r\nMAIL FROM:<a@acme.com>\r\nRSET\r\n"
        )
        assert _replies(transport)[-3:] == [
            b"235 2.7.0 Authentication successful",
            b"250 2.1.0 Ok",
            b"250 2.0.0 Ok",
        ]
        if new is not None:
            directory.snapshot = new
        session.data_received(b"NOOP\r\nMAIL FROM:<a@acme.com>\r\n")
        return transport

    transport = asyncio.run(scenario())
    return _replies(transport)[3:], transport.closed


REVOKED = b"421 4.7.0 Credentials changed or revoked, log in again"


@pytest.mark.parametrize(
    "change",
    [
        {"password_hash": "hash-2"},  # smtp-user reset-password
        {"active": False},  # smtp-user disable
        {"username": "renamed"},  # gone under its name
        {"id": 8},  # deleted, and somebody else now has the name
        {"account_id": 2},  # moved to another account
    ],
)
def test_a_session_ends_when_its_credentials_change(change: dict[str, Any]) -> None:
    """An AUTHed session kept sending after its password was reset (with NOOPs, forever)."""
    replies, closed = _mail_after_change(_tenants(**change))
    assert replies[-1] == REVOKED
    assert closed


@pytest.mark.parametrize("new", [None, "same", "other"])
def test_a_session_goes_on_while_its_credentials_stand(new: str | None) -> None:
    """The same snapshot, an equal one rebuilt, or one where only unrelated things changed."""
    snapshot = {None: None, "same": _tenants(), "other": _tenants(note="changed")}[new]
    replies, closed = _mail_after_change(snapshot)
    assert replies[-1] == b"250 2.1.0 Ok"
    assert not closed


# -- bounds: the commit deadline, bytes waiting for commits, connections -------------------------

ENVELOPE = b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
DEFERRED = b"451 4.3.0 Temporary storage failure, try again later"
NO_STORAGE = b"452 4.3.1 Insufficient system storage, try again later"


def _body(size: int = 0) -> bytes:
    return b"Subject: x\r\n\r\n" + b"y" * size + b"\r\n.\r\n"


class HeldCommitter:
    """Answers a commit only when the test says so; notes the waits given up."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[CommitResult]] = {}
        self.given_up: list[str] = []
        self.closed_with: float | None = None

    async def open(self) -> None:
        pass

    async def close(self, grace: float = 30.0) -> None:
        self.closed_with = grace

    async def commit(self, message: Any) -> CommitResult:
        future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self.waiting[message.id] = future
        try:
            return await future
        except asyncio.CancelledError:
            del self.waiting[message.id]
            self.given_up.append(message.id)
            raise

    def answer_all(self) -> None:
        for queue_id, future in list(self.waiting.items()):
            future.set_result(CommitResult(queue_id))
        self.waiting.clear()


@pytest.fixture
def any_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every recipient and message is taken as it is: these tests are about what follows."""
    monkeypatch.setattr(SmtpSession, "_rcpt", lambda self, event: None)
    monkeypatch.setattr(
        SmtpSession,
        "_build",
        lambda self, event, queue_id, now: SimpleNamespace(id=queue_id, raw=event.data),
    )


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _connected(session: SmtpSession) -> FakeTransport:
    transport = FakeTransport()
    session.connection_made(transport)  # type: ignore[arg-type]
    session.data_received(b"EHLO x\r\n")
    return transport


def test_a_commit_that_never_answers_gets_451_at_the_deadline_and_one_error_line(
    any_message: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A stuck commit process kept every session waiting after DATA, for ever and silently."""
    committer = HeldCommitter()

    async def scenario() -> tuple[list[bytes], float]:
        session = _session(committer=committer, listener=_listener(commit_timeout=1.0))
        transport = _connected(session)
        started = time.monotonic()
        for n in (1, 2):
            session.data_received(ENVELOPE + _body())
            await until(lambda n=n: _replies(transport).count(DEFERRED) == n)  # type: ignore[misc]
        elapsed = time.monotonic() - started
        session.data_received(ENVELOPE + _body())  # the commit process answers again
        await until(lambda: bool(committer.waiting))
        committer.answer_all()
        await until(lambda: _replies(transport)[-1].startswith(b"250 2.0.0 Ok: queued as"))
        return _replies(transport), elapsed

    with caplog.at_level(logging.INFO, "postlane.smtp"):
        replies, elapsed = asyncio.run(scenario())
    assert elapsed < 10  # two deadlines of 1 s, generously
    assert replies.count(DEFERRED) == 2
    assert len(committer.given_up) == 2  # the session stopped waiting for both
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors  # once per stall, not once per message
    assert "commit not answered in 1 s (smtp.commit_timeout)" in errors[0]
    assert f"queue_id={committer.given_up[0]}" in errors[0]
    assert "commits are answered again after a stall" in caplog.text
    assert "2 message(s) got 451 4.3.0 meanwhile" in caplog.text


def test_bytes_waiting_for_commits_are_bounded_with_452_4_3_1(
    any_message: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages waiting for a stopped commit process once filled the intake process's memory."""
    committer = HeldCommitter()
    pending = PendingCommits(1000)

    async def scenario() -> tuple[list[bytes], list[bytes], list[bytes]]:
        first, second, third = (
            _session(committer=committer, listener=_listener(pending=pending)) for _ in range(3)
        )
        one, two, three = _connected(first), _connected(second), _connected(third)
        first.data_received(ENVELOPE + _body(400))
        await until(lambda: len(committer.waiting) == 1)
        assert 400 < pending.bytes < 1000
        second.data_received(ENVELOPE + _body(600))  # would go above the limit
        await until(lambda: _replies(two)[-1] == NO_STORAGE)
        committer.answer_all()
        await until(lambda: _replies(one)[-1].startswith(b"250 2.0.0"))
        assert pending.bytes == 0
        third.data_received(ENVELOPE + _body(2000))  # nothing else waits: alone, it may
        await until(lambda: len(committer.waiting) == 1)
        assert pending.full
        second.data_received(b"MAIL FROM:<a@example.net>\r\n")  # no room: refused before data
        await until(lambda: _replies(two).count(NO_STORAGE) == 2)
        committer.answer_all()
        await until(lambda: _replies(three)[-1].startswith(b"250 2.0.0"))
        assert pending.bytes == 0
        second.data_received(ENVELOPE + _body(600))
        await until(lambda: bool(committer.waiting))
        committer.answer_all()
        await until(lambda: _replies(two)[-1].startswith(b"250 2.0.0"))
        return _replies(one), _replies(two), _replies(three)

    with caplog.at_level(logging.INFO, "postlane.smtp"):
        one, two, three = asyncio.run(scenario())
    assert one[-1].startswith(b"250 2.0.0") and three[-1].startswith(b"250 2.0.0")
    assert two[-7:-4] == [
        b"354 End data with <CR><LF>.<CR><LF>",
        NO_STORAGE,  # the end of DATA
        NO_STORAGE,  # MAIL, while the limit was reached
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "smtp.max_pending_bytes" in warnings[0]


FORGED = "bad \x1b[2J From\r\n2026-01-01 INFO postlane.smtp session=FAKE user=admin result=accepted"
#: How a key=value (logfmt) reader splits a line: quoted values are one value.
_LOGFMT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def test_client_text_in_a_rejection_line_is_escaped_and_quoted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A header quoted in a rejection wrote an ESC to the log, and forged fields after reply=."""

    def rejecting(self: SmtpSession, *args: Any) -> Any:
        raise MessageRejected(550, "5.7.1", FORGED)

    monkeypatch.setattr(SmtpSession, "_build", rejecting)
    monkeypatch.setattr(SmtpSession, "_rcpt", lambda self, event: None)

    async def scenario() -> SmtpSession:
        session = _session()
        _connected(session).written.clear()
        session.data_received(ENVELOPE + _body())
        return session

    with caplog.at_level(logging.INFO, "postlane.smtp"):
        session = asyncio.run(scenario())
    (line,) = [r.getMessage() for r in caplog.records if "result=rejected" in r.getMessage()]
    assert not any(c in line for c in "\x1b\r\n")
    fields = dict(_LOGFMT_FIELD.findall(line))
    assert fields["session"] == session.session_id
    assert (fields["user"], fields["result"]) == ("-", "rejected")
    assert fields["reply"] == (
        '"550 5.7.1 bad \\x1b[2J From\\x0d\\x0a2026-01-01 INFO postlane.smtp '
        'session=FAKE user=admin result=accepted"'
    )


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        ("06H128T156RFZY4P", "06H128T156RFZY4P"),
        ("app1@acme.com", "app1@acme.com"),
        ("", '""'),
        ("TLSv1.3 TLS_AES_256_GCM_SHA384", '"TLSv1.3 TLS_AES_256_GCM_SHA384"'),
        ("user=admin", '"user=admin"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a\\b", '"a\\\\b"'),
        ("\x1b[31m\x07\x7f\x9b", '"\\x1b[31m\\x07\\x7f\\x9b"'),
        ("line\u2028two\u202e", '"line\\u2028two\\u202e"'),
        ("Jürgen", '"Jürgen"'),
    ],
)
def test_log_values_are_bare_only_when_a_reader_cannot_misread_them(
    value: str, logged: str
) -> None:
    assert _logfmt(value) == logged


class IdleDirectory(FakeDirectory):
    def reload(self) -> None:
        pass

    async def run(self) -> None:
        await asyncio.Event().wait()


def _server(committer: HeldCommitter, tmp_path: Path, **smtp: Any) -> SmtpServer:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    settings = Settings(
        hostname="mail.postlane.test",
        data_dir=tmp_path,
        database_url="sqlite:///unused.db",
        smtp=SmtpSettings(
            listeners=[
                ListenerSettings(address="127.0.0.1", port=port, tls="none", submission=False)
            ],
            **smtp,
        ),
    )

    class Tls:
        context = None

    return SmtpServer(settings, IdleDirectory(), None, committer, Tls())  # type: ignore[arg-type]


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("POSTLANE_"):
            monkeypatch.delenv(key)


def test_a_connection_above_max_connections_gets_421_and_is_closed(
    no_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = _server(HeldCommitter(), tmp_path, max_connections=2)
    port = server._settings.smtp.listeners[0].port

    async def greeting() -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return await asyncio.wait_for(reader.readline(), 5), reader, writer

    async def scenario() -> tuple[list[bytes], bytes, bytes]:
        await server.start()
        try:
            opened = [await greeting() for _ in range(2)]
            refused, reader, writer = await greeting()
            after_refusal = await asyncio.wait_for(reader.read(), 5)  # closed by the server
            writer.close()
            opened[0][2].close()  # one leaves: there is room again
            await until(lambda: len(server._open_sessions()) < 2)
            again, _, writer = await greeting()
            writer.close()
            for _, _, other in opened[1:]:
                other.close()
            return [line for line, _, _ in opened] + [again], refused, after_refusal
        finally:
            await server.stop()

    with caplog.at_level(logging.WARNING, "postlane.smtp"):
        greetings, refused, after_refusal = asyncio.run(scenario())
    assert all(g.startswith(b"220 mail.postlane.test") for g in greetings)
    assert refused == b"421 4.7.0 Too many connections, try again later\r\n"
    assert after_refusal == b""
    assert "has 2 connections (smtp.max_connections)" in caplog.text


def test_stop_waits_for_a_commit_no_longer_than_its_deadline(
    no_env: None, tmp_path: Path, any_message: None
) -> None:
    """Shutdown waited 30 s for sessions, then for ever for the commit process to answer."""
    committer = HeldCommitter()
    server = _server(committer, tmp_path, commit_timeout=1.0)
    port = server._settings.smtp.listeners[0].port

    async def scenario() -> tuple[bytes, float]:
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"EHLO x\r\n" + ENVELOPE + _body())
        await until(lambda: bool(committer.waiting))
        started = time.monotonic()
        await server.stop()
        stopped_in = time.monotonic() - started
        replies = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return replies, stopped_in

    replies, stopped_in = asyncio.run(scenario())
    assert stopped_in < 10  # the deadline of 1 s and a second, generously
    assert committer.closed_with is not None and committer.closed_with <= 2.0
    assert DEFERRED in replies  # the session got its answer before the server went
    assert replies.endswith(b"421 4.3.2 Service shutting down, try again later\r\n")
