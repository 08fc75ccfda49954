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

Deadlines, so that a server cannot hold a connection (and the worker's share
of ``delivery.concurrency``) for as long as it likes by answering slowly:

- **Per reply** (Postfix's ``smtp_per_record_deadline`` idea, applied to whole
  replies): each reply must be complete within ``command_timeout`` of when it
  began to be awaited, that is when its command went out or the reply before
  it ended. Bytes that trickle in do not extend it: a server sending one byte
  every 299 s used to keep one reply going for months.
- **Sending**: a reply cannot come before the server has taken what it
  answers, so while some of our output is unacknowledged (in the transport's
  buffer or the kernel's send queue, which holds megabytes), the reply's
  clock starts again each time that amount is seen to shrink (looked at once
  a second while there is some). A receiver that reads slowly but steadily
  is not cut off for that (the transaction deadline bounds it); one that
  takes nothing for ``command_timeout`` is (the "send deadline").
- **Per connection attempt**: connect, greeting, EHLO, STARTTLS and the second
  EHLO, AUTH, all within ``connect_timeout + 2 * command_timeout``: one
  ``command_timeout`` for a greeting delayed on purpose (greet-pause), one for
  every other exchange together, which honest servers answer in seconds.
- **Per message transaction**: from the moment a transaction is the oldest
  unanswered one (MAIL FROM) to the reply to the end of its data, at most
  ``2 * command_timeout + size / MIN_DATA_RATE``: one ``command_timeout`` for
  the envelope's replies, one for the reply to the content (servers scan it
  then), and the content's transfer at no less than 10 KB/s. A 10 MB message
  may take 1,000 s more; a trickle of bytes cannot stretch it further.

When a reply, sending or transaction deadline passes, the session is aborted
without QUIT and every message still on it gets a local ``451 4.4.2`` whose
text names the deadline; a connection attempt past its deadline raises
:class:`CommandTimeout`. Either way the connection is closed, never reused.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import math
import ssl
import struct
import termios
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, TypeVar, cast

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
    "MIN_DATA_RATE",
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

# Bytes per second a message transaction is given for its content (see the module docstring).
MIN_DATA_RATE: Final = 10_000.0
# Seconds between looks at what the server has not acknowledged yet, while there is some.
_SEND_POLL: Final = 1.0
# Linux's SIOCOUTQ: bytes in a TCP socket's send queue the peer has not acknowledged.
_SIOCOUTQ: Final[int | None] = getattr(termios, "TIOCOUTQ", None)


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

    def __init__(
        self,
        engine: ClientConnection,
        label: str,
        command_timeout: float,
        min_data_rate: float = MIN_DATA_RATE,
    ) -> None:
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
        self.min_data_rate = min_data_rate
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when _timer fires
        self._timed_out = False
        self._abortive = False  # close the transport without flushing it
        # When the reply now due began to be awaited; None while none is due.
        self._reply_clock: float | None = None
        # Bytes written and not acknowledged when last looked; -1 after a write, until looked.
        self._unsent = 0
        self._fd: int | None = None  # the socket, for _unacknowledged()
        # The oldest unanswered transaction's deadline, and the allowance it was given.
        self._txn_deadline: float | None = None
        self._txn_allowance = 0.0
        self._ready: asyncio.Future[Capabilities] = self._loop.create_future()
        self._tls: asyncio.Future[TlsReady | Reply] | None = None
        self._auth: asyncio.Future[Authenticated | AuthFailed] | None = None
        # each queued message's future, the hook to call on its result first, its size
        self.sends: deque[tuple[asyncio.Future[TransactionResult], ResultHook | None, int]] = (
            deque()
        )
        self.held = False  # output kept back until release() (a ResultHook said so)
        self.resets: deque[asyncio.Future[Reply]] = deque()
        self._quit: asyncio.Future[None] | None = None

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else ""
        sock = transport.get_extra_info("socket")
        self._fd = None if sock is None or _SIOCOUTQ is None else int(sock.fileno())
        self._arm()

    def data_received(self, data: bytes) -> None:
        engine = self.engine
        replies = engine.replies_received
        engine.receive_data(data)
        if engine.replies_received != replies:
            self._reply_clock = None  # the next reply's clock starts now (in _arm)
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
                if not self.sends:  # a bug, not the server's doing; the session must go on
                    log.error("%s: a transaction result nobody waits for: %s", self.label, event)
                    continue
                future, hook, _ = self.sends.popleft()
                self.time_transaction()
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
        sends = (future for future, _, _ in self.sends)
        for future in (self._ready, self._tls, self._auth, *self.resets, *sends):
            if future is not None and not future.done():
                future.set_exception(self.error())
                future.exception()  # nobody may be waiting; do not log it as unretrieved
        self.resets.clear()
        self.sends.clear()
        self._txn_deadline = None
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
            self._unsent = -1  # looked at when a deadline comes: a syscall per write would cost
        self._arm()

    def time_transaction(self) -> None:
        """Start the deadline of the oldest unanswered transaction (see the module docstring).

        Called when that transaction changes (one queued on an idle session,
        the one before it answered) and when held output is released: the
        time our own journal or database took is not the server's.
        """
        if not self.sends:
            self._txn_deadline = None
            return
        allowance = 2 * self.command_timeout + self.sends[0][2] / self.min_data_rate
        self._txn_allowance = allowance
        self._txn_deadline = self._loop.time() + allowance
        self._arm()

    def _arm(self) -> None:
        """Keep one timer at the earliest deadline; moved only when one comes earlier.

        One timer per session, not one per read or write: re-arming costs
        more than the comparisons (uvloop makes a new handle each time).
        """
        engine = self.engine
        if engine.closed:
            return
        clock = self._reply_clock
        if not engine.waiting:
            clock = self._reply_clock = None
        elif clock is None:
            clock = self._reply_clock = self._loop.time()
        due = math.inf
        if clock is not None:
            if self._unsent > 0:  # sending: judged by progress, looked at every poll
                due = self._loop.time() + min(_SEND_POLL, self.command_timeout / 4)
            else:
                due = clock + self.command_timeout
        if self._txn_deadline is not None and not self.held:
            due = min(due, self._txn_deadline)
        if due == math.inf:
            return  # a timer still set finds nothing due and lapses
        timer = self._timer
        if timer is not None:
            if self._timer_at <= due:
                return
            timer.cancel()
        self._timer_at = due
        self._timer = self._loop.call_at(due, self._check_timeout)

    def _check_timeout(self) -> None:
        self._timer = None
        engine = self.engine
        if engine.closed:
            return
        now = self._loop.time()
        awaiting = engine.awaiting
        deadline = self._txn_deadline
        if deadline is not None and now >= deadline and not self.held:
            size = self.sends[0][2] if self.sends else 0
            self._expire(
                f"transaction deadline passed: no result after {self._txn_allowance:.1f} "
                f"seconds for a {size}-byte message, waiting for "
                f"{awaiting or 'the server'}"
            )
            return
        clock = self._reply_clock
        if clock is not None and awaiting is not None:
            unsent = self._unacknowledged()
            known, self._unsent = self._unsent, unsent
            if 0 <= unsent < known:  # the server took some (all, at 0): it was not idle
                self._reply_clock = clock = now
            elif unsent and known < 0:  # progress unknown: look again before judging
                self._arm()
                return
            if now - clock >= self.command_timeout:
                if unsent:
                    reason = (
                        f"timed out after {self.command_timeout:g} seconds with {unsent} "
                        f"bytes still to send: the server stopped reading (send deadline)"
                    )
                else:
                    reason = (
                        f"timed out after {self.command_timeout:g} seconds waiting for "
                        f"{awaiting} (reply deadline)"
                    )
                self._expire(reason)
                return
        self._arm()

    def _unacknowledged(self) -> int:
        """Bytes written that the server has not acknowledged yet.

        Those still in the transport's buffer, and those in the kernel's send
        queue (Linux ``SIOCOUTQ``; elsewhere the call fails once and they go
        uncounted). The kernel takes megabytes at once, so the transport's
        buffer alone looks empty long before a slow receiver has read the
        content, and the reply to it cannot come before.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return 0
        unsent = transport.get_write_buffer_size()
        fd = self._fd
        if fd is not None and _SIOCOUTQ is not None:
            try:
                queued: int = struct.unpack("i", fcntl.ioctl(fd, _SIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                self._fd = None
            else:
                unsent += queued
        return unsent

    def _expire(self, reason: str) -> None:
        """A deadline passed: abort, so nothing more is sent and the connection is not reused."""
        self._timed_out = self._abortive = True
        self.engine.abort(reason)
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
        entry = (future, on_result, len(data))
        session.sends.append(entry)
        if len(session.sends) == 1:
            session.time_transaction()
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
            session.sends.remove(entry)
            session.time_transaction()
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
            session.time_transaction()
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
        """QUIT (after any transaction still under way), then close. Never raises.

        The 221 is waited for within the reply deadline; a caller in more of
        a hurry (a worker stopping) cancels, and the connection is then
        aborted rather than left open behind it.
        """
        session = self._session
        if not session.engine.closed and not session.closed_by_us:
            session.closed_by_us = True
            try:
                await session.quit()
            except BaseException:
                session.abort("closing was cancelled")
                raise
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
    min_data_rate: float = MIN_DATA_RATE,
) -> OutboundConnection:
    """Connect to ``host`` (an address, usually), greet, STARTTLS per ``tls``, then AUTH.

    ``server_hostname`` is the MX host name: it is sent in SNI and, with
    ``tls="required"``, the certificate must be valid for it. ``ssl_context``
    replaces the system CA store for required TLS (opportunistic TLS verifies
    nothing). ``command_timeout`` bounds every wait for the server, including
    the greeting and the TLS handshake; the whole attempt, and each message
    transaction later, have deadlines of their own (``min_data_rate`` sizes
    a transaction's; see the module docstring). With ``credentials`` the
    connection is returned only once authenticated, else
    :class:`AuthenticationFailed`.
    """
    loop = asyncio.get_running_loop()
    allowance = connect_timeout + 2 * command_timeout
    deadline = loop.time() + allowance
    label = host if host == server_hostname else f"{server_hostname}[{host}]"
    session = _Session(
        ClientConnection(helo_name), f"{label}:{port}", command_timeout, min_data_rate
    )
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
    setup = asyncio.timeout_at(deadline)
    try:
        async with setup:
            capabilities = await session.ready()
            if tls != "none":
                await _negotiate_tls(session, capabilities, tls, server_hostname, ssl_context)
            if credentials is not None:
                await _authenticate(session, credentials, allow_plaintext_auth)
    except TimeoutError:
        if not setup.expired():
            session.abort("connection abandoned during setup")
            raise
        reason = (
            f"connection deadline passed: not ready to send after {allowance:g} seconds "
            "(connect, greeting, EHLO, STARTTLS, AUTH)"
        )
        session.abort(reason)
        raise CommandTimeout(f"{session.label}: {reason}") from None
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
