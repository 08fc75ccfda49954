"""The SMTP listeners: sockets, TLS and timers around the sans-IO engine.

This module only moves bytes and calls decisions made elsewhere: the protocol
is ``protocol.Connection``, authentication is ``Authenticator``, what happens
to a message is ``intake.pipeline`` and the ``Committer``. Each session is an
``asyncio.Protocol`` (no stream wrappers, no task per connection) because the
per-connection cost is what decides how many clients one process can hold and
how many messages a second it can take.

What one intake process holds is bounded: connections per listener
(``smtp.max_connections``, refused with ``421 4.7.0``), the bytes of messages
waiting for their commit (``smtp.max_pending_bytes``, ``452 4.3.1``) and the
time a session waits for a commit (``smtp.commit_timeout``, ``451 4.3.0``).
Without them a commit process or database that stopped answering kept every
session waiting after DATA, with no log line, until clients gave up, and kept
every message those sessions received in memory.

Log lines are ``key=value`` pairs; every value that comes from outside (a
reply text quoting a header, an error, a user name) goes through
:func:`_logfmt`, so that neither a control character nor a forged
``key=value`` reaches the log as such.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, cast

from postlane import metrics
from postlane.config import ListenerSettings, Settings
from postlane.errors import CommitFailed, InvalidInput, MessageRejected
from postlane.intake import pipeline
from postlane.intake.committer import CommitResult, Committer
from postlane.intake.queue_id import new_queue_id
from postlane.smtp import protocol as p
from postlane.smtp.authenticator import Authenticator
from postlane.smtp.proxy import MAX_PROXY_HEADER, parse_proxy_header
from postlane.smtp.tls import TlsContextHolder
from postlane.store.intake import NewMessage
from postlane.store.schema import utc_now
from postlane.store.smtp_users import SmtpUser
from postlane.tenants.directory import TenantDirectory, TenantSnapshot

log = logging.getLogger("postlane.smtp")
_NO_POSTMASTER: Final = p.Reply(
    550, "5.1.1", ("<postmaster> needs a domain here: this server keeps no mailboxes",)
)
_CREDENTIALS_REVOKED: Final = p.Reply(
    421, "4.7.0", ("Credentials changed or revoked, log in again",)
)
# RFC 3463 X.3.1 "mail system full" is the mail system's storage, not a
# mailbox's (X.2.2), and RFC 5321 gives 452 "insufficient system storage" to
# MAIL and DATA alike: a transient refusal that says why.
_NO_STORAGE: Final = p.Reply(452, "4.3.1", ("Insufficient system storage, try again later",))
_TOO_MANY_CONNECTIONS: Final = p.Reply(
    421, "4.7.0", ("Too many connections, try again later",)
).to_bytes()
_LOG_EVERY: Final = 60.0  # seconds between two lines about one recurring condition


class _Recurring:
    """At most one log line a minute about a condition that recurs per message or connection."""

    __slots__ = ("_next", "suppressed")

    def __init__(self) -> None:
        self._next = 0.0
        self.suppressed = 0

    def due(self) -> bool:
        """True when a line may be logged now; otherwise the occurrence is counted."""
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + _LOG_EVERY
        return True

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


class PendingCommits:
    """The messages of one intake process that wait for their commit, by size.

    Each is also held by its session (as received, and as it will be stored),
    so this bounds memory while commits are slow or stopped. A message is
    refused only when others wait too: one larger than the limit on its own
    still gets through when nothing else waits.

    It also notes stalls, commits that miss their deadline, so that a stall
    is logged once as an ERROR, not once per deferred message.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._refusals = _Recurring()
        self._stall_lines = _Recurring()
        self._stalled_since: float | None = None
        self._stall_logged = False
        self._overdue = 0

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def reserve(self, size: int) -> bool:
        if self.bytes and self.bytes + size > self.max_bytes:
            if self._refusals.due():
                log.warning(
                    "messages waiting for their commit hold %d bytes (smtp.max_pending_bytes "
                    "= %d): refusing more with 452 4.3.1 (%d refusal(s) since the last such line)",
                    self.bytes,
                    self.max_bytes,
                    self._refusals.take_suppressed() + 1,
                )
            return False
        self.bytes += size
        return True

    def release(self, size: int) -> None:
        self.bytes -= size

    def overdue(self, session_id: str, queue_id: str, timeout: float) -> None:
        """A commit missed its deadline: the first of a stall is logged."""
        self._overdue += 1
        if self._stalled_since is not None:
            return
        self._stalled_since = time.monotonic()
        self._stall_logged = self._stall_lines.due()
        if self._stall_logged:
            log.error(
                "session=%s queue_id=%s commit not answered in %g s (smtp.commit_timeout): "
                "the commit process or the database is stuck; sessions get 451 4.3.0 until "
                "commits are answered again (logged once per stall)",
                _logfmt(session_id),
                _logfmt(queue_id),
                timeout,
            )

    def answered(self) -> None:
        """A commit was answered in time: a stall, if any, is over."""
        if self._stalled_since is None:
            return
        if self._stall_logged:
            log.warning(
                "commits are answered again after a stall of %.1f s; "
                "%d message(s) got 451 4.3.0 meanwhile",
                time.monotonic() - self._stalled_since,
                self._overdue,
            )
        self._stalled_since = None
        self._overdue = 0


@dataclass(frozen=True, slots=True)
class ListenerContext:
    """What every session of one listener shares."""

    name: str
    settings: ListenerSettings
    policy: p.SessionPolicy
    limits: pipeline.IntakeLimits
    command_timeout: float
    data_timeout: float
    commit_timeout: float = 30.0
    max_connections: int = 2000
    #: Shared by every listener of the process.
    pending: PendingCommits = field(default_factory=lambda: PendingCommits(256 * 1024 * 1024))
    #: The sessions open now: counted from connection_made to connection_lost,
    #: so a connection that never completes its TLS handshake holds no place.
    sessions: set[SmtpSession] = field(default_factory=set)


class SmtpSession(asyncio.Protocol):
    """One client connection."""

    def __init__(
        self,
        listener: ListenerContext,
        directory: TenantDirectory,
        authenticator: Authenticator,
        committer: Committer,
        tls: TlsContextHolder,
        on_close: Callable[[SmtpSession], None] | None = None,
    ) -> None:
        self._listener = listener
        self._on_close = on_close
        self.task: asyncio.Future[None] | None = None
        self._directory = directory
        self._auth = authenticator
        self._committer = committer
        self._tls = tls
        self._transport: asyncio.Transport | None = None
        self._conn: p.Connection | None = None
        self._proxy_buffer: bytearray | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_input = 0.0  # loop time of the last bytes from the client
        self._busy = False  # an asynchronous decision is under way
        # Decrypted bytes the TLS layer delivers before start_tls() has returned
        # (asyncio's own loop does this): kept for the engine, never dropped.
        self._tls_early: bytearray | None = None
        self._in_transaction = False
        self._closing = False
        # The tenant snapshot the authenticated user was last found valid in.
        self._credentials_checked: TenantSnapshot | None = None
        self.session_id = new_queue_id()
        self.client_ip = "unknown"
        self.helo = ""
        self.tls_info: str | None = None
        self.sender: pipeline.Sender | None = None
        self.bounce_account: int | None = None
        self.accepted = 0
        self.rejected = 0
        self.close_reason = "closed"
        self.started = time.monotonic()

    # -- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._listener.sessions.add(self)
        peer = self._transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else "unknown"
        metrics.SMTP_CONNECTIONS.labels(self._listener.name).inc()
        metrics.SMTP_SESSIONS_ACTIVE.inc()
        self._loop = asyncio.get_running_loop()
        self._last_input = self._loop.time()
        self._arm_timer()
        settings = self._listener.settings
        if settings.proxy_protocol:
            if not settings.proxy_peer_trusted(self.client_ip):
                self.close_reason = "PROXY listener: peer not in proxy_trusted_networks"
                self._abort()
                return
            self._proxy_buffer = bytearray()
            return
        self._begin()

    def data_received(self, data: bytes) -> None:
        if self._loop is not None:
            self._last_input = self._loop.time()  # the timer looks when it fires
        if self._proxy_buffer is not None:
            self._proxy_data(data)
            return
        if self._tls_early is not None:
            self._tls_early += data
            return
        if self._conn is None:
            return
        self._conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool | None:
        if self._conn is not None and not self._conn.closed:
            self._conn.receive_data(b"")
            self._pump()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        metrics.SMTP_SESSIONS_ACTIVE.dec()
        self._listener.sessions.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if exc is not None and self.close_reason == "closed":
            self.close_reason = f"connection lost: {exc}"
        log.info(
            "session=%s client=%s user=%s tls=%s accepted=%d rejected=%d seconds=%.3f result=%s",
            _logfmt(self.session_id),
            _logfmt(self.client_ip),
            _logfmt(self.sender.name if self.sender else "-"),
            _logfmt(self.tls_info or "none"),
            self.accepted,
            self.rejected,
            time.monotonic() - self.started,
            _logfmt(self.close_reason),
        )
        self._transport = None
        if self._on_close is not None:
            self._on_close(self)

    # -- session start -------------------------------------------------------------

    def _proxy_data(self, data: bytes) -> None:
        assert self._proxy_buffer is not None
        self._proxy_buffer += data
        try:
            info, used = parse_proxy_header(bytes(self._proxy_buffer))
        except InvalidInput as exc:
            self.close_reason = f"bad PROXY header: {exc}"
            self._abort()
            return
        if used == 0:
            # The parser bounds the header itself (v1 by the spec, v2 by its
            # length field), whatever the reads; this only guards the buffer.
            if len(self._proxy_buffer) > MAX_PROXY_HEADER:
                self.close_reason = "PROXY header too long"
                self._abort()
            return
        rest = bytes(self._proxy_buffer[used:])
        self._proxy_buffer = None
        if info is not None and info.source_address:
            self.client_ip = info.source_address
        self._begin(rest)

    def _begin(self, early: bytes = b"") -> None:
        implicit = self._listener.settings.tls == "implicit"
        if implicit:  # the event loop did the handshake before connection_made
            self.tls_info = _tls_description(self._transport)
        self._start_engine(tls_active=implicit)
        if early:
            self.data_received(early)

    def _start_engine(self, *, tls_active: bool) -> None:
        self._conn = p.Connection(self._listener.policy, tls_active=tls_active)
        account = self._directory.snapshot.trusted_account(self.client_ip)
        if account is not None and account.smtp_enabled:
            self.sender = self._sender_for(account.id, None)
            self._conn.authenticate_as(f"trusted:{account.name}")
        self._flush()

    # -- the event loop of one session --------------------------------------------------

    def _pump(self) -> None:
        conn = self._conn
        if conn is None:
            return
        while not self._busy and (event := conn.next_event()) is not None:
            self._handle(event)
        self._flush()

    def _handle(self, event: p.Event) -> None:
        conn = self._conn
        assert conn is not None
        if isinstance(event, p.Hello):
            self.helo = event.name
            self._end_transaction()  # HELO/EHLO also ends a mail transaction
        elif isinstance(event, p.StartTLS):
            self._flush()
            self._go_async(self._upgrade())
        elif isinstance(event, p.AuthAttempt):
            self._authenticate(event)
        elif isinstance(event, p.MailFrom):
            reply = self._mail_from(event)
            self._in_transaction = reply is None  # a refused MAIL starts no transaction
            conn.answer(reply)
        elif isinstance(event, p.Rcpt):
            conn.answer(self._rcpt(event))
        elif isinstance(event, p.MessageReceived):
            self._message(event)
        elif isinstance(event, p.Reset | p.TransactionAborted):
            self._end_transaction()
        elif isinstance(event, p.CloseRequested):
            self.close_reason = event.reason
            self._flush()
            self._close()

    def _go_async(self, coro: Any) -> None:
        """Run a decision that waits (hashing, committing); input waits with it."""
        self._busy = True
        if self._transport is not None:
            self._transport.pause_reading()
        self.task = asyncio.ensure_future(self._run_async(coro))

    async def _run_async(self, coro: Any) -> None:
        try:
            await coro
        except Exception:
            log.exception("session=%s internal error", _logfmt(self.session_id))
            self.close_reason = "internal error"
            self._write(p.Reply(421, "4.3.0", ("Internal error, closing connection",)).to_bytes())
            self._close()
            return
        finally:
            self._busy = False
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()
            self._pump()

    # -- STARTTLS and implicit TLS ---------------------------------------------------------

    async def _upgrade(self) -> None:
        transport = self._transport
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        self._tls_early = bytearray()
        try:
            new_transport = await loop.start_tls(
                transport, self, self._tls.context, server_side=True, ssl_handshake_timeout=30
            )
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
            self.close_reason = f"TLS handshake failed: {exc}"
            self._abort()
            return
        finally:
            early, self._tls_early = self._tls_early, None
        if new_transport is None:
            self.close_reason = "TLS handshake failed"
            return
        self._transport = new_transport
        self.tls_info = _tls_description(new_transport)
        assert self._conn is not None
        self._conn.tls_started()
        if self._conn.authenticated is None:  # STARTTLS forgets an AUTH made before it
            self.sender = None
        self._flush()
        if early:  # already decrypted: the client's first command after the handshake
            self._conn.receive_data(bytes(early))

    # -- AUTH ---------------------------------------------------------------------------------

    def _authenticate(self, event: p.AuthAttempt) -> None:
        conn = self._conn
        assert conn is not None
        if event.authzid and event.authzid.lower() != event.username.lower():
            # RFC 4616 section 2: act as the authzid or fail; nobody may act as
            # another user here. Logins compare case-insensitively, so the
            # authzid does too, and the refusal is the one for a wrong password.
            log.warning(
                "auth refused ip=%s user=%s authzid=%s: acting as another user",
                _logfmt(self.client_ip),
                _logfmt(event.username),
                _logfmt(event.authzid),
            )
            conn.auth_failed()
            return
        result = self._auth.quick(self.client_ip, event.username, event.password)
        if result is None:
            self._go_async(self._authenticate_slowly(event))
            return
        self._auth_result(event, result.verdict, result.user)

    async def _authenticate_slowly(self, event: p.AuthAttempt) -> None:
        result = await self._auth.verify(self.client_ip, event.username, event.password)
        self._auth_result(event, result.verdict, result.user)

    def _auth_result(self, event: p.AuthAttempt, verdict: str, user: Any) -> None:
        conn = self._conn
        assert conn is not None
        if verdict == "ok" and user is not None:
            self.sender = self._sender_for(user.account_id, user)
            self._credentials_checked = None  # the next MAIL compares with this user
            conn.auth_succeeded(user.username)
        elif verdict == "throttled":
            conn.auth_failed(p.Reply(421, "4.7.0", ("Too many failed authentications, try later",)))
            self.close_reason = "auth throttled"
            self._flush()
            self._close()
        else:
            conn.auth_failed()
            if self._auth.quick(self.client_ip, event.username, "") is not None:
                # that failure crossed the limit: say so and hang up
                self._write(p.Reply(421, "4.7.0", ("Too many failed authentications",)).to_bytes())
                self.close_reason = "auth throttled"
                self._close()

    def _sender_for(self, account_id: int, user: Any) -> pipeline.Sender:
        """One Sender per account and user per snapshot: its option layers are built once."""
        snapshot = self._directory.snapshot
        key = ("sender", account_id, user.id if user is not None else None)
        sender: pipeline.Sender | None = snapshot.memo.get(key)
        if sender is None or sender.user is not user:
            sender = pipeline.Sender(
                account=snapshot.accounts[account_id],
                user=user,
                sending_domains=snapshot.sending_domains(account_id),
            )
            snapshot.memo[key] = sender
        return sender

    # -- envelope -------------------------------------------------------------------------------

    def _mail_from(self, event: p.MailFrom) -> p.Reply | None:
        if self._listener.pending.full:  # as Postfix does when its queue has no room
            return _NO_STORAGE
        sender = self.sender
        if sender is None:
            return None  # unauthenticated (non-submission listener): judged per recipient
        snapshot = self._directory.snapshot
        if sender.user is not None and snapshot is not self._credentials_checked:
            # A session outlives AUTH for as long as the client sends NOOPs: a
            # reset password or a disabled user must end it too, or resetting
            # a leaked password would not cut off whoever holds it.
            revoked = _credentials_revoked(snapshot, sender.user)
            if revoked is not None:
                log.warning(
                    "session=%s client=%s user=%s result=refused reason=%s",
                    _logfmt(self.session_id),
                    _logfmt(self.client_ip),
                    _logfmt(sender.user.username),
                    _logfmt(revoked),
                )
                return _CREDENTIALS_REVOKED  # a 421: the engine closes the session
            self._credentials_checked = snapshot  # snapshots never change once made
        if not snapshot.accounts.get(sender.account.id, sender.account).smtp_enabled:
            return p.Reply(550, "5.7.1", ("Sending is disabled for this account",))
        problems = pipeline.envelope_sender_problems(sender, event.address)
        if problems and sender.account.unauthorised_sender_policy == "block":
            return p.Reply(550, "5.7.1", (_ascii(problems[0].reason),))
        return None

    def _rcpt(self, event: p.Rcpt) -> p.Reply | None:
        if "@" not in event.address:
            # RCPT TO:<Postmaster>, the one address without a domain (RFC 5321
            # section 4.5.1). Postlane keeps no mailboxes: queued, it would be
            # sent to a domain called "postmaster"; refused as relaying, the
            # reply would not say why.
            return _NO_POSTMASTER
        if self.sender is not None:
            return None
        domain = event.address.rpartition("@")[2].lower()
        snapshot = self._directory.snapshot
        if domain not in snapshot.bounce_domains:
            return p.Reply(554, "5.7.1", (f"<{_ascii(event.address)}>: Relay access denied",))
        owner = next(
            (
                d.account_id
                for ds in snapshot.domains.values()
                for d in ds
                if f"{d.return_path_subdomain}.{d.name}" == domain
            ),
            None,
        )
        if self.bounce_account is not None and owner != self.bounce_account:
            return p.Reply(452, "4.5.3", ("Too many recipients, send the rest separately",))
        self.bounce_account = owner
        return None

    # -- the message ---------------------------------------------------------------------------

    def _message(self, event: p.MessageReceived) -> None:
        queue_id = new_queue_id()
        now = utc_now()
        try:
            message = self._build(event, queue_id, now)
        except MessageRejected as exc:
            self._rejected(exc.code, exc.enhanced, exc.text, queue_id)
            return
        except Exception:
            # A fault of ours, not the client's: it may send again later, and
            # it must hear so rather than lose the connection mid-transaction.
            log.exception(
                "session=%s queue_id=%s intake failed", _logfmt(self.session_id), _logfmt(queue_id)
            )
            self._rejected(451, "4.3.0", "Local error in processing, try again later", queue_id)
            return
        self._go_async(self._commit(message, len(event.recipients)))

    def _build(self, event: p.MessageReceived, queue_id: str, now: Any) -> NewMessage:
        envelope = pipeline.Envelope(
            session_id=self.session_id,
            client_ip=self.client_ip,
            helo=self.helo,
            tls=self.tls_info,
            authenticated=self.sender is not None and self.sender.user is not None,
            mail_from=event.mail_from,
            recipients=event.recipients,
            data=event.data,
            eight_bit=event.body == "8BITMIME" or event.smtputf8,
        )
        if self.sender is not None:
            accepted = pipeline.accept(
                self.sender, envelope, queue_id=queue_id, now=now, limits=self._listener.limits
            )
            return accepted.message
        if self.bounce_account is None:
            raise MessageRejected(554, "5.7.1", "Relay access denied")
        return pipeline.inbound(
            self.bounce_account, envelope, queue_id=queue_id, now=now, limits=self._listener.limits
        )

    async def _commit(self, message: NewMessage, recipients: int) -> None:
        """Wait for the commit, at most ``commit_timeout``: then answer 451 and stop waiting.

        The deadline is below the minutes clients wait for the reply to the
        end of DATA (RFC 5321 section 4.5.3.2.6 suggests 10; many give up
        after 60 s), so that they hear 451 and retry, rather than time out
        not knowing. A message may still commit after its 451 (the
        committer logs what became of it); the retry is then a duplicate.
        """
        conn = self._conn
        assert conn is not None
        pending = self._listener.pending
        size = len(message.raw)
        if not pending.reserve(size):
            self._rejected(_NO_STORAGE.code, "4.3.1", _NO_STORAGE.lines[0], message.id)
            return
        deadline = asyncio.timeout(self._listener.commit_timeout)
        try:
            async with deadline:
                result: CommitResult = await self._committer.commit(message)
        except TimeoutError:
            if not deadline.expired():
                raise
            pending.overdue(self.session_id, message.id, self._listener.commit_timeout)
            self._rejected(451, "4.3.0", "Temporary storage failure, try again later", message.id)
            return
        except CommitFailed as exc:
            pending.answered()
            log.error(
                "session=%s queue_id=%s result=deferred error=%s",
                _logfmt(self.session_id),
                _logfmt(message.id),
                _logfmt(exc),
            )
            self._rejected(451, "4.3.0", "Temporary storage failure, try again later", message.id)
            return
        finally:
            pending.release(size)
        pending.answered()
        self._end_transaction()
        self.accepted += 1
        metrics.SMTP_MESSAGES_ACCEPTED.inc()
        metrics.SMTP_MESSAGE_BYTES.inc(size)
        metrics.SMTP_MESSAGE_SIZE.observe(size)
        note = f" duplicate_of={_logfmt(result.duplicate_of)}" if result.duplicate_of else ""
        log.info(
            "session=%s queue_id=%s client=%s user=%s tls=%s size=%d recipients=%d "
            "result=accepted%s",
            _logfmt(self.session_id),
            _logfmt(result.queue_id),
            _logfmt(self.client_ip),
            _logfmt(self.sender.name if self.sender else "-"),
            _logfmt(self.tls_info or "none"),
            size,
            recipients,
            note,
        )
        text = f"Ok: queued as {result.queue_id} LaunchID={result.queue_id}"
        conn.answer_message(p.Reply(250, "2.0.0", (text,)))

    def _rejected(self, code: int, enhanced: str, text: str, queue_id: str) -> None:
        assert self._conn is not None
        self._end_transaction()
        self.rejected += 1
        metrics.SMTP_MESSAGES_REJECTED.labels(enhanced).inc()
        log.info(
            "session=%s queue_id=%s client=%s user=%s result=rejected reply=%s",
            _logfmt(self.session_id),
            _logfmt(queue_id),
            _logfmt(self.client_ip),
            _logfmt(self.sender.name if self.sender else "-"),
            _logfmt(f"{code} {enhanced} {text}"),
        )
        self._conn.answer_message(p.Reply(code, enhanced, (_ascii(text),)))

    def _end_transaction(self) -> None:
        """The envelope is gone (message answered, RSET, EHLO): so is what it decided."""
        self.bounce_account = None
        if self._in_transaction:
            self._in_transaction = False
            if self._timer is not None:  # the command limit applies again, from the last input
                self._arm_timer()

    # -- output, timers, closing -----------------------------------------------------------------

    def _flush(self) -> None:
        if self._conn is not None:
            data = self._conn.data_to_send()
            if data:
                self._write(data)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _limit(self) -> float:
        return (
            self._listener.data_timeout if self._in_transaction else self._listener.command_timeout
        )

    def _arm_timer(self) -> None:
        """Wake up when the client will have been silent for the limit of the current state.

        Input only notes its time; the timer, when it fires, looks whether
        anything came since and sleeps again until the new deadline. Moving
        the timer on every read (uvloop cancels and creates a timer handle
        each time) cost about 5% of a session's CPU: 215-230 against 204-212
        us per session in an in-process loop of 10,000 sessions, by hand.
        """
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._last_input + self._limit(), self._timed_out)

    def _timed_out(self) -> None:
        assert self._loop is not None
        self._timer = None
        if self._busy:  # our own work is slow, not the client: wait again
            self._last_input = self._loop.time()
            self._arm_timer()
            return
        if self._loop.time() < self._last_input + self._limit():
            self._arm_timer()
            return
        self.close_reason = "timeout"
        if self._conn is not None:
            self._conn.timed_out()
            self._flush()
        self._close()

    def shutdown(self) -> None:
        """Server is stopping: idle sessions are told so and closed; busy ones finish."""
        if self._busy or self._closing:
            return
        self.close_reason = "server shutdown"
        self._write(p.Reply(421, "4.3.2", ("Service shutting down, try again later",)).to_bytes())
        self._close()

    @property
    def busy(self) -> bool:
        return self._busy

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


def _tls_description(transport: asyncio.BaseTransport | None) -> str | None:
    """ "TLSv1.3 TLS_AES_256_GCM_SHA384", for logs, events and the Received header."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()


def _credentials_revoked(snapshot: TenantSnapshot, user: SmtpUser) -> str | None:
    """Why a session's user may no longer send (None when it still may).

    Compared with the user as it was at AUTH: a new password hash means a
    reset, whoever holds the old password. Looked up by the user's own name
    (always a key of the snapshot's logins), so an AUTH with an alias is
    checked too; a different id under that name is a different user. The
    account's own switch is checked by the caller, for every sender.
    """
    fresh = snapshot.users.get(user.username.lower())
    if fresh is None or fresh.id != user.id or fresh.account_id != user.account_id:
        return "user removed or renamed"
    if not fresh.active:
        return "user disabled"
    if fresh.password_hash != user.password_hash:
        return "password changed"
    return None


def _ascii(text: str) -> str:
    """Reply text must be printable ASCII: replace anything else (e.g. UTF-8 addresses)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


#: A value a key=value reader takes whole and as it is: printable ASCII
#: without space, quote, backslash or "=".
_LOGFMT_BARE = re.compile(r"[!#-<>-\[\]-~]+")


def _logfmt(value: object) -> str:
    """``value`` for a ``key=value`` log line: as it is, or quoted with escapes.

    A value with a space or "=" is quoted, so that text from a client (a
    folded header quoted in a rejection, say) cannot add fields such as
    ``result=accepted``; a quote or backslash in it is escaped with a
    backslash, and every character that is not printable (ESC, CR, LF, C1
    controls, U+2028, bidirectional overrides) as ``\\xNN``, ``\\uNNNN``
    or ``\\UNNNNNNNN``, so that none reaches a terminal or splits a line.
    """
    text = str(value)
    if _LOGFMT_BARE.fullmatch(text):
        return text
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    return f'"{text}"'


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class SmtpServer:
    """The SMTP role: every configured listener, the tenant cache and the intake writer."""

    name = "smtp"

    def __init__(
        self,
        settings: Settings,
        directory: TenantDirectory,
        authenticator: Authenticator,
        committer: Committer,
        tls: TlsContextHolder,
    ) -> None:
        self._settings = settings
        self._directory = directory
        self._auth = authenticator
        self._committer = committer
        self._tls = tls
        self._servers: list[asyncio.Server] = []
        self._contexts: list[ListenerContext] = []
        self._pending = PendingCommits(settings.smtp.max_pending_bytes)
        self._refresh: asyncio.Task[None] | None = None

    def _context(self, listener: ListenerSettings) -> ListenerContext:
        s = self._settings.smtp
        policy = p.SessionPolicy(
            hostname=self._settings.hostname,
            max_message_size=s.max_message_size,
            max_recipients=s.max_recipients,
            max_errors=s.max_errors,
            max_command_line=s.max_line_length,
            starttls_available=listener.tls == "starttls",
            require_tls_for_auth=listener.require_tls_for_auth,
            allow_plaintext_auth=listener.allow_plaintext_auth,
            auth_required=listener.submission,
        )
        limits = pipeline.IntakeLimits(
            hostname=self._settings.hostname,
            max_received=s.max_received_headers,
            max_queue_lifetime=timedelta(seconds=self._settings.delivery.max_queue_lifetime),
            duplicate_detection=s.duplicate_window > 0,
        )
        return ListenerContext(
            name=f"{listener.address}:{listener.port}",
            settings=listener,
            policy=policy,
            limits=limits,
            command_timeout=s.command_timeout,
            data_timeout=s.data_timeout,
            commit_timeout=s.commit_timeout,
            max_connections=s.max_connections,
            pending=self._pending,
        )

    async def start(self) -> None:
        await asyncio.to_thread(self._directory.reload)
        await self._committer.open()
        loop = asyncio.get_running_loop()
        for listener in self._settings.smtp.listeners:
            context = self._context(listener)
            self._contexts.append(context)
            refusals = _Recurring()

            def factory(
                context: ListenerContext = context, refusals: _Recurring = refusals
            ) -> asyncio.Protocol:
                if len(context.sessions) >= context.max_connections:
                    _log_refusal(context, refusals)
                    return _Refusal()
                return SmtpSession(context, self._directory, self._auth, self._committer, self._tls)

            server = await loop.create_server(
                factory,
                listener.address,
                listener.port,
                reuse_address=True,
                # Several intake processes (smtp.processes) listen on one port;
                # the kernel spreads new connections over them.
                reuse_port=self._settings.smtp.processes > 1,
                backlog=1024,
                ssl=self._tls.context if listener.tls == "implicit" else None,
                ssl_handshake_timeout=30 if listener.tls == "implicit" else None,
            )
            self._servers.append(server)
            log.info("SMTP listening on %s (tls=%s)", context.name, listener.tls)
        self._refresh = asyncio.ensure_future(self._directory.run())

    def reload(self) -> None:
        """Read the certificate files again (the runtime calls this on SIGHUP)."""
        self._tls.reload()

    async def stop(self) -> None:
        """Close the listeners, let commits under way be answered, then close the committer.

        Bounded by ``commit_timeout`` (and a second): each commit a session
        waits for ends by its deadline, and what the committer still has by
        then belongs to sessions that gave up.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.smtp.commit_timeout + 1.0
        for server in self._servers:
            server.close()
        self._servers.clear()
        for session in self._open_sessions():
            session.shutdown()
        in_flight = [
            s.task for s in self._open_sessions() if s.task is not None and not s.task.done()
        ]
        if in_flight:  # messages being committed get their 250 (or 451) before we go
            await asyncio.wait(in_flight, timeout=deadline - loop.time())
            for session in self._open_sessions():  # those that were busy
                session.shutdown()
        if self._refresh is not None:
            self._refresh.cancel()
        await self._committer.close(max(1.0, deadline - loop.time()))

    def _open_sessions(self) -> list[SmtpSession]:
        return [session for context in self._contexts for session in context.sessions]


class _Refusal(asyncio.Protocol):
    """A connection above ``smtp.max_connections``: told so and closed, no session made.

    Postfix's ``process_limit`` makes clients wait in the listen queue
    instead; a reply lets them go to another MX or retry later at once.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.Transport, transport)
        writer.write(_TOO_MANY_CONNECTIONS)
        writer.close()


def _log_refusal(context: ListenerContext, refusals: _Recurring) -> None:
    if refusals.due():
        log.warning(
            "listener %s has %d connections (smtp.max_connections): new ones get "
            "421 4.7.0 (%d refused since the last such line)",
            context.name,
            len(context.sessions),
            refusals.take_suppressed() + 1,
        )
