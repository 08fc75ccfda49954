"""The outbound client over real sockets, against three kinds of server.

1. Postlane's own server engine (``smtp.protocol.Connection``) behind a tiny
   asyncio listener written here that accepts everything, or refuses what a
   test asks it to: PIPELINING, STARTTLS (opportunistic and required, with a
   test CA), AUTH (required when the server is given credentials), connection
   reuse, refusals, a connection dropped mid-transaction.
2. Postfix's ``smtp-sink``, a real and independent implementation: 1,000
   messages over one connection, no PIPELINING, no STARTTLS, a 421 greeting.
3. Raw servers for what no well-behaved engine does: a 421 greeting, silence,
   a TLS handshake answered with plaintext.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import pytest

from postlane.delivery.client import (
    AuthenticationFailed,
    CommandTimeout,
    ConnectFailed,
    ConnectionClosed,
    ConnectionLost,
    ConnectionRefused,
    ConnectTimeout,
    OutboundConnection,
    OutboundError,
    SessionRefused,
    TlsHandshakeFailed,
    TlsPolicy,
    TlsRequired,
    connect,
)
from postlane.delivery.client_protocol import TransactionResult
from postlane.delivery.sasl import Credentials
from postlane.errors import PostlaneError
from postlane.smtp import protocol as p

from .conftest import MX_NAME, Pki, Runner, free_port

HELO = "out.postlane.test"
SENDER = "bounces@postlane.test"
BODY = b"From: a@postlane.test\r\nTo: b@example.com\r\nSubject: test\r\n\r\nHello.\r\n"
QUEUED = p.Reply(250, "2.0.0", ("Ok: queued",))


# -- Postlane's server engine as a test server ---------------------------------------------


@dataclass
class Received:
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    tls: bool


@dataclass
class EngineServer:
    """Accepts everything, except the recipients in ``refuse`` (and ``drop_on``, which hangs up)."""

    tls: ssl.SSLContext | None = None
    refuse: dict[str, p.Reply] = field(default_factory=dict)
    # (username, password): AUTH required, and only these pass; the others get auth_refusal.
    credentials: tuple[str, str] | None = None
    auth_refusal: p.Reply | None = None  # None: the engine's 535 5.7.8
    plaintext_auth: bool = False  # offer AUTH without TLS too
    auth_attempts: list[tuple[str, str, bool]] = field(default_factory=list)
    drop_on: str | None = None
    reset_connection: bool = False  # drop_on with a TCP RST instead of a FIN
    messages: list[Received] = field(default_factory=list)
    reads: list[bytes] = field(default_factory=list)
    resets: int = 0
    sessions: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _EngineSession(self), "127.0.0.1", 0
        )
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class _EngineSession(asyncio.Protocol):
    def __init__(self, owner: EngineServer) -> None:
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
        self.transport = transport  # type: ignore[assignment]
        self.owner.sessions += 1
        self.flush()

    def check(self, attempt: p.AuthAttempt) -> None:
        good = (attempt.username, attempt.password) == self.owner.credentials
        self.owner.auth_attempts.append((attempt.mechanism, attempt.username, good))
        if good:
            self.conn.auth_succeeded(attempt.username)
        else:
            self.conn.auth_failed(self.owner.auth_refusal)

    def data_received(self, data: bytes) -> None:
        self.owner.reads.append(data)
        if self.upgrading:
            # asyncio's loop may hand over what follows the handshake (our EHLO)
            # before start_tls() returns; the engine must see it after tls_started().
            self.early += data
            return
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
                if event.address == self.owner.drop_on and self.transport is not None:
                    if self.owner.reset_connection:
                        sock = self.transport.get_extra_info("socket")
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    self.transport.abort()
                    return
                self.conn.answer(self.owner.refuse.get(event.address))
            elif isinstance(event, p.MessageReceived):
                self.owner.messages.append(
                    Received(event.mail_from, event.recipients, event.data, self.conn.tls_active)
                )
                self.conn.answer_message(QUEUED)
            elif isinstance(event, p.Reset):
                self.owner.resets += 1
            elif isinstance(event, p.AuthAttempt):
                self.check(event)
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
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, self.owner.tls, server_side=True)
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


# -- raw servers ----------------------------------------------------------------------------


class _Scripted(asyncio.Protocol):
    """Writes ``greeting``, then answers each read with ``respond(data)``; all after ``delay``."""

    def __init__(
        self,
        greeting: bytes,
        respond: Callable[[bytes], bytes | None],
        delay: float,
        reads: list[bytes],
    ) -> None:
        self.greeting = greeting
        self.respond = respond
        self.delay = delay
        self.reads = reads
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.greeting:
            self.later(self.greeting)

    def data_received(self, data: bytes) -> None:
        self.reads.append(data)
        answer = self.respond(data)
        if answer is not None:
            self.later(answer)

    def later(self, data: bytes) -> None:
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self.write, data)
        else:
            self.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            if data.startswith(b"421"):
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def scripted_server(
    greeting: bytes,
    respond: Callable[[bytes], bytes | None] = lambda data: None,
    *,
    delay: float = 0,
    reads: list[bytes] | None = None,
) -> tuple[asyncio.Server, int]:
    log = [] if reads is None else reads
    server = await asyncio.get_running_loop().create_server(
        lambda: _Scripted(greeting, respond, delay, log), "127.0.0.1", 0
    )
    return server, int(server.sockets[0].getsockname()[1])


async def open_to(
    port: int,
    *,
    tls: TlsPolicy = "opportunistic",
    server_hostname: str = MX_NAME,
    ssl_context: ssl.SSLContext | None = None,
    command_timeout: float = 10,
    credentials: Credentials | None = None,
    allow_plaintext_auth: bool = False,
) -> OutboundConnection:
    return await connect(
        "127.0.0.1",
        port,
        helo_name=HELO,
        tls=tls,
        server_hostname=server_hostname,
        ssl_context=ssl_context,
        connect_timeout=5,
        command_timeout=command_timeout,
        source_address="127.0.0.1",
        credentials=credentials,
        allow_plaintext_auth=allow_plaintext_auth,
    )


# == 1. Postlane's own server engine ========================================================


def test_pipelined_transaction_delivers_exact_content(run: Runner[Any]) -> None:
    data = b"Subject: dots\n\n.\n..\nline\r\n.\r\nend"  # bare LF, dots, no final CRLF

    async def scenario() -> None:
        server = EngineServer()
        port = await server.start()
        try:
            async with await open_to(port, tls="none") as conn:
                assert "PIPELINING" in conn.capabilities
                assert conn.peer_ip == "127.0.0.1"
                assert conn.tls_version is None and conn.tls_cipher is None
                result = await conn.send(SENDER, ["a@example.com", "b@example.com"], data)
                assert result.delivered == ["a@example.com", "b@example.com"]
                assert result.data_reply is not None
                assert result.data_reply.text == "Ok: queued"
                assert conn.messages_sent == 1
        finally:
            await server.stop()
        (message,) = server.messages
        assert message.recipients == ("a@example.com", "b@example.com")
        # What the server un-stuffed is the content with CRLF line ends, byte for byte.
        assert message.data == b"Subject: dots\r\n\r\n.\r\n..\r\nline\r\n.\r\nend\r\n"
        # MAIL, both RCPTs and DATA arrived in one read: they were pipelined.
        envelope = next(read for read in server.reads if read.startswith(b"MAIL FROM"))
        assert envelope.count(b"RCPT TO") == 2 and envelope.endswith(b"DATA\r\n")

    run(scenario())


def test_opportunistic_starttls_does_not_verify(run: Runner[Any], pki: Pki) -> None:
    async def scenario() -> None:
        server = EngineServer(tls=pki.self_signed)
        port = await server.start()
        try:
            conn = await open_to(port, server_hostname="anything.example")
            assert conn.tls_version is not None and conn.tls_version.startswith("TLSv1.")
            assert conn.tls_cipher
            assert "STARTTLS" not in conn.capabilities  # the EHLO inside TLS
            result = await conn.send(SENDER, ["a@example.com"], BODY)
            assert result.delivered == ["a@example.com"]
            version, cipher = conn.tls_version, conn.tls_cipher
            await conn.close()
            await conn.close()
            await asyncio.sleep(0.01)
            # Still there for the delivery record (asyncio's closed TLS transport forgets).
            assert (conn.tls_version, conn.tls_cipher) == (version, cipher)
        finally:
            await server.stop()
        assert [m.tls for m in server.messages] == [True]

    run(scenario())


def test_required_tls_verifies_the_mx_name(run: Runner[Any], pki: Pki) -> None:
    async def scenario() -> None:
        server = EngineServer(tls=pki.signed)
        port = await server.start()
        try:
            async with await open_to(
                port, tls="required", ssl_context=pki.client_context()
            ) as conn:
                assert conn.tls_version is not None
                result = await conn.send(SENDER, ["a@example.com"], BODY)
                assert result.delivered == ["a@example.com"]
            with pytest.raises(TlsRequired) as wrong_name:
                await open_to(
                    port,
                    tls="required",
                    server_hostname="other.example",
                    ssl_context=pki.client_context(),
                )
            # Against the system CA store, the test CA is unknown.
            with pytest.raises(TlsRequired) as unknown_ca:
                await open_to(port, tls="required")
        finally:
            await server.stop()
        assert [m.tls for m in server.messages] == [True]
        error = wrong_name.value
        assert error.reason.startswith("certificate for other.example is not valid: ")
        assert "mismatch" in error.reason or "match" in error.reason
        assert error.temporary and error.status == "4.7.5"
        assert isinstance(error, OutboundError) and isinstance(error, PostlaneError)
        assert unknown_ca.value.reason.startswith(f"certificate for {MX_NAME} is not valid: ")

    run(scenario())


def test_required_tls_with_a_self_signed_certificate_fails(run: Runner[Any], pki: Pki) -> None:
    async def scenario() -> None:
        server = EngineServer(tls=pki.self_signed)
        port = await server.start()
        try:
            with pytest.raises(TlsRequired, match=r"not valid: self.signed certificate"):
                await open_to(port, tls="required", ssl_context=pki.client_context())
        finally:
            await server.stop()
        assert server.messages == []

    run(scenario())


def test_hundred_messages_on_one_connection_with_rset(run: Runner[Any]) -> None:
    async def scenario() -> None:
        server = EngineServer()
        port = await server.start()
        try:
            async with await open_to(port) as conn:
                for number in range(100):
                    body = BODY + b"number %d\r\n" % number
                    result = await conn.send(SENDER, [f"r{number}@example.com"], body)
                    assert result.delivered == [f"r{number}@example.com"]
                    reply = await conn.reset()
                    assert reply.code == 250 and reply.command == "RSET"
                assert conn.messages_sent == 100
        finally:
            await server.stop()
        assert server.sessions == 1
        assert server.resets == 100
        assert [m.recipients for m in server.messages] == [
            (f"r{n}@example.com",) for n in range(100)
        ]

    run(scenario())


def test_concurrent_sends_are_pipelined_and_answered_in_order(run: Runner[Any]) -> None:
    async def scenario() -> None:
        server = EngineServer(refuse={"r7@example.com": p.Reply(550, "5.1.1", ("unknown",))})
        port = await server.start()
        try:
            async with await open_to(port) as conn:
                results = await asyncio.gather(
                    *(
                        conn.send(SENDER, [f"r{n}@example.com"], BODY + b"%d\r\n" % n)
                        for n in range(50)
                    )
                )
        finally:
            await server.stop()
        assert [r.delivered for r in results] == [
            [] if n == 7 else [f"r{n}@example.com"] for n in range(50)
        ]
        assert results[7].recipients["r7@example.com"].enhanced == "5.1.1"
        assert [m.data for m in server.messages] == [
            BODY + b"%d\r\n" % n for n in range(50) if n != 7
        ]
        # The next envelope travelled with the previous message's content.
        assert any(b".\r\nMAIL FROM:" in read for read in server.reads)

    run(scenario())


def test_a_result_hook_runs_before_the_next_content_and_can_hold_it(run: Runner[Any]) -> None:
    """What the delivery worker's journal relies on: a hook sees each result first."""

    async def scenario() -> None:
        server = EngineServer()
        port = await server.start()
        seen: list[tuple[int, int]] = []  # (message, messages the server had by then)

        def hook(n: int) -> Callable[[TransactionResult], bool]:
            def on_result(result: TransactionResult) -> bool:
                assert result.delivered == [f"r{n}@example.com"]
                seen.append((n, len(server.messages)))
                if n == 3:
                    raise RuntimeError("a hook that fails holds the output too")
                return n != 1  # message 1's hook holds the output

            return on_result

        try:
            async with await open_to(port) as conn:
                futures = [
                    conn.submit(SENDER, [f"r{n}@example.com"], BODY, on_result=hook(n))
                    for n in range(6)
                ]
                await futures[1]
                await asyncio.sleep(0.2)  # long enough for message 2 to arrive, were it sent
                assert len(server.messages) == 2 and not futures[2].done()
                conn.release()
                await futures[3]
                await asyncio.sleep(0.2)
                assert len(server.messages) == 4 and not futures[4].done()
                conn.release()
                conn.release()  # nothing held: a no-op
                results = await asyncio.gather(*futures)
        finally:
            await server.stop()
        assert [r.delivered for r in results] == [[f"r{n}@example.com"] for n in range(6)]
        # each hook ran before the next message's content reached the server
        assert seen == [(n, n + 1) for n in range(6)]

    run(scenario())


# == 3. refusals and failures ==================================================================


def test_450_and_550_recipients(run: Runner[Any]) -> None:
    async def scenario() -> None:
        server = EngineServer(
            refuse={
                "busy@example.com": p.Reply(450, "4.2.1", ("Try again later",)),
                "gone@example.com": p.Reply(550, "5.1.1", ("User unknown",)),
            }
        )
        port = await server.start()
        try:
            async with await open_to(port) as conn:
                everyone = ["busy@example.com", "ok@example.com", "gone@example.com"]
                result = await conn.send(SENDER, everyone, BODY)
                nobody = await conn.send(SENDER, ["busy@example.com", "gone@example.com"], BODY)
                after = await conn.send(SENDER, ["ok@example.com"], BODY)
        finally:
            await server.stop()
        busy, gone = result.recipients["busy@example.com"], result.recipients["gone@example.com"]
        assert (busy.code, busy.enhanced, busy.text, busy.temporary) == (
            450,
            "4.2.1",
            "Try again later",
            True,
        )
        assert (gone.code, gone.enhanced, gone.text, gone.command) == (
            550,
            "5.1.1",
            "User unknown",
            "RCPT TO",
        )
        assert result.delivered == ["ok@example.com"]
        assert nobody.delivered == [] and nobody.data_reply is None
        assert after.delivered == ["ok@example.com"]  # the open transaction was reset
        assert [m.recipients for m in server.messages] == [("ok@example.com",)] * 2

    run(scenario())


def test_421_at_greeting(run: Runner[Any]) -> None:
    async def scenario() -> None:
        server, port = await scripted_server(b"421 4.3.2 mx.test.example Service not available\r\n")
        try:
            with pytest.raises(SessionRefused) as refused:
                await open_to(port)
        finally:
            server.close()
        error = refused.value
        assert error.reply is not None and error.reply.code == 421
        assert error.temporary and error.status == "4.3.2"
        assert "Service not available" in error.reason

    run(scenario())


def test_421_mid_transaction_then_the_connection_is_closed(run: Runner[Any]) -> None:
    async def scenario() -> None:
        server = EngineServer(refuse={"b@example.com": p.Reply(421, "4.7.0", ("Slow down",))})
        port = await server.start()
        try:
            conn = await open_to(port)
            result = await conn.send(SENDER, ["a@example.com", "b@example.com"], BODY)
            with pytest.raises(SessionRefused, match="Slow down") as later:
                await conn.send(SENDER, ["c@example.com"], BODY)
            await conn.close()
        finally:
            await server.stop()
        assert result.delivered == []
        assert result.outcome("a@example.com").code == 421
        assert result.recipients["b@example.com"].code == 421
        assert conn.closed and "Slow down" in (conn.close_reason or "")
        assert later.value.reply is not None and later.value.reply.code == 421

    run(scenario())


def test_connection_dropped_mid_transaction(run: Runner[Any]) -> None:
    async def scenario() -> None:
        server = EngineServer(drop_on="drop@example.com")
        port = await server.start()
        try:
            conn = await open_to(port)
            result = await conn.send(SENDER, ["a@example.com", "drop@example.com"], BODY)
            with pytest.raises(ConnectionLost):
                await conn.send(SENDER, ["c@example.com"], BODY)
        finally:
            await server.stop()
        for recipient in ("a@example.com", "drop@example.com"):
            reply = result.outcome(recipient)
            assert (reply.code, reply.enhanced, reply.local) == (451, "4.4.2", True)
        assert conn.closed

    run(scenario())


def test_connection_reset_mid_transaction(run: Runner[Any]) -> None:
    async def scenario() -> None:
        server = EngineServer(drop_on="drop@example.com", reset_connection=True)
        port = await server.start()
        try:
            conn = await open_to(port)
            result = await conn.send(SENDER, ["drop@example.com"], BODY)
        finally:
            await server.stop()
        reply = result.outcome("drop@example.com")
        assert (reply.code, reply.enhanced, reply.local) == (451, "4.4.2", True)
        assert reply.text.startswith("lost connection with mx.test.example[127.0.0.1]:")
        assert conn.closed

    run(scenario())


def test_554_greeting_is_answered_with_quit(run: Runner[Any]) -> None:
    reads: list[bytes] = []

    async def scenario() -> None:
        server, port = await scripted_server(
            b"554 5.7.1 Your IP is listed\r\n", lambda data: b"221 2.0.0 Bye\r\n", reads=reads
        )
        try:
            with pytest.raises(SessionRefused, match="Your IP is listed") as refused:
                await open_to(port)
            await asyncio.sleep(0.05)
        finally:
            server.close()
        assert refused.value.temporary  # this host said no; the next MX may not
        assert refused.value.status == "5.7.1"
        assert b"".join(reads) == b"QUIT\r\n"

    run(scenario())


def test_slow_server_within_the_timeout_is_not_cut_off(run: Runner[Any]) -> None:
    ehlo = b"250-mx\r\n250 PIPELINING\r\n"

    def respond(data: bytes) -> bytes:
        if data.startswith(b"EHLO"):
            return ehlo
        if data.startswith(b"MAIL"):
            return b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"
        return b"250 2.0.0 queued\r\n"

    async def scenario() -> None:
        # Each answer takes 0.25 s of a 0.4 s timeout: the whole exchange takes longer.
        server, port = await scripted_server(b"220 mx ESMTP\r\n", respond, delay=0.25)
        try:
            started = time.monotonic()
            conn = await open_to(port, command_timeout=0.4)
            result = await conn.send(SENDER, ["a@example.com"], BODY)
            assert time.monotonic() - started > 0.4 * 2
        finally:
            server.close()
        assert result.delivered == ["a@example.com"]

    run(scenario())


def test_source_address_that_is_not_ours(run: Runner[Any]) -> None:
    async def scenario() -> None:
        with pytest.raises(ConnectFailed, match="cannot connect to"):
            await connect(
                "127.0.0.1",
                free_port(),
                helo_name=HELO,
                tls="none",
                server_hostname=MX_NAME,
                source_address="192.0.2.1",  # TEST-NET-1: not an address of this host
            )

    run(scenario())


def test_connection_refused(run: Runner[Any]) -> None:
    async def scenario() -> None:
        with pytest.raises(ConnectionRefused, match="refused") as refused:
            await open_to(free_port())
        assert refused.value.temporary and refused.value.status == "4.4.1"

    run(scenario())


def test_connect_timeout(run: Runner[Any]) -> None:
    async def scenario() -> None:
        with pytest.raises(ConnectTimeout, match="timed out"):
            await connect(
                "127.0.0.1",
                free_port(),
                helo_name=HELO,
                tls="none",
                server_hostname=MX_NAME,
                connect_timeout=0,
            )

    run(scenario())


def test_silent_server_times_out(run: Runner[Any]) -> None:
    async def scenario() -> None:
        server, port = await scripted_server(b"")
        try:
            started = time.monotonic()
            with pytest.raises(CommandTimeout) as timeout:
                await open_to(port, command_timeout=0.3)
            assert time.monotonic() - started < 5
        finally:
            server.close()
        assert "waiting for the server greeting" in timeout.value.reason
        assert isinstance(timeout.value, ConnectionLost) and timeout.value.temporary

    run(scenario())


def test_reply_that_never_comes_times_out_the_transaction(run: Runner[Any]) -> None:
    ehlo = b"250-mx\r\n250 PIPELINING\r\n"

    async def scenario() -> None:
        server, port = await scripted_server(
            b"220 mx ESMTP\r\n", lambda data: ehlo if data.startswith(b"EHLO") else None
        )
        try:
            conn = await open_to(port, command_timeout=0.3)
            result = await conn.send(SENDER, ["a@example.com"], BODY)
        finally:
            server.close()
        reply = result.outcome("a@example.com")
        assert (reply.code, reply.enhanced, reply.local) == (451, "4.4.2", True)
        assert "timed out after 0.3 seconds waiting for the reply to MAIL FROM" in reply.text
        with pytest.raises(CommandTimeout):
            await conn.reset()

    run(scenario())


def test_tls_handshake_answered_with_plaintext(run: Runner[Any]) -> None:
    ehlo = b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"

    def respond(data: bytes) -> bytes:
        if data.startswith(b"EHLO"):
            return ehlo
        if data.startswith(b"STARTTLS"):
            return b"220 2.0.0 go ahead\r\n"
        return b"500 this is not TLS at all\r\n"  # the answer to the ClientHello

    async def scenario() -> None:
        server, port = await scripted_server(b"220 mx ESMTP\r\n", respond)
        try:
            with pytest.raises(
                TlsHandshakeFailed, match=re.escape(f"TLS handshake with {MX_NAME}")
            ):
                await open_to(port)
            with pytest.raises(
                TlsRequired, match=re.escape(f"TLS handshake with {MX_NAME} failed")
            ):
                await open_to(port, tls="required")
        finally:
            server.close()

    run(scenario())


def test_starttls_refused(run: Runner[Any]) -> None:
    ehlo = b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"

    def respond(data: bytes) -> bytes:
        if data.startswith(b"EHLO"):
            return ehlo
        if data.startswith(b"STARTTLS"):
            return b"454 4.7.0 TLS not available\r\n"
        return b"250 2.0.0 Ok\r\n"

    reads: list[bytes] = []

    async def scenario() -> None:
        server, port = await scripted_server(b"220 mx ESMTP\r\n", respond, reads=reads)
        try:
            conn = await open_to(port)  # opportunistic: on in plaintext
            assert conn.tls_version is None
            assert (await conn.reset()).code == 250
            await conn.close()
            reads.clear()
            with pytest.raises(
                TlsRequired, match=re.escape("refused STARTTLS: 454 4.7.0")
            ) as refused:
                await open_to(port, tls="required")
            await asyncio.sleep(0.05)
        finally:
            server.close()
        assert refused.value.status == "4.7.4"
        assert reads[-1].endswith(b"QUIT\r\n")  # a polite goodbye: the session was fine

    run(scenario())


def test_closed_connection_refuses_more_work(run: Runner[Any]) -> None:
    async def scenario() -> None:
        server = EngineServer()
        port = await server.start()
        try:
            conn = await open_to(port)
            with pytest.raises(ValueError, match="at least one recipient"):
                await conn.send(SENDER, [], BODY)
            closing = asyncio.ensure_future(conn.close())
            await asyncio.sleep(0)
            with pytest.raises(ConnectionClosed, match="is closed"):
                await conn.send(SENDER, ["a@example.com"], BODY)  # while QUIT is under way
            await closing
            await conn.close()  # idempotent
            with pytest.raises(ConnectionClosed, match="is closed"):
                await conn.send(SENDER, ["a@example.com"], BODY)
            with pytest.raises(ConnectionClosed):
                await conn.reset()
        finally:
            await server.stop()
        assert conn.closed and conn.close_reason == "closed after QUIT"

    run(scenario())


# -- AUTH to a relay ---------------------------------------------------------------------------

RELAY_USER, RELAY_PASSWORD = "postlane@relay.test", "correct horse battery"
CREDENTIALS = Credentials(RELAY_USER, RELAY_PASSWORD)


def credentials_on_the_wire(reads: list[bytes]) -> bool:
    """Whether the password went out in any form AUTH would carry it (plain, PLAIN, LOGIN)."""
    wire = b"".join(reads)
    secret = RELAY_PASSWORD.encode()
    forms = (secret, base64.b64encode(secret), base64.b64encode(b"\0" + RELAY_USER.encode()))
    return any(form in wire for form in forms)


def test_auth_plain_after_starttls_then_mail(run: Runner[Any], pki: Pki) -> None:
    async def scenario() -> None:
        server = EngineServer(tls=pki.self_signed, credentials=(RELAY_USER, RELAY_PASSWORD))
        port = await server.start()
        try:
            async with await open_to(port, credentials=CREDENTIALS) as conn:
                assert conn.auth_mechanism == "PLAIN"
                assert conn.tls_version is not None
                result = await conn.send(SENDER, ["a@example.com", "b@example.com"], BODY)
                assert result.delivered == ["a@example.com", "b@example.com"]
        finally:
            await server.stop()
        assert server.auth_attempts == [("PLAIN", RELAY_USER, True)]
        assert [m.tls for m in server.messages] == [True]

    run(scenario())


def test_auth_with_required_tls_verifies_before_sending_the_password(
    run: Runner[Any], pki: Pki
) -> None:
    async def scenario() -> None:
        server = EngineServer(tls=pki.signed, credentials=(RELAY_USER, RELAY_PASSWORD))
        port = await server.start()
        try:
            conn = await open_to(
                port, tls="required", ssl_context=pki.client_context(), credentials=CREDENTIALS
            )
            assert conn.auth_mechanism == "PLAIN"
            await conn.close()
            with pytest.raises(TlsRequired, match="not valid"):  # the system CAs do not know it
                await open_to(port, tls="required", credentials=CREDENTIALS)
        finally:
            await server.stop()
        assert server.auth_attempts == [("PLAIN", RELAY_USER, True)]  # the first connection only

    run(scenario())


def test_wrong_password_is_a_permanent_authentication_failure(run: Runner[Any], pki: Pki) -> None:
    async def scenario() -> None:
        server = EngineServer(tls=pki.self_signed, credentials=(RELAY_USER, "something else"))
        port = await server.start()
        try:
            with pytest.raises(AuthenticationFailed) as failed:
                await open_to(port, credentials=CREDENTIALS)
            await asyncio.sleep(0.05)
        finally:
            await server.stop()
        error = failed.value
        assert error.reason == (
            f"authentication to {MX_NAME}[127.0.0.1]:{port} failed: "
            "535 5.7.8 Authentication credentials invalid"
        )
        assert (error.temporary, error.status) == (False, "5.7.8")
        assert error.reply is not None and error.reply.code == 535
        assert isinstance(error, OutboundError)
        assert server.auth_attempts == [("PLAIN", RELAY_USER, False)]
        assert server.messages == []
        assert server.reads[-1].endswith(b"QUIT\r\n")  # the session was fine: a polite goodbye

    run(scenario())


def test_temporary_authentication_failure(run: Runner[Any], pki: Pki) -> None:
    async def scenario() -> None:
        server = EngineServer(
            tls=pki.self_signed,
            credentials=(RELAY_USER, "something else"),
            auth_refusal=p.Reply(454, "4.7.0", ("Temporary authentication failure",)),
        )
        port = await server.start()
        try:
            with pytest.raises(
                AuthenticationFailed, match=re.escape("failed: 454 4.7.0 Temporary")
            ) as info:
                await open_to(port, credentials=CREDENTIALS)
        finally:
            await server.stop()
        assert (info.value.temporary, info.value.status) == (True, "4.7.0")

    run(scenario())


def test_credentials_are_not_sent_to_a_relay_without_tls(run: Runner[Any]) -> None:
    async def scenario() -> None:
        # Offers AUTH in plaintext (and no STARTTLS): the client must still not use it.
        server = EngineServer(credentials=(RELAY_USER, RELAY_PASSWORD), plaintext_auth=True)
        port = await server.start()
        try:
            for tls in ("opportunistic", "none"):
                with pytest.raises(AuthenticationFailed, match="TLS is not active") as info:
                    await open_to(port, tls=tls, credentials=CREDENTIALS)  # type: ignore[arg-type]
                assert info.value.temporary
            await asyncio.sleep(0.05)
            assert not any(b"AUTH" in read for read in server.reads)
            assert not credentials_on_the_wire(server.reads)
            # Allowed explicitly: then it authenticates in plaintext.
            conn = await open_to(port, credentials=CREDENTIALS, allow_plaintext_auth=True)
            assert conn.auth_mechanism == "PLAIN" and conn.tls_version is None
            await conn.close()
        finally:
            await server.stop()
        assert server.auth_attempts == [("PLAIN", RELAY_USER, True)]

    run(scenario())


def test_auth_login_dialogue_with_a_server_offering_only_login(run: Runner[Any]) -> None:
    steps = iter(
        [
            b"334 VXNlcm5hbWU6\r\n",
            b"334 UGFzc3dvcmQ6\r\n",
            b"235 2.7.0 Authentication successful\r\n",
        ]
    )

    def respond(data: bytes) -> bytes:
        if data.startswith(b"EHLO"):
            return b"250-mx\r\n250-PIPELINING\r\n250 AUTH LOGIN CRAM-MD5\r\n"
        if data.startswith(b"QUIT"):
            return b"221 2.0.0 Bye\r\n"
        return next(steps)

    reads: list[bytes] = []

    async def scenario() -> None:
        server, port = await scripted_server(b"220 mx ESMTP\r\n", respond, reads=reads)
        try:
            conn = await open_to(
                port, tls="none", credentials=CREDENTIALS, allow_plaintext_auth=True
            )
            assert conn.auth_mechanism == "LOGIN"
            await conn.close()
        finally:
            server.close()

    run(scenario())
    assert reads[1:4] == [
        b"AUTH LOGIN\r\n",
        base64.b64encode(RELAY_USER.encode()) + b"\r\n",
        base64.b64encode(RELAY_PASSWORD.encode()) + b"\r\n",
    ]


def test_no_mechanism_in_common_names_what_was_offered(run: Runner[Any]) -> None:
    def respond(data: bytes) -> bytes | None:
        if data.startswith(b"EHLO"):
            return b"250-mx\r\n250 AUTH CRAM-MD5 GSSAPI\r\n"
        return None

    reads: list[bytes] = []

    async def scenario() -> None:
        server, port = await scripted_server(b"220 mx ESMTP\r\n", respond, reads=reads)
        try:
            with pytest.raises(
                AuthenticationFailed,
                match="failed: the server offers AUTH CRAM-MD5 GSSAPI, none of PLAIN and LOGIN",
            ) as info:
                await open_to(port, credentials=CREDENTIALS, allow_plaintext_auth=True)
            await asyncio.sleep(0.05)
        finally:
            server.close()
        assert info.value.temporary
        assert reads[-1] == b"QUIT\r\n" and not credentials_on_the_wire(reads)

    run(scenario())


# -- deadlines --------------------------------------------------------------------------------


class _Tarpit(asyncio.Protocol):
    """Answers at once, except the replies named in ``slow``: one byte every ``interval`` s.

    Replies by name: "greeting", "EHLO", "MAIL", "RCPT", "DATA", "content", "QUIT"
    (None in ``replies`` for silence).
    """

    def __init__(self, slow: set[str], interval: float, replies: dict[str, bytes | None]) -> None:
        self.slow = slow
        self.interval = interval
        self.replies = {
            "greeting": b"220 mx ESMTP\r\n",
            "EHLO": b"250-mx\r\n250 PIPELINING\r\n",
            "MAIL": b"250 2.1.0 Ok\r\n",
            "RCPT": b"250 2.1.5 Ok\r\n",
            "DATA": b"354 go\r\n",
            "RSET": b"250 2.0.0 Ok\r\n",
            "content": b"250 2.0.0 queued as " + b"Q" * 200 + b"\r\n",
            "QUIT": b"221 2.0.0 Bye\r\n",
            **replies,
        }
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.answer("greeting")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buffer, self.in_data = self.buffer[end + 5 :], False
                self.answer("content")
                continue
            line, found, rest = self.buffer.partition(b"\r\n")
            if not found:
                return
            self.buffer = rest
            name = line[:4].decode().upper()
            self.answer(name)
            self.in_data = name == "DATA"

    def answer(self, name: str) -> None:
        reply = self.replies.get(name)
        if reply is not None:
            if name in self.slow:
                self.dribble(reply)
            else:
                self.write(reply)

    def dribble(self, data: bytes) -> None:
        if data and self.write(data[:1]):
            asyncio.get_running_loop().call_later(self.interval, self.dribble, data[1:])

    def write(self, data: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def tarpit(
    slow: set[str], *, interval: float = 0.1, **replies: bytes | None
) -> tuple[asyncio.Server, int, list[_Tarpit]]:
    sessions: list[_Tarpit] = []

    def make() -> _Tarpit:
        sessions.append(_Tarpit(slow, interval, replies))
        return sessions[-1]

    server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1]), sessions


def test_a_dribbled_greeting_is_cut_off_by_the_reply_deadline(run: Runner[Any]) -> None:
    async def scenario() -> None:
        # 200 bytes at 10 a second: each byte used to start the 1 s timeout again.
        server, port, _ = await tarpit({"greeting"}, greeting=b"220 " + b"x" * 200 + b"\r\n")
        try:
            started = time.monotonic()
            with pytest.raises(CommandTimeout, match="reply deadline") as timeout:
                await asyncio.wait_for(open_to(port, tls="none", command_timeout=1), 15)
            assert time.monotonic() - started < 10
        finally:
            server.close()
        assert "waiting for the server greeting" in timeout.value.reason

    run(scenario())


def test_a_dribbled_reply_to_the_content_is_cut_off_and_the_connection_aborted(
    run: Runner[Any],
) -> None:
    async def scenario() -> None:
        server, port, sessions = await tarpit({"content"})
        try:
            conn = await open_to(port, tls="none", command_timeout=1)
            started = time.monotonic()
            result = await asyncio.wait_for(conn.send(SENDER, ["a@example.com"], BODY), 15)
            assert time.monotonic() - started < 10
            await asyncio.sleep(0.05)
            assert sessions[0].transport is None  # aborted, not left open for reuse
        finally:
            server.close()
        assert result.delivered == []
        reply = result.outcome("a@example.com")
        assert (reply.code, reply.enhanced, reply.local) == (451, "4.4.2", True)
        assert "reply deadline" in reply.text and "end of DATA" in reply.text
        assert conn.closed
        with pytest.raises(CommandTimeout):
            await conn.reset()

    run(scenario())


def test_a_transaction_past_its_deadline_is_aborted_though_each_reply_is_in_time(
    run: Runner[Any],
) -> None:
    def respond(data: bytes) -> bytes:  # no PIPELINING: one command, one reply, 0.6 s each
        if data.startswith(b"EHLO"):
            return b"250 mx\r\n"
        if data.startswith(b"DATA"):
            return b"354 go\r\n"
        if data.endswith(b"\r\n.\r\n"):
            return b"250 2.0.0 queued\r\n"
        return b"250 2.1.0 Ok\r\n"

    async def scenario() -> None:
        server, port = await scripted_server(b"220 mx ESMTP\r\n", respond, delay=0.6)
        try:
            conn = await open_to(port, tls="none", command_timeout=1)
            # 2 x 1 s plus the content's time: MAIL, RCPT, DATA and the content need 2.4 s.
            result = await conn.send(SENDER, ["a@example.com"], BODY)
        finally:
            server.close()
        reply = result.outcome("a@example.com")
        assert (reply.code, reply.enhanced, reply.local) == (451, "4.4.2", True)
        assert "transaction deadline" in reply.text
        assert conn.closed

    run(scenario())


def test_a_connection_attempt_past_its_deadline_fails_though_each_reply_is_in_time(
    run: Runner[Any],
) -> None:
    steps = iter([b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", b"235 2.7.0 Ok\r\n"])

    def respond(data: bytes) -> bytes:
        if data.startswith(b"EHLO"):
            return b"250-mx\r\n250 AUTH LOGIN\r\n"
        return next(steps)

    async def scenario() -> None:
        server, port = await scripted_server(b"220 mx ESMTP\r\n", respond, delay=0.6)
        try:
            # 0.5 + 2 x 1 s for the attempt; greeting, EHLO and AUTH LOGIN need 3 s.
            with pytest.raises(CommandTimeout, match="connection deadline") as timeout:
                await connect(
                    "127.0.0.1",
                    port,
                    helo_name=HELO,
                    tls="none",
                    server_hostname=MX_NAME,
                    connect_timeout=0.5,
                    command_timeout=1,
                    credentials=CREDENTIALS,
                    allow_plaintext_auth=True,
                )
        finally:
            server.close()
        assert timeout.value.temporary and timeout.value.status == "4.4.2"

    run(scenario())


class _SlowReader(asyncio.Protocol):
    """Takes the message content at ``rate`` bytes a second; with ``rate`` 0 it stops reading."""

    def __init__(self, rate: float, received: list[int]) -> None:
        self.rate = rate
        self.received = received
        self.transport: asyncio.Transport | None = None
        self.content = bytearray()
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"220 mx ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        if self.in_data:
            self.content += data
            self.transport.pause_reading()
            if not self.rate:
                return
            pause = len(data) / self.rate
            if self.content.endswith(b"\r\n.\r\n"):
                self.received.append(len(self.content))
                loop.call_later(pause, self.transport.write, b"250 2.0.0 queued\r\n")
            loop.call_later(pause, self.transport.resume_reading)
            return
        for line in data.splitlines():
            if line.startswith(b"EHLO"):
                self.transport.write(b"250-mx\r\n250 PIPELINING\r\n")
            elif line.startswith(b"DATA"):
                self.transport.write(b"354 go\r\n")
                self.in_data = True
            elif line.startswith(b"QUIT"):
                self.transport.write(b"221 2.0.0 Bye\r\n")
                self.transport.close()
            else:
                self.transport.write(b"250 2.1.0 Ok\r\n")


async def slow_reader(rate: float, received: list[int]) -> tuple[asyncio.Server, int]:
    """A server that reads the content slowly; its small receive buffer keeps the rest with us."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # accepted sockets inherit it
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = await asyncio.get_running_loop().create_server(
        lambda: _SlowReader(rate, received), sock=sock
    )
    return server, int(sock.getsockname()[1])


def big_message(size: int) -> bytes:
    return b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * (size // 1000)


def test_a_slow_but_steady_reader_is_not_cut_off(run: Runner[Any]) -> None:
    received: list[int] = []

    async def scenario() -> None:
        server, port = await slow_reader(500_000, received)
        try:
            conn = await open_to(port, tls="none", command_timeout=1)
            started = time.monotonic()
            # 1.5 MB at 500 KB/s: 3 s, with no reply for 3 times the 1 s command_timeout.
            result = await conn.send(SENDER, ["a@example.com"], big_message(1_500_000))
            assert time.monotonic() - started > 2
            await asyncio.wait_for(conn.close(), 5)
        finally:
            server.close()
        assert result.delivered == ["a@example.com"], result.outcome("a@example.com")

    run(scenario())
    assert len(received) == 1 and received[0] > 1_500_000  # all of it, read slowly


def test_a_reader_that_stops_reading_is_cut_off_by_the_send_deadline(run: Runner[Any]) -> None:
    async def scenario() -> None:
        server, port = await slow_reader(0, [])
        try:
            conn = await open_to(port, tls="none", command_timeout=1)
            started = time.monotonic()
            result = await conn.send(SENDER, ["a@example.com"], big_message(500_000))
            assert time.monotonic() - started < 10
        finally:
            server.close()
        reply = result.outcome("a@example.com")
        assert (reply.code, reply.local) == (451, True)
        assert "send deadline" in reply.text and "stopped reading" in reply.text
        assert conn.closed

    run(scenario())


def test_a_size_of_thousands_of_digits_sends_and_closes_cleanly(run: Runner[Any]) -> None:
    ehlo = b"250-mx\r\n250-PIPELINING\r\n250 SIZE " + b"9" * 5000 + b"\r\n"

    async def scenario() -> None:
        server, port, _ = await tarpit(set(), EHLO=ehlo)
        try:
            conn = await open_to(port, tls="none")
            first = await conn.send(SENDER, ["a@example.com"], BODY)
            second = await conn.send(SENDER, ["b@example.com"], BODY)
            await asyncio.wait_for(conn.close(), 5)
        finally:
            server.close()
        assert first.delivered == ["a@example.com"] and second.delivered == ["b@example.com"]
        assert conn.closed and conn.close_reason == "closed after QUIT"

    run(scenario())


def test_a_result_nobody_waits_for_is_logged_and_the_session_goes_on(
    run: Runner[Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        server = EngineServer()
        port = await server.start()
        try:
            conn = await open_to(port, tls="none")
            session = conn._session
            # A transaction the driver does not know of: what a bug in the engine would make.
            session.engine.send_message(SENDER, ["a@example.com"], BODY)
            session.flush()
            for _ in range(100):
                if conn.messages_sent:
                    break
                await asyncio.sleep(0.02)
            assert conn.messages_sent == 1 and not conn.closed
            assert (await conn.send(SENDER, ["b@example.com"], BODY)).delivered
            await asyncio.wait_for(conn.close(), 5)
        finally:
            await server.stop()
        assert conn.close_reason == "closed after QUIT"

    with caplog.at_level("ERROR", logger="postlane.delivery.client"):
        run(scenario())
    assert "a transaction result nobody waits for" in caplog.text


def test_close_cancelled_while_waiting_for_the_221_aborts_the_connection(
    run: Runner[Any],
) -> None:
    async def scenario() -> None:
        server, port, sessions = await tarpit(set(), QUIT=None)
        try:
            conn = await open_to(port, tls="none")
            closing = asyncio.ensure_future(conn.close())
            await asyncio.sleep(0.2)
            assert not closing.done()  # the server never says 221
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            await asyncio.sleep(0.05)
            assert conn.closed and sessions[0].transport is None
        finally:
            server.close()

    run(scenario())


# == 2. Postfix's smtp-sink ================================================================


def test_thousand_10k_messages_over_one_connection_to_smtp_sink(
    run_uvloop: Runner[Any],
    smtp_sink: Callable[..., AbstractContextManager[int]],
    record_property: Any,
) -> None:
    line = b"x" * 78 + b"\r\n"
    body = b"Subject: load\r\n\r\n" + line * ((10240 - 17) // len(line))
    body += b"y" * (10240 - len(body) - 2) + b"\r\n"
    assert len(body) == 10240

    async def scenario(port: int) -> float:
        async with await open_to(port, server_hostname="smtp-sink") as conn:
            assert "PIPELINING" in conn.capabilities
            started = time.perf_counter()
            for n in range(1000):
                result = await conn.send(SENDER, [f"r{n}@example.com"], body)
                assert result.delivered, result
            elapsed = time.perf_counter() - started
            assert conn.messages_sent == 1000
        return 1000 / elapsed

    with smtp_sink() as port:
        rate = run_uvloop(scenario(port))
    record_property("messages_per_second", round(rate))
    print(f"\n1,000 x 10 KiB messages over one connection to smtp-sink: {rate:.0f} msg/s")


def test_smtp_sink_without_pipelining(
    run: Runner[Any], smtp_sink: Callable[..., AbstractContextManager[int]]
) -> None:
    async def scenario(port: int) -> None:
        async with await open_to(port, server_hostname="smtp-sink") as conn:
            assert "PIPELINING" not in conn.capabilities
            for n in range(20):
                result = await conn.send(SENDER, [f"a{n}@example.com", f"b{n}@example.com"], BODY)
                assert result.delivered == [f"a{n}@example.com", f"b{n}@example.com"]
            assert conn.messages_sent == 20

    with smtp_sink("-p") as port:
        run(scenario(port))


def test_smtp_sink_offers_no_starttls_so_required_tls_fails(
    run: Runner[Any], smtp_sink: Callable[..., AbstractContextManager[int]]
) -> None:
    async def scenario(port: int) -> None:
        with pytest.raises(TlsRequired) as required:
            await open_to(port, tls="required", server_hostname="sink.test.example")
        assert required.value.reason == "sink.test.example did not offer STARTTLS"
        assert required.value.status == "4.7.4"
        # Opportunistic TLS goes on in plaintext.
        async with await open_to(port, server_hostname="sink.test.example") as conn:
            assert conn.tls_version is None
            assert (await conn.send(SENDER, ["a@example.com"], BODY)).delivered

    with smtp_sink() as port:
        run(scenario(port))


def test_smtp_sink_without_8bitmime_gets_no_8bit_content(
    run: Runner[Any], smtp_sink: Callable[..., AbstractContextManager[int]]
) -> None:
    async def scenario(port: int) -> None:
        async with await open_to(port, server_hostname="smtp-sink") as conn:
            assert "8BITMIME" not in conn.capabilities
            result = await conn.send(SENDER, ["a@example.com"], "Grüße\r\n".encode())
            reply = result.recipients["a@example.com"]
            assert (reply.code, reply.enhanced, reply.local) == (554, "5.6.3", True)
            assert conn.messages_sent == 0
            assert (await conn.send(SENDER, ["a@example.com"], BODY)).delivered

    with smtp_sink("-8") as port:
        run(scenario(port))


def test_smtp_sink_421_greeting(
    run: Runner[Any], smtp_sink: Callable[..., AbstractContextManager[int]]
) -> None:
    async def scenario(port: int) -> None:
        with pytest.raises(SessionRefused) as refused:
            await open_to(port, server_hostname="smtp-sink")
        assert refused.value.reply is not None and refused.value.reply.code == 421

    with smtp_sink("-Q", "CONNECT") as port:
        run(scenario(port))
