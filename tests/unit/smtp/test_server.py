"""The session driver on a fake transport: STARTTLS, and a message intake cannot take.

asyncio's own loop may hand the first decrypted bytes (the client's EHLO after
the handshake) to the protocol before start_tls() has returned; those bytes
must reach the engine, not be dropped (start_tls() is faked for that).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import struct
from dataclasses import replace
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from postlane.config import ListenerSettings
from postlane.intake import pipeline
from postlane.smtp import protocol
from postlane.smtp.authenticator import AuthResult
from postlane.smtp.server import ListenerContext, SmtpSession
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


def _session(
    *,
    policy: protocol.SessionPolicy = POLICY,
    settings: ListenerSettings | None = None,
    directory: Any = None,
    authenticator: Any = None,
) -> SmtpSession:
    listener = ListenerContext(
        name="test",
        settings=settings or ListenerSettings(port=2525, tls="starttls", submission=False),
        policy=policy,
        limits=pipeline.IntakeLimits("mail.postlane.test", 25, timedelta(days=3)),
        command_timeout=COMMAND_TIMEOUT,
        data_timeout=DATA_TIMEOUT,
    )

    class Tls:
        context = object()

    return SmtpSession(
        listener,
        directory or FakeDirectory(),
        authenticator,
        None,  # type: ignore[arg-type]
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
