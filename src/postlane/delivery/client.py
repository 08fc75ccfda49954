"""Outbound SMTP connections: sockets, TLS and timers around the sans-IO client engine.

The protocol is :class:`~postlane.delivery.client_protocol.ClientConnection`;
this module only moves bytes, runs the TLS handshake and keeps time. Like the
server (``smtp/server.py``), each connection is one ``asyncio.Protocol`` with
no stream wrappers and no task of its own: replies are parsed in
``data_received`` and the awaiting ``send()`` is woken once per transaction,
not once per command, which is what lets one process keep many connections
busy at the rate delivery needs.

TLS policy, as Postfix's ``smtp_tls_security_level`` names it:

- ``"opportunistic"`` (Postfix ``may``): STARTTLS when offered, certificate not
  verified (an unverified channel still beats plaintext, and most MX
  certificates would fail verification). If the server refuses STARTTLS the
  session goes on in plaintext, as Postfix does. If the *handshake* fails the
  connection is gone: :class:`TlsHandshakeFailed` is raised and the worker
  decides whether to reconnect without TLS; it is not done here, because that
  is a policy (and a downgrade an attacker can provoke).
- ``"required"`` (Postfix ``secure`` for a named host): STARTTLS must be
  offered and the certificate must be valid for ``server_hostname`` (the MX
  host name, not the address connected to) against the system CA store or the
  given context; otherwise :class:`TlsRequired`.
- ``"none"``: never STARTTLS.

AUTH (to a relay; ``credentials``) comes after TLS, so the mechanisms are the
ones offered inside it and the password is encrypted. Without TLS at that
point (``tls="none"``, or STARTTLS not offered or refused) the credentials are
not sent unless ``allow_plaintext_auth``: :class:`AuthenticationFailed`. So is
a server that refuses them, offers no AUTH or no mechanism we speak.

Errors are :class:`OutboundError` subclasses, all temporary (the worker tries
the next MX host, then retries later) except an AUTH refused with a 5xx: the
same credentials will not work later either, and the caller decides what that
means for the mail. A connection lost *during* a transaction is not raised
from ``send()``: its :class:`TransactionResult` says so per recipient
(``451 4.4.2``, or the server's ``421``), because replies that did arrive,
like a 550 for one recipient, are real answers worth keeping.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar, cast

from postlane.delivery.client_protocol import (
    Authenticated,
    AuthFailed,
    Capabilities,
    ClientConnection,
    Closed,
    Greeting,
    Reply,
    TlsReady,
    TransactionResult,
)
from postlane.delivery.sasl import Credentials
from postlane.errors import ConfigError, PostlaneError

__all__ = [
    "AuthenticationFailed",
    "CommandTimeout",
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionClosed",
    "ConnectionLost",
    "ConnectionRefused",
    "OutboundConnection",
    "OutboundError",
    "ResultHook",
    "SessionRefused",
    "TlsHandshakeFailed",
    "TlsPolicy",
    "TlsRequired",
    "connect",
    "relay_context",
]

TlsPolicy = Literal["opportunistic", "required", "none"]
# Called with a message's result before the connection writes on; False holds its output.
ResultHook = Callable[[TransactionResult], bool]
_T = TypeVar("_T")

log = logging.getLogger(__name__)


class OutboundError(PostlaneError):
    """Delivery to one host failed at the connection level.

    ``reason`` is a sentence for logs and events; ``status`` the RFC 3463 code
    to record; ``reply`` the server's reply when one caused it. ``temporary``
    except for :class:`AuthenticationFailed` with a 5xx.
    """

    status = "4.4.0"

    def __init__(
        self,
        reason: str,
        *,
        temporary: bool = True,
        status: str | None = None,
        reply: Reply | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.temporary = temporary
        self.reply = reply
        if status is not None:
            self.status = status


class ConnectFailed(OutboundError):
    """No TCP connection could be made (unreachable network, no route...)."""

    status = "4.4.1"


class ConnectionRefused(ConnectFailed):
    """The host refused the TCP connection: nothing listens on the port."""


class ConnectTimeout(ConnectFailed):
    """The TCP connection was not established within ``connect_timeout``."""


class ConnectionLost(OutboundError):
    """An established connection ended without the server saying why."""

    status = "4.4.2"


class CommandTimeout(ConnectionLost):
    """The server did not answer within ``command_timeout``."""


class ConnectionClosed(OutboundError):
    """The connection is closed already (close() was called, or it ended earlier)."""

    status = "4.4.2"


class SessionRefused(OutboundError):
    """The server refused the session: a non-220 greeting, EHLO/HELO refused, a 421.

    Temporary even for a 5xx greeting: it concerns this host, so the worker
    tries the next MX (Postfix's ``smtp_skip_5xx_greeting``). ``reply`` says why.
    """


class TlsHandshakeFailed(OutboundError):
    """Opportunistic TLS: the handshake failed and the connection is gone.

    Reconnecting without TLS is the worker's decision, not done here.
    """

    status = "4.7.5"


class TlsRequired(OutboundError):
    """TLS is required and could not be had: not offered, refused, or not valid."""

    status = "4.7.5"


class AuthenticationFailed(OutboundError):
    """AUTH with the given credentials did not succeed; the session is over.

    ``reply`` is the server's refusal, or None when the credentials were not
    sent (no TLS without ``allow_plaintext_auth``, no AUTH offered, no
    mechanism in common). Permanent (``temporary`` False) only for a 5xx
    refusal, such as ``535 5.7.8`` for a wrong password.
    """

    status = "4.7.0"


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    """Opportunistic TLS: encrypt, verify nothing (Postfix ``may``)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@functools.cache
def _system_context() -> ssl.SSLContext:
    """Required TLS: the system CA store and host name checks; loaded once."""
    return ssl.create_default_context()


def relay_context(ca_file: Path) -> ssl.SSLContext:
    """Required TLS to a relay whose certificate a private CA signed: that CA, not the system's.

    Only the CAs in ``ca_file`` are trusted, so a certificate some public CA
    issued for the relay's name is not enough either. Built once per relay
    (reading and parsing the file on every connection would be wasted work);
    the settings check the file with this same function, so a file that
    passed there loads here. Raises :class:`ConfigError` naming the file.
    """
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as exc:  # before OSError, its base class
        raise ConfigError(
            f"ca_file {ca_file} does not hold PEM CA certificates: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"ca_file {ca_file} cannot be read: {exc.strerror or exc}") from None
    if not context.cert_store_stats()["x509_ca"]:
        raise ConfigError(f"ca_file {ca_file} holds no CA certificate (basicConstraints CA)")
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class _Session(asyncio.Protocol):
    """Drives one ClientConnection; resolves the futures of whoever waits on it."""

    def __init__(self, engine: ClientConnection, label: str, command_timeout: float) -> None:
        self.engine = engine
        self.label = label  # "mx.example.com[192.0.2.1]:25", for messages
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.greeting: Greeting | None = None
        self.closed: Closed | None = None
        self.closed_by_us = False
        self._loop = asyncio.get_running_loop()
        self.command_timeout = command_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._abortive = False  # close the transport without flushing it
        self._last_io = self._loop.time()
        self._ready: asyncio.Future[Capabilities] = self._loop.create_future()
        self._tls: asyncio.Future[TlsReady | Reply] | None = None
        self._auth: asyncio.Future[Authenticated | AuthFailed] | None = None
        # each queued message's future, with the hook to call on its result first
        self.sends: deque[tuple[asyncio.Future[TransactionResult], ResultHook | None]] = deque()
        self.held = False  # output kept back until release() (a ResultHook said so)
        self.resets: deque[asyncio.Future[Reply]] = deque()
        self._quit: asyncio.Future[None] | None = None

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else ""
        self._last_io = self._loop.time()
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._last_io = self._loop.time()
        self.engine.receive_data(data)
        self.pump()

    def eof_received(self) -> bool | None:
        self.engine.receive_data(b"")
        self.pump()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.engine.closed:
            why = f": {exc}" if exc is not None else ""
            self.engine.abort(f"lost connection with {self.label}{why}")
            self.pump()
        self.transport = None

    # -- events -----------------------------------------------------------------------

    def pump(self) -> None:
        engine = self.engine
        while (event := engine.next_event()) is not None:
            if isinstance(event, TransactionResult):
                future, hook = self.sends.popleft()
                if hook is not None and not _go_on(hook, event):
                    self.held = True
                _resolve(future, event)
            elif isinstance(event, Reply):
                command = event.command
                if command == "RSET":
                    _resolve(self.resets.popleft(), event)
                elif command == "STARTTLS" and self._tls is not None:
                    _resolve(self._tls, event)
                # MAIL, RCPT, DATA and end of DATA are summed up in the TransactionResult;
                # QUIT is followed by Closed; a refused EHLO by HELO.
            elif isinstance(event, Capabilities):
                _resolve(self._ready, event)
            elif isinstance(event, TlsReady):
                if self._tls is not None:
                    _resolve(self._tls, event)
            elif isinstance(event, Authenticated | AuthFailed):
                if self._auth is not None:
                    _resolve(self._auth, event)
            elif isinstance(event, Greeting):
                self.greeting = event
            else:
                self._on_closed(event)
        self.flush()

    def _on_closed(self, event: Closed) -> None:
        self.closed = event
        sends = (future for future, _ in self.sends)
        for future in (self._ready, self._tls, self._auth, *self.resets, *sends):
            if future is not None and not future.done():
                future.set_exception(self.error())
                future.exception()  # nobody may be waiting; do not log it as unretrieved
        self.resets.clear()
        self.sends.clear()
        if self._quit is not None:
            _resolve(self._quit, None)
        transport = self.transport
        if transport is not None:
            if self._abortive:
                transport.abort()
            elif not transport.is_closing():
                data = self.engine.data_to_send()  # a QUIT after a refused greeting
                if data:
                    transport.write(data)
                transport.close()

    def error(self) -> OutboundError:
        """What to raise for the way this session ended."""
        event = self.closed
        assert event is not None
        if self.closed_by_us:
            return ConnectionClosed(f"the connection to {self.label} is closed")
        if self._timed_out:
            return CommandTimeout(f"{self.label}: {event.reason}")
        if event.reply is not None and not event.reply.local:
            reply = event.reply
            status = reply.enhanced or f"{reply.code // 100}.0.0"
            return SessionRefused(f"{self.label}: {event.reason}", status=status, reply=reply)
        return ConnectionLost(f"{self.label}: {event.reason}")

    # -- output and time ----------------------------------------------------------------

    def flush(self) -> None:
        if self.held:
            self._arm()
            return
        data = self.engine.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            self._last_io = self._loop.time()
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and self.engine.waiting:
            self._timer = self._loop.call_later(self.command_timeout, self._check_timeout)

    def _check_timeout(self) -> None:
        """One timer per session, re-armed lazily: cheaper than one per read."""
        self._timer = None
        awaiting = self.engine.awaiting
        if awaiting is None:
            return
        idle = self._loop.time() - self._last_io
        if idle < self.command_timeout:
            self._timer = self._loop.call_later(self.command_timeout - idle, self._check_timeout)
            return
        self._timed_out = self._abortive = True
        self.engine.abort(
            f"timed out after {self.command_timeout:g} seconds waiting for {awaiting}"
        )
        self.pump()

    def quit_and_close(self, reason: str) -> None:
        """Give up on a working session (TLS required, not offered): QUIT, then close."""
        if not self.engine.closed:
            self.closed_by_us = True
            self.engine.quit()
            self.flush()
            self.engine.abort(reason)  # no need to wait for the 221
            self.pump()

    def abort(self, reason: str, enhanced: str = "4.4.2") -> None:
        """End the session now (a failed handshake, a cancelled connect)."""
        if not self.engine.closed:
            self._abortive = True
            self.engine.abort(reason, enhanced=enhanced)
            self.pump()

    # -- waiting ------------------------------------------------------------------------

    async def ready(self) -> Capabilities:
        """The next EHLO/HELO result (after the greeting, or after STARTTLS)."""
        return await self._ready

    async def start_tls(self) -> TlsReady | Reply:
        self._tls = self._loop.create_future()
        self.engine.start_tls()
        self.flush()
        try:
            return await self._tls
        finally:
            self._tls = None

    def tls_established(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        # Read now: asyncio's TLS transport cannot answer get_extra_info() once closed twice.
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.tls_cipher = None if cipher is None else cipher[0]
        self._ready = self._loop.create_future()
        self.engine.tls_established()
        self.flush()

    async def authenticate(
        self, credentials: Credentials, allow_plaintext_auth: bool
    ) -> Authenticated | AuthFailed:
        self._auth = self._loop.create_future()
        self.engine.authenticate(credentials, allow_plaintext_auth=allow_plaintext_auth)
        self.pump()  # a refusal before anything is sent (no TLS) is there already
        try:
            return await self._auth
        finally:
            self._auth = None

    async def quit(self) -> None:
        self._quit = self._loop.create_future()
        self.engine.quit()
        self.flush()
        await self._quit


def _go_on(hook: ResultHook, result: TransactionResult) -> bool:
    """The hook's word; a hook that fails holds the output (its caller must look and release)."""
    try:
        return hook(result)
    except Exception:
        log.exception("a result hook failed; the connection's output is held")
        return False


def _resolve(future: asyncio.Future[_T], value: _T) -> None:
    if not future.done():  # the waiter may have been cancelled
        future.set_result(value)


class OutboundConnection:
    """One SMTP session to a mail exchanger, ready to send; made by :func:`connect`.

    ``send()`` may be called again before an earlier one returned: the
    transactions are pipelined on the connection and each call gets its own
    result. Use it as an async context manager to QUIT at the end.
    """

    def __init__(self, session: _Session, server_hostname: str) -> None:
        self._session = session
        self.server_hostname = server_hostname

    # -- what it is ---------------------------------------------------------------------

    @property
    def capabilities(self) -> Mapping[str, str]:
        """The server's EHLO extensions (after STARTTLS, the ones offered inside TLS)."""
        return self._session.engine.capabilities

    @property
    def peer_ip(self) -> str:
        return self._session.peer_ip

    @property
    def tls_version(self) -> str | None:
        """Like "TLSv1.3"; None without TLS. Still known after close()."""
        return self._session.tls_version

    @property
    def tls_cipher(self) -> str | None:
        """Like "TLS_AES_256_GCM_SHA384"; None without TLS. Still known after close()."""
        return self._session.tls_cipher

    @property
    def auth_mechanism(self) -> str | None:
        """The SASL mechanism AUTH succeeded with ("PLAIN", "LOGIN"); None without AUTH."""
        return self._session.engine.auth_mechanism

    @property
    def messages_sent(self) -> int:
        """Messages the server accepted (2xx to the end of data) on this connection."""
        return self._session.engine.messages_accepted

    @property
    def closed(self) -> bool:
        return self._session.engine.closed

    @property
    def close_reason(self) -> str | None:
        closed = self._session.closed
        return None if closed is None else closed.reason

    # -- what it does -----------------------------------------------------------------------

    async def send(
        self,
        mail_from: str,
        recipients: Iterable[str],
        data: bytes,
        *,
        smtputf8: bool = False,
        eight_bit: bool = False,
        size: int | None = None,
        crlf_only: bool = False,
    ) -> TransactionResult:
        """Send one message; returns when the server has answered it.

        Refusals are in the result, not raised. Raises :class:`ConnectionClosed`
        (or what ended the session) only if the connection was over before.
        The options are :meth:`ClientConnection.send_message`'s.
        """
        return await self.submit(
            mail_from,
            recipients,
            data,
            smtputf8=smtputf8,
            eight_bit=eight_bit,
            size=size,
            crlf_only=crlf_only,
        )

    def submit(
        self,
        mail_from: str,
        recipients: Iterable[str],
        data: bytes,
        *,
        smtputf8: bool = False,
        eight_bit: bool = False,
        size: int | None = None,
        crlf_only: bool = False,
        on_result: ResultHook | None = None,
    ) -> asyncio.Future[TransactionResult]:
        """Queue one message on the connection; the future of its result.

        :meth:`send` without the wait, so a caller can queue the next message
        while this one is under way: its commands then go out with this one's
        content, one round trip per message. ``on_result``, when given, is
        called with the result as soon as it is read, before anything more
        is written on the connection; if it returns False, nothing more is
        written until :meth:`release` (the delivery worker journals an
        accepted copy there before the next copy may leave).
        """
        session = self._session
        self._check_open()
        future: asyncio.Future[TransactionResult] = asyncio.get_running_loop().create_future()
        session.sends.append((future, on_result))
        try:
            session.engine.send_message(
                mail_from,
                recipients,
                data,
                smtputf8=smtputf8,
                eight_bit=eight_bit,
                size=size,
                crlf_only=crlf_only,
            )
        except BaseException:
            session.sends.remove((future, on_result))
            raise
        session.pump()  # sends the commands; a local refusal has its result already
        return future

    def abort(self, reason: str) -> None:
        """End the session at once, without QUIT: nothing more queued on it is sent.

        Messages still queued get their results as when a connection is lost
        (a local ``451 4.4.2`` with ``reason``).
        """
        self._session.abort(reason)

    def release(self) -> None:
        """Write what a result hook held back (a no-op when nothing is held)."""
        session = self._session
        if session.held:
            session.held = False
            session.flush()

    async def reset(self) -> Reply:
        """RSET, e.g. before reusing a cached connection; returns the server's reply.

        Not needed between messages: a transaction the server may still hold
        open is reset automatically before the next one.
        """
        session = self._session
        self._check_open()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        session.resets.append(future)
        session.engine.reset()
        session.flush()
        return await future

    async def close(self) -> None:
        """QUIT (after any transaction still under way), then close. Never raises."""
        session = self._session
        if not session.engine.closed and not session.closed_by_us:
            session.closed_by_us = True
            await session.quit()
        transport = session.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def _check_open(self) -> None:
        session = self._session
        if session.closed is not None:
            raise session.error()
        if session.closed_by_us:
            raise ConnectionClosed(f"the connection to {session.label} is closed")

    async def __aenter__(self) -> OutboundConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def connect(
    host: str,
    port: int,
    *,
    helo_name: str,
    tls: TlsPolicy,
    server_hostname: str,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 30.0,
    command_timeout: float = 300.0,
    source_address: str | None = None,
    credentials: Credentials | None = None,
    allow_plaintext_auth: bool = False,
) -> OutboundConnection:
    """Connect to ``host`` (an address, usually), greet, STARTTLS per ``tls``, then AUTH.

    ``server_hostname`` is the MX host name: it is sent in SNI and, with
    ``tls="required"``, the certificate must be valid for it. ``ssl_context``
    replaces the system CA store for required TLS (opportunistic TLS verifies
    nothing). ``command_timeout`` bounds every wait for the server, including
    the greeting and the TLS handshake. With ``credentials`` the connection is
    returned only once authenticated, else :class:`AuthenticationFailed`.
    """
    loop = asyncio.get_running_loop()
    label = host if host == server_hostname else f"{server_hostname}[{host}]"
    session = _Session(ClientConnection(helo_name), f"{label}:{port}", command_timeout)
    local_addr = (source_address, 0) if source_address else None
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(lambda: session, host, port, local_addr=local_addr)
    except TimeoutError:
        raise ConnectTimeout(
            f"connection to {label}:{port} timed out after {connect_timeout:g} seconds"
        ) from None
    except ConnectionRefusedError:
        raise ConnectionRefused(f"connection to {label}:{port} refused") from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {label}:{port}: {exc.strerror or exc}") from exc
    try:
        capabilities = await session.ready()
        if tls != "none":
            await _negotiate_tls(session, capabilities, tls, server_hostname, ssl_context)
        if credentials is not None:
            await _authenticate(session, credentials, allow_plaintext_auth)
    except BaseException:
        session.abort("connection abandoned during setup")
        raise
    return OutboundConnection(session, server_hostname)


async def _negotiate_tls(
    session: _Session,
    capabilities: Capabilities,
    tls: TlsPolicy,
    server_hostname: str,
    ssl_context: ssl.SSLContext | None,
) -> None:
    required = tls == "required"
    if "STARTTLS" not in capabilities.extensions:
        if required:
            reason = f"{server_hostname} did not offer STARTTLS"
            session.quit_and_close(reason)
            raise TlsRequired(reason, status="4.7.4")
        return
    answer = await session.start_tls()
    if isinstance(answer, Reply):
        if required:
            reason = f"{server_hostname} refused STARTTLS: {answer}"
            session.quit_and_close(reason)
            raise TlsRequired(reason, status="4.7.4", reply=answer)
        return  # opportunistic: go on in plaintext, as Postfix does
    context = (ssl_context or _system_context()) if required else _unverified_context()
    transport = session.transport
    if transport is None:
        raise session.error()
    try:
        new_transport = await asyncio.get_running_loop().start_tls(
            transport,
            session,
            context,
            server_hostname=server_hostname,
            ssl_handshake_timeout=session.command_timeout,
        )
    except ssl.SSLCertVerificationError as exc:
        reason = f"certificate for {server_hostname} is not valid: {exc.verify_message}"
        session.abort(reason, "4.7.5")
        raise TlsRequired(reason) from exc
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        reason = f"TLS handshake with {server_hostname} failed: {detail}"
        session.abort(reason, "4.7.5")
        if required:
            raise TlsRequired(reason) from exc
        raise TlsHandshakeFailed(reason) from exc
    if new_transport is None:
        session.abort(f"TLS handshake with {server_hostname} failed", "4.7.5")
        raise session.error()
    session.tls_established(new_transport)
    await session.ready()


async def _authenticate(
    session: _Session, credentials: Credentials, allow_plaintext_auth: bool
) -> None:
    """AUTH, or :class:`AuthenticationFailed` saying why (the engine has ended the session)."""
    answer = await session.authenticate(credentials, allow_plaintext_auth)
    if isinstance(answer, Authenticated):
        return
    reply = answer.reply
    if reply is None:
        detail, status = answer.reason, None
    else:
        detail, status = str(reply), reply.enhanced or f"{reply.code // 100}.7.0"
    raise AuthenticationFailed(
        f"authentication to {session.label} failed: {detail}",
        temporary=answer.temporary,
        status=status,
        reply=reply,
    )
