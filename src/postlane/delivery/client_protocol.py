"""The SMTP client protocol as a sans-IO state machine: Postlane's outbound side.

Why our own client: delivery has to reach twice Postfix's end-to-end rate on
two cores, and that needs connection reuse and command pipelining (RFC 2920)
on every connection. ``smtplib`` is blocking, sends one command per round trip
and cannot overlap transactions; an asyncio SMTP library awaits a coroutine per
command, the same per-command overhead that made us write our own server engine
(``smtp/protocol.py``). So this engine follows the server's style: it is fed
bytes and hands back events and the bytes to send; it owns no socket, clock or
thread, every path is driven byte by byte from a test, and
``delivery/client.py`` stays a thin asyncio.Protocol around it.

Driving it::

    conn = ClientConnection("out.example.com")
    conn.send_message(...)                  # may come before the greeting: it waits its turn
    while not closed:
        conn.receive_data(recv())           # b"" when the server closed its side
        while (event := conn.next_event()) is not None:
            ...                             # Greeting, Capabilities, Reply, TransactionResult...
        send(conn.data_to_send())

What it does, and why:

- **Pipelining.** With PIPELINING, ``MAIL``, every ``RCPT`` and ``DATA`` go in
  one write, and the next transaction's commands go in the same write as the
  previous message's content (RFC 2920 §3.1 allows content to start a group).
  So a stream of messages costs one round trip each, not 2 + recipients.
  Without PIPELINING, one command at a time, and no ``RCPT`` after a refused
  ``MAIL`` nor ``DATA`` when every ``RCPT`` was refused.
- **No valid recipients.** A pipelining client sends ``DATA`` before it knows
  whether any ``RCPT`` worked. RFC 2920 §3.1: "the client cannot assume that
  the DATA command will be rejected just because none of the RCPT TO commands
  worked ... if the DATA command was accepted the client SMTP should send a
  single dot." That is what happens; the result then counts as failed.
- **RSET only when needed.** A transaction left open on the server (``MAIL``
  accepted, then no content) is closed with ``RSET`` before the next ``MAIL``,
  pipelined with it. After a message was sent there is nothing to reset, so a
  stream of messages does not pay a round trip per message for it.
- **Results, always.** Every ``send_message`` ends in exactly one
  :class:`TransactionResult`, in call order, even when the connection dies:
  recipients already refused keep their reply (a 550 is an answer), the others
  get the server's ``421`` or a local ``451 4.4.2`` saying what was lost.
- **Refusing locally what would be refused remotely.** A message larger than
  the server's SIZE, one needing SMTPUTF8 from a server without it, 8-bit
  content for a server without 8BITMIME: these are answered here, before a
  byte is sent, with the enhanced code a server would use (5.3.4, 5.6.7,
  5.6.3), marked ``local``. Downgrading (RFC 6152 §3 conversion to 7-bit,
  RFC 6532 downgrade) is out of scope: it would change signed content.
- **Dot-stuffing and line ends.** Content is normalised to CRLF line ends
  (bare CR and bare LF alike, RFC 5321 §2.3.8 forbids both on the wire, and
  they are what SMTP smuggling is built from), every line starting with "."
  gets another, and the terminator follows a CRLF.
- **STARTTLS.** After the ``220`` any bytes already received are plaintext a
  man in the middle may have injected (the client side of CVE-2011-0411); the
  session is ended rather than read them as if they came over TLS. After the
  handshake everything learnt before it is forgotten and ``EHLO`` is sent again
  (RFC 3207 §4.2).
- **AUTH** (RFC 4954), when the driver asks with :meth:`ClientConnection.authenticate`
  (after STARTTLS, so the mechanisms come from the EHLO inside TLS): PLAIN
  with an initial response, else LOGIN's two challenges. The credentials are
  not sent at all without TLS unless ``allow_plaintext_auth`` says so. AUTH
  ends a pipelined group even where RFC 4954 §4 would let PLAIN lead one:
  a MAIL sent behind a refused AUTH would be refused as a relay attempt, a
  5xx the recipient would pay for. If AUTH fails the session ends (QUIT when
  the server is still listening): mail must not go out unauthenticated, and
  work queued behind it gets a local ``451 4.7.0``, never the server's 535.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from postlane.delivery.sasl import (
    Credentials,
    choose_mechanism,
    decode_challenge,
    login_response,
    offered_mechanisms,
    plain_response,
)
from postlane.render.line_ends import crlf_lines
from postlane.smtp.addresses import AddressError, split_path

__all__ = [
    "AuthFailed",
    "Authenticated",
    "Capabilities",
    "ClientConnection",
    "Closed",
    "Event",
    "Greeting",
    "Reply",
    "TlsReady",
    "TransactionResult",
    "prepare_content",
]

# A reply line may carry an RFC 3463 status after the code (RFC 2034); servers
# send it whether or not they announced ENHANCEDSTATUSCODES, so it is always read.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|$)")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HELO_NAME = re.compile(r"[\x21-\x7e]+")
# One reply (all its lines) larger than this is not SMTP: end the session
# instead of buffering whatever the peer sends.
_MAX_REPLY = 64 * 1024
# A SIZE value longer than this is read as no limit (see _size_limit).
_MAX_SIZE_DIGITS = 18


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply, or a result made locally (``local``) that stands in for one.

    ``command`` says what it answers ("MAIL FROM", "RCPT TO", "DATA", "end of
    DATA", ...), for messages like "550 5.1.1 ... (in reply to RCPT TO)".
    ``text`` has the lines of a multi-line reply joined by newlines, each
    without its enhanced status code.

    As an event, one comes for every command answered, except where a more
    specific event says it all: an accepted EHLO/HELO is :class:`Capabilities`,
    the 220 to STARTTLS is :class:`TlsReady`, the AUTH dialogue is summed up
    in :class:`Authenticated` or :class:`AuthFailed`, a reply that ends the
    session is in :class:`Closed`, and the RSET the engine sends on its own
    before a MAIL is not reported (so every RSET reply seen answers a reset()
    call).
    """

    code: int
    enhanced: str | None
    text: str
    command: str = ""
    local: bool = False

    @property
    def ok(self) -> bool:
        """2xx or 3xx: the command worked."""
        return self.code < 400

    @property
    def temporary(self) -> bool:
        """A 4xx: worth trying again later."""
        return 400 <= self.code < 500

    def __str__(self) -> str:
        status = f" {self.enhanced}" if self.enhanced else ""
        return f"{self.code}{status} {self.text}".rstrip()


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's 220; a refusal (any other code) is a :class:`Closed` instead."""

    code: int
    text: str


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The EHLO reply's extensions, keyword upper-cased -> parameters ("" if none).

    Empty after a fallback to HELO. Sent again after STARTTLS, which makes the
    earlier set void.
    """

    extensions: dict[str, str]


@dataclass(frozen=True, slots=True)
class TlsReady:
    """The server said 220 to STARTTLS: do the handshake, then call tls_established()."""


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The server said 235 to AUTH: mail may go out; ``mechanism`` is the one used."""

    mechanism: str


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """AUTH did not succeed, and :class:`Closed` follows.

    ``reply`` is the server's refusal (535, 454...); None when the engine did
    not send the credentials (no TLS, no AUTH offered, no mechanism in common)
    or the server answered out of turn. ``reason`` says which, never with a
    credential in it.
    """

    reason: str
    reply: Reply | None = None

    @property
    def temporary(self) -> bool:
        """False only for the server's 5xx: the same credentials will not do better later."""
        return self.reply is None or self.reply.code < 500


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """The outcome of one send_message(), reported in the order they were called.

    ``recipients`` maps each recipient to its RCPT reply, or what stands for it:
    the refusal of MAIL, a local refusal, or the reply that ended the session
    before that RCPT was answered. ``data_reply`` is the reply to the content
    (or the refusal of DATA, or the end of the session) when at least one
    recipient was accepted; None when none was, because then no content was
    sent. ``mail_reply`` is the reply to MAIL FROM, None if it never came.
    """

    recipients: dict[str, Reply]
    data_reply: Reply | None
    mail_reply: Reply | None = None

    @property
    def delivered(self) -> list[str]:
        """The recipients the server took responsibility for."""
        data = self.data_reply
        if data is None or data.code >= 300:
            return []
        return [r for r, reply in self.recipients.items() if reply.code < 300]

    def outcome(self, recipient: str) -> Reply:
        """The reply that decides ``recipient``: its refusal, or the data reply."""
        reply = self.recipients[recipient]
        if reply.code >= 400 or self.data_reply is None:
            return reply
        return self.data_reply


@dataclass(frozen=True, slots=True)
class Closed:
    """The session is over; ``reply`` is the server's reply that ended it, if one did."""

    reason: str
    reply: Reply | None = None


Event = (
    Greeting
    | Capabilities
    | TlsReady
    | Authenticated
    | AuthFailed
    | Reply
    | TransactionResult
    | Closed
)


class _Phase(enum.Enum):
    GREETING = enum.auto()  # waiting for the 220
    HELLO = enum.auto()  # EHLO or HELO in flight
    READY = enum.auto()  # jobs may run
    TLS_WAIT = enum.auto()  # 220 to STARTTLS received; the driver does the handshake
    CLOSED = enum.auto()


class _Kind(enum.Enum):
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    DOT = "end of DATA"
    RSET = "RSET"
    QUIT = "QUIT"


# RFC 2920 §3.1 and RFC 3207 §4.2: these change the session's state, so they
# end a group and nothing is sent after them until they are answered.
# AUTH too (see the module docstring): its outcome decides whether MAIL may follow.
_GROUP_END = frozenset({_Kind.EHLO, _Kind.HELO, _Kind.STARTTLS, _Kind.AUTH, _Kind.DATA, _Kind.QUIT})


class _Transaction:
    """One send_message() from start to result."""

    __slots__ = (
        "accepted",
        "crlf_only",
        "data",
        "data_reply",
        "eight_bit",
        "mail_from",
        "mail_reply",
        "recipients",
        "refused",
        "result",
        "size",
        "smtputf8",
        "unanswered",
    )

    def __init__(
        self,
        mail_from: str,
        recipients: tuple[str, ...],
        data: bytes,
        smtputf8: bool,
        eight_bit: bool,
        size: int,
        crlf_only: bool = False,
    ) -> None:
        self.mail_from = mail_from
        self.recipients = recipients
        self.data = data
        self.crlf_only = crlf_only
        self.smtputf8 = smtputf8
        self.eight_bit = eight_bit
        self.size = size
        self.mail_reply: Reply | None = None
        # RCPT replies as they come: refusals (also local ones) and acceptances apart.
        self.refused: dict[str, Reply] = {}
        self.accepted: dict[str, Reply] = {}
        self.unanswered = 0
        self.data_reply: Reply | None = None
        self.result: TransactionResult | None = None


class _Command:
    __slots__ = ("kind", "line", "rcpt", "txn")

    def __init__(
        self, kind: _Kind, line: bytes, txn: _Transaction | None = None, rcpt: str = ""
    ) -> None:
        self.kind = kind
        self.line = line
        self.txn = txn
        self.rcpt = rcpt


class _Auth:
    """One authenticate() from its start to 235 or failure; dropped with its credentials then."""

    __slots__ = ("allow_plaintext", "credentials", "mechanism", "step")

    def __init__(self, credentials: Credentials, allow_plaintext: bool) -> None:
        self.credentials = credentials
        self.allow_plaintext = allow_plaintext
        self.mechanism = ""
        self.step = 0  # LOGIN challenges answered so far


_Job = _Transaction | _Kind | _Auth


def _local(code: int, enhanced: str, text: str, command: _Kind) -> Reply:
    return Reply(code, enhanced, text, command.value, local=True)


def _valid_path(address: str, *, sender: bool) -> bool:
    """Whether ``<address>`` is a valid SMTP path; also stops command injection."""
    try:
        mailbox, rest = split_path(
            f"<{address}>", null_allowed=sender, postmaster_allowed=not sender
        )
    except AddressError:
        return False
    return mailbox == address and not rest


def prepare_content(data: bytes, *, crlf_only: bool = False) -> bytes:
    """The bytes to send after 354: CRLF line ends, dot-stuffed, with the terminator.

    Bare CR and bare LF both become CRLF; every line that starts with "." gets
    another "." (RFC 5321 §4.5.2); a last line without a line end gets one; then
    ".\\r\\n". Empty content is just the terminator. ``crlf_only`` is the
    caller's word that ``data`` has no bare CR or LF (a DKIM-signed copy from
    :func:`postlane.render.dkim.prepare` has none), which skips looking:
    three passes over the message, 10% of the delivery role's time with
    Python's lock while draining a bench/relay backlog.
    """
    if not crlf_only:
        data = crlf_lines(data)
    if not data:
        return b".\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data[0] == 0x2E:  # "."
        data = b"." + data
    if not data.endswith(b"\r\n"):
        return data + b"\r\n.\r\n"
    return data + b".\r\n"


class ClientConnection:
    """One outbound SMTP session: reply bytes in, events and command bytes out."""

    __slots__ = (
        "_active",
        "_auth_asked",
        "_buf",
        "_events",
        "_extensions",
        "_helo_line",
        "_inflight",
        "_jobs",
        "_lines",
        "_out",
        "_phase",
        "_pipelining",
        "_queue",
        "_quitting",
        "_reply_code",
        "_reply_size",
        "_running",
        "_server_txn_open",
        "_tls",
        "auth_mechanism",
        "messages_accepted",
        "replies_received",
    )

    def __init__(self, helo_name: str) -> None:
        if not _HELO_NAME.fullmatch(helo_name):
            raise ValueError(f"not a valid EHLO name: {helo_name!r}")
        self._helo_line = helo_name.encode("ascii")
        self._phase = _Phase.GREETING
        self._buf = bytearray()
        self._lines: list[bytes] = []  # the lines of a multi-line reply read so far
        self._reply_code = 0
        self._reply_size = 0
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._extensions: dict[str, str] = {}
        self._pipelining = False
        self._tls = False
        # Jobs not started yet; the started job that still holds the line (a
        # transaction until its DATA is answered, STARTTLS until the new EHLO,
        # AUTH until its 235); commands not yet written; commands written and
        # not yet answered.
        self._jobs: deque[_Job] = deque()
        self._running: _Job | None = None
        self._queue: deque[_Command] = deque()
        self._inflight: deque[_Command] = deque()
        # Started transactions without a result yet, oldest first (results go out in order).
        self._active: deque[_Transaction] = deque()
        self._server_txn_open = False  # MAIL accepted and no content sent since
        self._quitting = False
        self._auth_asked = False
        # The mechanism AUTH succeeded with; None until then (and without AUTH).
        self.auth_mechanism: str | None = None
        self.messages_accepted = 0
        # Complete replies read so far: a driver timing each reply sees one end by this.
        self.replies_received = 0

    # -- the driver's side -----------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._phase is _Phase.CLOSED

    @property
    def capabilities(self) -> Mapping[str, str]:
        """The extensions of the last EHLO reply (empty before it and after HELO)."""
        return self._extensions

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def waiting(self) -> bool:
        """Whether a reply is due from the server (cheap; for arming a timer)."""
        phase = self._phase
        return phase is _Phase.GREETING or (
            bool(self._inflight) and phase is not _Phase.TLS_WAIT and phase is not _Phase.CLOSED
        )

    @property
    def awaiting(self) -> str | None:
        """What the engine waits for from the server, for timeouts; None when nothing."""
        phase = self._phase
        if phase is _Phase.GREETING:
            return "the server greeting"
        if phase is _Phase.CLOSED or phase is _Phase.TLS_WAIT or not self._inflight:
            return None
        return f"the reply to {self._inflight[0].kind.value}"

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; ``b""`` means it closed its side."""
        phase = self._phase
        if phase is _Phase.CLOSED:
            return
        if not data:
            if self._quitting:
                self._close("the connection was closed after QUIT", None)
            else:
                self.abort("the server closed the connection")
            return
        if phase is _Phase.TLS_WAIT:
            self._injected()
            return
        self._buf += data
        self._read_replies()
        self._start_jobs()
        self._write()

    def send_message(
        self,
        mail_from: str,
        recipients: Iterable[str],
        data: bytes,
        *,
        smtputf8: bool = False,
        eight_bit: bool = False,
        size: int | None = None,
        crlf_only: bool = False,
    ) -> None:
        """Queue one message; its :class:`TransactionResult` comes after earlier ones.

        ``mail_from`` is "" for the null sender. Recipients are sent once each,
        in order. ``smtputf8`` says the message needs SMTPUTF8 (UTF-8 headers);
        non-ASCII addresses ask for it by themselves. ``eight_bit`` declares
        8-bit content; content with 8-bit bytes counts as such anyway. ``size``
        is the SIZE= estimate, ``len(data)`` by default. ``crlf_only``: see
        :func:`prepare_content`.
        """
        self._check_open()
        unique = tuple(dict.fromkeys(recipients))
        if not unique:
            raise ValueError("a message needs at least one recipient")
        txn = _Transaction(
            mail_from,
            unique,
            data,
            smtputf8,
            eight_bit,
            len(data) if size is None else size,
            crlf_only,
        )
        self._jobs.append(txn)
        self._start_jobs()
        self._write()

    def reset(self) -> None:
        """Send RSET (after earlier work); its reply comes as a :class:`Reply` event."""
        self._enqueue_job(_Kind.RSET)

    def start_tls(self) -> None:
        """Send STARTTLS; :class:`TlsReady` or a refusing :class:`Reply` follows."""
        if self._tls:
            raise RuntimeError("TLS is already active")
        self._enqueue_job(_Kind.STARTTLS)

    def authenticate(self, credentials: Credentials, *, allow_plaintext_auth: bool = False) -> None:
        """AUTH after earlier work; :class:`Authenticated`, or :class:`AuthFailed` and the end.

        The mechanism is chosen when the line is free, from the EHLO reply in
        force then: ask after STARTTLS (even before its handshake), and the
        list offered inside TLS is used. Without TLS at that moment the
        credentials are not sent unless ``allow_plaintext_auth``.
        """
        self._check_open()
        if self._auth_asked:
            raise RuntimeError("AUTH was asked for already; a session authenticates once")
        self._auth_asked = True
        self._jobs.append(_Auth(credentials, allow_plaintext_auth))
        self._start_jobs()
        self._write()

    def quit(self) -> None:
        """Send QUIT after earlier work; :class:`Closed` follows its reply."""
        self._enqueue_job(_Kind.QUIT)
        self._quitting = True

    def tls_established(self) -> None:
        """The handshake after :class:`TlsReady` finished: start again with EHLO."""
        if self._phase is not _Phase.TLS_WAIT:
            raise RuntimeError("tls_established() needs a TlsReady first")
        self._tls = True
        self._extensions = {}
        self._pipelining = False
        self._hello(_Kind.EHLO)

    def abort(self, reason: str, *, enhanced: str = "4.4.2") -> None:
        """The session is lost (timeout, reset, handshake failure): finish everything.

        Unanswered work gets a local ``451`` with ``enhanced`` and ``reason``.
        """
        if self._phase is _Phase.CLOSED:
            return
        command = self._inflight[0].kind.value if self._inflight else ""
        self._close(reason, None, Reply(451, enhanced, reason, command, local=True))

    # -- jobs -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._phase is _Phase.CLOSED:
            raise RuntimeError("the connection is closed")
        if self._quitting:
            raise RuntimeError("QUIT has been queued; nothing may follow it")

    def _enqueue_job(self, kind: _Kind) -> None:
        self._check_open()
        self._jobs.append(kind)
        self._start_jobs()
        self._write()

    def _start_jobs(self) -> None:
        """Start queued jobs, in order, while the line is free."""
        jobs = self._jobs
        while jobs and self._running is None and self._phase is _Phase.READY:
            job = jobs.popleft()
            if isinstance(job, _Transaction):
                self._start_transaction(job)
            elif isinstance(job, _Auth):
                self._start_auth(job)
            elif job is _Kind.RSET:
                self._server_txn_open = False
                self._queue.append(_Command(_Kind.RSET, b"RSET\r\n"))
            else:  # STARTTLS and QUIT hold the line until they are answered
                self._running = job
                self._queue.append(_Command(job, job.value.encode("ascii") + b"\r\n"))

    def _start_transaction(self, txn: _Transaction) -> None:
        """Queue txn's commands; in ``_active`` only once its fate is settled.

        Never raises: txn has left ``_jobs`` already, and a transaction in
        neither place, or one in ``_active`` with an exception flying, would
        break the promise of one result per send_message() in call order,
        which the driver relies on to pair results with their callers. A
        bug in building MAIL FROM costs this message a local 451, not the
        session's order.
        """
        try:
            params = self._mail_parameters(txn)
        except Exception as exc:
            why = f"internal error preparing MAIL FROM: {type(exc).__name__}: {exc}"[:200]
            self._refuse_all(txn, _local(451, "4.3.0", why, _Kind.MAIL))
            params = None
        self._active.append(txn)
        if params is None or len(txn.refused) == len(txn.recipients):
            self._finish(txn)
            return
        queue = self._queue
        if self._server_txn_open:
            queue.append(_Command(_Kind.RSET, b"RSET\r\n", txn))
        queue.append(
            _Command(
                _Kind.MAIL, b"MAIL FROM:<" + txn.mail_from.encode() + b">" + params + b"\r\n", txn
            )
        )
        for rcpt in txn.recipients:
            if rcpt not in txn.refused:
                queue.append(
                    _Command(_Kind.RCPT, b"RCPT TO:<" + rcpt.encode() + b">\r\n", txn, rcpt)
                )
                txn.unanswered += 1
        queue.append(_Command(_Kind.DATA, b"DATA\r\n", txn))
        self._running = txn

    def _mail_parameters(self, txn: _Transaction) -> bytes | None:
        """The MAIL FROM parameters, or None after refusing the message locally.

        Recipients that cannot be sent (bad syntax, non-ASCII without SMTPUTF8)
        are refused one by one in ``txn.refused``.
        """
        ext = self._extensions
        if not _valid_path(txn.mail_from, sender=True):
            self._refuse_all(txn, _local(501, "5.1.7", "bad sender address syntax", _Kind.MAIL))
            return None
        utf8_offered = "SMTPUTF8" in ext
        needs_utf8 = txn.smtputf8 or not txn.mail_from.isascii()
        if needs_utf8 and not utf8_offered:
            self._refuse_all(
                txn,
                _local(
                    553,
                    "5.6.7",
                    "the message needs SMTPUTF8 (non-ASCII addresses or headers) "
                    "and the server does not offer it",
                    _Kind.MAIL,
                ),
            )
            return None
        for rcpt in txn.recipients:
            if not _valid_path(rcpt, sender=False):
                txn.refused[rcpt] = _local(501, "5.1.3", "bad recipient address syntax", _Kind.RCPT)
            elif not rcpt.isascii():
                if utf8_offered:
                    needs_utf8 = True
                else:
                    txn.refused[rcpt] = _local(
                        553,
                        "5.6.7",
                        "a non-ASCII address needs SMTPUTF8 and the server does not offer it",
                        _Kind.RCPT,
                    )
        limit = _size_limit(ext.get("SIZE"))
        if limit and txn.size > limit:
            self._refuse_all(
                txn,
                _local(
                    552,
                    "5.3.4",
                    f"message size {txn.size} exceeds the server's limit of {limit} bytes",
                    _Kind.MAIL,
                ),
            )
            return None
        eight_bit = txn.eight_bit or not txn.data.isascii()
        params = b""
        if ext.get("SIZE") is not None:
            params += b" SIZE=%d" % txn.size
        if eight_bit:
            if "8BITMIME" in ext:
                params += b" BODY=8BITMIME"
            elif not needs_utf8:  # RFC 6531 §3.1: SMTPUTF8 implies 8-bit content
                self._refuse_all(
                    txn,
                    _local(
                        554,
                        "5.6.3",
                        "the message has 8-bit content and the server does not offer "
                        "8BITMIME; conversion to 7-bit is not done",
                        _Kind.MAIL,
                    ),
                )
                return None
        if needs_utf8:
            params += b" SMTPUTF8"
        return params

    def _refuse_all(self, txn: _Transaction, reply: Reply) -> None:
        for rcpt in txn.recipients:
            txn.refused.setdefault(rcpt, reply)

    def _finish(self, txn: _Transaction, closing: Reply | None = None) -> None:
        """Make txn's result; send out every result that is next in order."""
        mail = txn.mail_reply
        mail_refused = mail is not None and mail.code >= 400
        recipients: dict[str, Reply] = {}
        accepted = False
        for rcpt in txn.recipients:
            reply = txn.refused.get(rcpt)
            if reply is not None and (reply.local or not mail_refused):
                pass  # refused here, or by the server in a transaction that was open
            elif mail_refused:
                assert mail is not None
                reply = mail  # the RCPT replies after a refused MAIL say nothing more
            else:
                reply = txn.accepted.get(rcpt)
                if reply is None:
                    assert closing is not None  # only the end of the session leaves one open
                    reply = closing
                else:
                    accepted = True
            recipients[rcpt] = reply
        data_reply = txn.data_reply
        if closing is not None and accepted and data_reply is None:
            data_reply = closing
        txn.result = TransactionResult(recipients, data_reply if accepted else None, mail)
        txn.data = b""
        active = self._active
        while active and active[0].result is not None:
            result = active.popleft().result
            assert result is not None
            self._events.append(result)

    # -- writing ------------------------------------------------------------------

    def _write(self) -> None:
        """Write queued commands as far as pipelining allows."""
        queue = self._queue
        if not queue or self._phase is not _Phase.READY:
            return
        inflight = self._inflight
        out = self._out
        pipelining = self._pipelining
        while queue:
            if inflight and (not pipelining or inflight[-1].kind in _GROUP_END):
                return
            command = queue.popleft()
            inflight.append(command)
            out.append(command.line)

    def _hello(self, kind: _Kind) -> None:
        self._phase = _Phase.HELLO
        self._inflight.append(_Command(kind, b""))
        self._out.append(kind.value.encode("ascii") + b" " + self._helo_line + b"\r\n")

    # -- reading -------------------------------------------------------------------

    def _read_replies(self) -> None:
        buf = self._buf
        pos = 0
        lines = self._lines
        while True:
            end = buf.find(b"\n", pos)
            if end < 0:
                break
            line = bytes(buf[pos : end - 1 if end > pos and buf[end - 1] == 0x0D else end])
            self._reply_size += end + 1 - pos
            pos = end + 1
            code = int(line[:3]) if len(line) >= 3 and line[:3].isdigit() else 0
            if not 200 <= code <= 599 or (len(line) > 3 and line[3] not in b" -"):
                self._protocol_error(f"malformed reply line {_show(line)}")
                return
            if lines and code != self._reply_code:
                self._protocol_error("a multi-line reply changed its code")
                return
            if self._reply_size > _MAX_REPLY:
                self._protocol_error("reply too long")
                return
            self._reply_code = code
            lines.append(line[4:])
            if len(line) > 3 and line[3] == 0x2D:  # "-": more lines follow
                continue
            self._lines = []
            self._reply_size = 0
            self.replies_received += 1
            self._on_reply(self._reply_code, lines)
            lines = self._lines
            if self._phase is _Phase.CLOSED:
                return
            if self._phase is _Phase.TLS_WAIT:
                if pos < len(buf):
                    self._injected()
                    return
                self._events.append(TlsReady())
                break
        if pos:
            del buf[:pos]
        if len(buf) + self._reply_size > _MAX_REPLY:
            self._protocol_error("reply too long")

    def _injected(self) -> None:
        self._protocol_error(
            "the server sent more after its 220 to STARTTLS (possible response injection)"
        )

    def _on_reply(self, code: int, lines: list[bytes]) -> None:
        phase = self._phase
        if phase is _Phase.GREETING:
            self._greeting(code, lines)
            return
        inflight = self._inflight
        if not inflight:
            reply = _make_reply(code, lines, "")
            if code == 421:
                self._close(f"the server closed the session: {reply}", reply)
            else:
                self._protocol_error(f"unexpected reply {reply}")
            return
        command = inflight.popleft()
        kind = command.kind
        reply = _make_reply(code, lines, kind.value)
        if code == 421:  # RFC 5321 §3.8: any command may be answered so; the server is going
            self._close(f"the server closed the session: {reply}", reply)
            return
        if kind is _Kind.AUTH:  # 334 challenges included
            self._auth_reply(reply)
            return
        if 300 <= code < 400 and kind is not _Kind.DATA:
            self._protocol_error(f"{reply} is not an answer to {kind.value}")
            return
        if kind is _Kind.RCPT:
            self._rcpt_reply(command, reply)
        elif kind is _Kind.MAIL:
            self._mail_reply(command, reply)
        elif kind is _Kind.DATA:
            self._data_reply(command, reply)
        elif kind is _Kind.DOT:
            self._dot_reply(command, reply)
        elif kind is _Kind.EHLO or kind is _Kind.HELO:
            self._hello_reply(kind, code, lines, reply)
        elif kind is _Kind.STARTTLS:
            self._starttls_reply(reply)
        elif kind is _Kind.QUIT:
            self._events.append(reply)
            self._close("closed after QUIT", reply)
        elif command.txn is None:  # RSET asked for by the driver; ours are not reported
            self._events.append(reply)

    def _greeting(self, code: int, lines: list[bytes]) -> None:
        reply = _make_reply(code, lines, "greeting")
        if code != 220:
            if code != 421:  # RFC 5321 §3.1: after a 554 greeting the client sends QUIT
                self._out.append(b"QUIT\r\n")
            self._close(f"the server refused the session: {reply}", reply)
            return
        self._events.append(Greeting(code, reply.text))
        self._hello(_Kind.EHLO)

    def _hello_reply(self, kind: _Kind, code: int, lines: list[bytes], reply: Reply) -> None:
        if 200 <= code < 300:
            extensions: dict[str, str] = {}
            if kind is _Kind.EHLO:
                for raw in lines[1:]:
                    keyword, _, params = raw.decode("utf-8", "replace").strip().partition(" ")
                    if keyword:
                        extensions[keyword.upper()] = params.strip()
            self._extensions = extensions
            self._pipelining = "PIPELINING" in extensions
            self._phase = _Phase.READY
            if self._running is _Kind.STARTTLS:
                self._running = None
            self._events.append(Capabilities(dict(extensions)))
        elif kind is _Kind.EHLO and code >= 500:  # RFC 5321 §3.2: fall back to HELO
            self._events.append(reply)
            self._hello(_Kind.HELO)
        else:
            self._out.append(b"QUIT\r\n")
            self._close(f"the server refused {kind.value}: {reply}", reply)

    def _starttls_reply(self, reply: Reply) -> None:
        if reply.code == 220:
            self._phase = _Phase.TLS_WAIT  # TlsReady follows once nothing came after the 220
        elif reply.code >= 400:
            self._running = None
            self._events.append(reply)
        else:
            self._protocol_error(f"{reply} is not an answer to STARTTLS")

    def _mail_reply(self, command: _Command, reply: Reply) -> None:
        txn = command.txn
        assert txn is not None
        txn.mail_reply = reply
        self._events.append(reply)
        if reply.code < 300:
            self._server_txn_open = True
        elif self._drop_queued(txn):  # not pipelined: the RCPTs were never sent
            self._end_early(txn)

    def _rcpt_reply(self, command: _Command, reply: Reply) -> None:
        txn = command.txn
        assert txn is not None
        if reply.code < 300:
            txn.accepted[command.rcpt] = reply
        else:
            txn.refused[command.rcpt] = reply
        txn.unanswered -= 1
        self._events.append(reply)
        # Not pipelined and nobody accepted: DATA was never sent, and is not.
        if not txn.unanswered and not txn.accepted and self._drop_queued(txn):
            self._end_early(txn)

    def _drop_queued(self, txn: _Transaction) -> bool:
        """Forget txn's unsent commands; True if there were any."""
        queue = self._queue
        dropped = False
        while queue and queue[0].txn is txn:
            queue.popleft()
            dropped = True
        return dropped

    def _end_early(self, txn: _Transaction) -> None:
        self._running = None
        self._finish(txn)

    def _data_reply(self, command: _Command, reply: Reply) -> None:
        txn = command.txn
        assert txn is not None
        self._events.append(reply)
        code = reply.code
        if code == 354:
            mail = txn.mail_reply
            out = self._out
            if txn.accepted and mail is not None and mail.code < 300:
                out.append(prepare_content(txn.data, crlf_only=txn.crlf_only))
            else:  # RFC 2920 §3.1: DATA accepted with no recipient: send a single dot
                out.append(b".\r\n")
            self._inflight.append(_Command(_Kind.DOT, b"", txn))
            self._server_txn_open = False
        elif code >= 400:
            txn.data_reply = reply
            self._finish(txn)
        else:
            self._protocol_error(f"{reply} is not an answer to DATA")
            return
        self._running = None

    def _dot_reply(self, command: _Command, reply: Reply) -> None:
        txn = command.txn
        assert txn is not None
        self._events.append(reply)
        txn.data_reply = reply
        if reply.code < 300 and txn.accepted:
            self.messages_accepted += 1
        self._finish(txn)

    # -- AUTH -----------------------------------------------------------------------

    def _start_auth(self, auth: _Auth) -> None:
        if not self._tls and not auth.allow_plaintext:
            self._auth_failed(
                "TLS is not active, and credentials are not sent over an unencrypted "
                "connection unless allow_plaintext_auth is set",
                quit=True,
            )
            return
        offered = offered_mechanisms(self._extensions)
        if offered is None:
            self._auth_failed("the server does not offer AUTH", quit=True)
            return
        mechanism = choose_mechanism(offered)
        if mechanism is None:
            listed = _CONTROL.sub("?", " ".join(offered))[:200] or "no mechanism"
            self._auth_failed(
                f"the server offers AUTH {listed}, none of PLAIN and LOGIN", quit=True
            )
            return
        auth.mechanism = mechanism
        self._running = auth
        if mechanism == "PLAIN":
            line = b"AUTH PLAIN " + plain_response(auth.credentials) + b"\r\n"
        else:
            line = b"AUTH LOGIN\r\n"
        self._queue.append(_Command(_Kind.AUTH, line))

    def _auth_reply(self, reply: Reply) -> None:
        auth = self._running
        assert isinstance(auth, _Auth)
        code = reply.code
        if code == 235:
            self._running = None
            self.auth_mechanism = auth.mechanism
            self._events.append(Authenticated(auth.mechanism))
        elif code == 334:
            self._auth_challenge(auth, reply)
        elif code >= 400:  # the exchange is over and the server waits for a command
            self._auth_failed(
                f"the server refused AUTH {auth.mechanism}: {reply}", reply, quit=True
            )
        else:
            self._auth_failed(
                f"protocol error: {_show(str(reply).encode())} is not an answer to AUTH"
            )

    def _auth_challenge(self, auth: _Auth, reply: Reply) -> None:
        """Answer LOGIN's two challenges; any other 334 ends the session unanswered."""
        shown = _show(str(reply).encode())
        if auth.mechanism != "LOGIN":
            self._auth_failed(
                f"protocol error: a challenge {shown} after AUTH PLAIN with an initial response"
            )
            return
        if auth.step >= 2:
            self._auth_failed(
                f"protocol error: a third challenge {shown} in AUTH LOGIN, "
                "which asks for a user name and a password only"
            )
            return
        try:
            decode_challenge(reply.text)
        except ValueError:
            self._auth_failed(f"protocol error: the AUTH LOGIN challenge {shown} is not base64")
            return
        self._inflight.append(_Command(_Kind.AUTH, b""))
        self._out.append(login_response(auth.credentials, auth.step) + b"\r\n")
        auth.step += 1

    def _auth_failed(self, reason: str, reply: Reply | None = None, *, quit: bool = False) -> None:
        """:class:`AuthFailed`, then the end of the session: nothing goes out unauthenticated.

        ``quit`` when the server waits for a command (it refused, or nothing
        was sent yet); not in the middle of a SASL exchange, where the server
        would take QUIT for a response.
        """
        self._running = None
        self._events.append(AuthFailed(reason, reply))
        if quit:
            self._out.append(b"QUIT\r\n")
        why = f"authentication failed: {reason}"
        self._close(why, reply, _local(451, "4.7.0", why, _Kind.AUTH))

    # -- the end --------------------------------------------------------------------

    def _protocol_error(self, problem: str) -> None:
        reason = f"protocol error: {problem}"
        command = self._inflight[0].kind.value if self._inflight else ""
        self._close(reason, None, Reply(451, "4.5.0", reason, command, local=True))

    def _close(self, reason: str, reply: Reply | None, local: Reply | None = None) -> None:
        """End the session: every transaction gets its result, then :class:`Closed`."""
        # The local reply, when given, is what unfinished work gets: after a
        # refused AUTH the server's 535 is about us, not about the recipients.
        closing = local or reply or Reply(451, "4.4.2", reason, local=True)
        self._phase = _Phase.CLOSED
        for txn in list(self._active):
            if txn.result is None:
                self._finish(txn, closing)
        for job in self._jobs:
            if isinstance(job, _Transaction):
                self._active.append(job)
                self._refuse_all(job, closing)
                self._finish(job, closing)
        self._jobs.clear()
        self._queue.clear()
        self._inflight.clear()
        self._buf.clear()
        self._lines = []
        self._running = None
        self._events.append(Closed(reason, reply))


def _size_limit(value: str | None) -> int:
    """The SIZE extension's fixed maximum; 0 when none is announced (RFC 1870 §4).

    More than ``_MAX_SIZE_DIGITS`` digits also counts as no limit: 10**18
    bytes is none in practice, and ``int()`` of a longer string costs time
    quadratic in its length, past 4,300 digits a ValueError (Python's
    int-string limit), which a server could send on purpose.
    """
    if value and len(value) <= _MAX_SIZE_DIGITS and value.isascii() and value.isdigit():
        return int(value)
    return 0


def _make_reply(code: int, lines: list[bytes], command: str) -> Reply:
    enhanced: str | None = None
    texts: list[str] = []
    digit = str(code // 100)
    for raw in lines:
        text = raw.decode("utf-8", "replace")
        found = _ENHANCED.match(text)
        if found is not None and found.group(1) == digit:
            status = f"{found.group(1)}.{int(found.group(2))}.{int(found.group(3))}"
            if enhanced is None:
                enhanced = status
            if status == enhanced:
                text = text[found.end() :]
        if _CONTROL.search(text):
            text = _CONTROL.sub("?", text)
        texts.append(text)
    return Reply(code, enhanced, "\n".join(texts), command)


def _show(line: bytes) -> str:
    """A received line for an error message: short and printable."""
    text = line[:80].decode("ascii", "replace")
    return repr(_CONTROL.sub("?", text))
