"""The session driver on a fake transport: STARTTLS, and a message intake cannot take.

asyncio's own loop may hand the first decrypted bytes (the client's EHLO after
the handshake) to the protocol before start_tls() has returned; those bytes
must reach the engine, not be dropped (start_tls() is faked for that).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from postlane.config import ListenerSettings
from postlane.intake import pipeline
from postlane.smtp import protocol
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


def _session() -> SmtpSession:
    listener = ListenerContext(
        name="test",
        settings=ListenerSettings(port=2525, tls="starttls", submission=False),
        policy=protocol.SessionPolicy(
            hostname="mail.postlane.test", starttls_available=True, auth_required=False
        ),
        limits=pipeline.IntakeLimits("mail.postlane.test", 25, timedelta(days=3)),
        command_timeout=60,
        data_timeout=60,
    )

    class Tls:
        context = object()

    return SmtpSession(
        listener,
        FakeDirectory(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        Tls(),  # type: ignore[arg-type]
        lambda session: None,
    )


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
